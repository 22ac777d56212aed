"""The tenant resolver: a cached tenant beside a plain dict, and a cold key under 1,000 callers.

``resolver_cached`` times ``await resolver.resolve(key)`` of a warm key (a cache
hit, answered in the caller's task) with a ``TenantKey`` and with a raw slug
string, which the resolver validates first, beside the floor of any async cache:
a plain dict lookup inside an ``async def``, awaited the same way (``await
lookup(key)``, keyed by the same ``TenantKey``). The three take turns block by
block in one event loop (see ``_common.take_turns_in_blocks``), ours with its
engine running.

``resolver_cold_1000`` starts 1,000 tasks that each resolve the same cold key
at once, with a loader that sleeps ``LOAD_SLEEP`` before returning: the resolver
must call the loader once and let the other 999 callers wait for that load (the
scenario raises otherwise). It is timed until all 1,000 have their answer,
beside the loader alone (``await load(key)``) and beside a hand-written single
flight on bare anyio (the first caller loads, the others wait on one
``anyio.Event``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from engine import Engine, TenantKey

from ._common import (
    Measurement,
    Scenario,
    by_name,
    compare,
    median,
    now,
    row,
    settle,
    take_turns,
    take_turns_in_blocks,
    timed_awaits,
)

ORDER = 50
"""The harness runs scenario modules by ascending ORDER."""
SLUG = "acme"
"""The tenant both scenarios resolve (a raw slug; ``TenantKey.slug(SLUG)`` is its key)."""
LOAD_SLEEP = 0.005
"""What the cold scenario's loader awaits (``anyio.sleep``) before it returns the tenant."""
TTL = 3600.0
"""Long enough that no cached entry expires while a scenario runs."""


class _Tenant:
    """What the loader returns: one new object per load, so answers can be told apart."""

    __slots__ = ("key",)

    def __init__(self, key: TenantKey) -> None:
        self.key = key


def _rates(ns: list[float]) -> list[float]:
    """Resolves per second of each repetition, from its ns per resolve."""
    return [1e9 / cost for cost in ns]


async def resolver_cached(n: int, repeats: int) -> Measurement:
    """Resolves per second of a warm key: a TenantKey and a raw slug, beside a dict lookup."""
    key = TenantKey.slug(SLUG)

    async def load(key: TenantKey) -> _Tenant:
        return _Tenant(key)

    table = {key: _Tenant(key)}

    async def lookup(key: TenantKey) -> _Tenant:
        return table[key]

    async with Engine() as engine:
        resolver = await engine.tenant_resolver(load, ttl=TTL, negative_ttl=TTL)
        await resolver.resolve(key)  # the one load: every resolve timed below is a hit

        per_call = await take_turns_in_blocks(
            {
                "dict_lookup": timed_awaits(lookup, key),
                "ours_key": timed_awaits(resolver.resolve, key),
                "ours_str": timed_awaits(resolver.resolve, SLUG),
            },
            n,
            repeats,
        )
        statistics = resolver.statistics()
    if statistics.loads != 1 or statistics.misses != 1:
        raise RuntimeError(
            f"resolver_cached: the warm key missed the cache ({statistics.misses} misses, "
            f"{statistics.loads} loads; expected 1 of each, from the warm-up)"
        )
    floor, by_key, by_str = per_call["dict_lookup"], per_call["ours_key"], per_call["ours_str"]
    key_rates, str_rates, floor_rates = _rates(by_key), _rates(by_str), _rates(floor)
    str_row = row(
        "resolver_cached str (validated) vs dict lookup",
        compare(str_rates, floor_rates),
        "resolves/s",
    )
    return compare(
        key_rates,
        floor_rates,
        {
            "label": "resolver_cached TenantKey vs dict lookup",
            "rows": [str_row],
            "ns_per_call": {name: median(costs) for name, costs in per_call.items()},
            "ratio_key": median(key_rates) / median(floor_rates),
            "ratio_str": str_row["ours"] / str_row["limit"],
            "validate_ns": median([s - k for s, k in zip(by_str, by_key, strict=True)]),
            "hits": statistics.hits,
        },
    )


async def _concurrently(
    n: int, fetch: Callable[[], Awaitable[object]]
) -> tuple[float, float, list[object]]:
    """``n`` tasks, released at once, each ``await fetch()``: (release, last answer, answers).

    The tasks are started and left to wait at a gate before the clock starts, so
    the figure holds the resolves and not the spawning of the tasks.
    """
    gate = anyio.Event()
    done = anyio.Event()
    answers: list[object] = []
    finished = 0.0

    async def caller() -> None:
        nonlocal finished
        await gate.wait()
        answers.append(await fetch())
        if len(answers) == n:
            finished = now()
            done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(caller)
        await settle()
        start = now()
        gate.set()
        await done.wait()
    return start, finished, answers


def _one_answer(name: str, answers: list[object], n: int) -> None:
    if len(answers) != n or any(answer is not answers[0] for answer in answers):
        distinct = len({id(answer) for answer in answers})
        raise RuntimeError(
            f"resolver_cold_1000: {name} gave {len(answers)} answers, {distinct} distinct "
            f"tenants; expected {n} answers, all the one tenant loaded"
        )


async def resolver_cold_1000(n: int, repeats: int) -> Measurement:
    """ms until ``n`` concurrent cold resolves of one key all have their answer; one load."""
    key = TenantKey.slug(SLUG)
    calls = 0
    called_at = 0.0

    async def load(key: TenantKey) -> _Tenant:
        nonlocal calls, called_at
        calls += 1
        called_at = now()
        await anyio.sleep(LOAD_SLEEP)
        return _Tenant(key)

    loads: list[int] = []
    coalesced: list[int] = []
    late_hits: list[int] = []
    load_start_ms: list[float] = []

    async with Engine() as engine:
        resolver = await engine.tenant_resolver(load, ttl=TTL, negative_ttl=TTL)
        resolve = resolver.resolve

        async def loader_alone() -> float:
            start = now()
            await load(key)
            return now() - start

        async def single_flight() -> float:
            flights: dict[TenantKey, anyio.Event] = {}
            tenants: dict[TenantKey, _Tenant] = {}

            async def fetch() -> _Tenant:
                flight = flights.get(key)
                if flight is None:
                    flight = flights[key] = anyio.Event()
                    tenants[key] = await load(key)
                    flight.set()
                else:
                    await flight.wait()
                return tenants[key]

            start, finished, answers = await _concurrently(n, fetch)
            _one_answer("the single flight", answers, n)
            return finished - start

        async def ours() -> float:
            nonlocal calls
            await resolver.invalidate(key)  # cold again: the next resolve must load
            before, calls = resolver.statistics(), 0

            async def fetch() -> _Tenant:
                return await resolve(key)

            start, finished, answers = await _concurrently(n, fetch)
            after = resolver.statistics()
            if calls != 1 or after.loads - before.loads != 1:
                raise RuntimeError(
                    f"resolver_cold_1000: {calls} loader calls ({after.loads - before.loads} "
                    f"loads counted) for {n} concurrent cold resolves of one key; expected 1"
                )
            _one_answer("the resolver", answers, n)
            # Every other caller joined the load (coalesced) or, reaching the actor after
            # it landed, found the tenant cached (a hit).
            joined, hits = after.coalesced - before.coalesced, after.hits - before.hits
            if joined + hits != n - 1:
                raise RuntimeError(
                    f"resolver_cold_1000: {joined} coalesced and {hits} hits for the {n - 1} "
                    "callers that did not load; expected them to add up"
                )
            loads.append(calls)
            coalesced.append(joined)
            late_hits.append(hits)
            load_start_ms.append((called_at - start) * 1e3)
            return finished - start

        seconds = await take_turns(
            {"loader_alone": loader_alone, "single_flight": single_flight, "ours": ours}, repeats
        )
    # The untimed warm-up round's figures are checked but not reported.
    del loads[0], coalesced[0], late_hits[0], load_start_ms[0]
    ms = {name: [s * 1e3 for s in values] for name, values in seconds.items()}
    alone, raw, ours_ms = ms["loader_alone"], ms["single_flight"], ms["ours"]
    rows: list[dict[str, Any]] = [
        {
            "label": "resolver_cold_1000 loader calls",
            "unit": "calls",
            "ours": float(max(loads)),
            "limit": 1.0,
            "pair_ratio_min": float(min(loads)),
            "pair_ratio_max": float(max(loads)),
            "target": "== 1",
            "met": all(count == 1 for count in loads),
        },
        {
            "label": f"resolver_cold_1000 coalesced waiters (of {n - 1})",
            "unit": "waiters",
            "ours": median(coalesced),
            "limit": float(n - 1),
            "pair_ratio_min": min(coalesced) / (n - 1),
            "pair_ratio_max": max(coalesced) / (n - 1),
        },
        row("resolver_cold_1000 vs single flight on one anyio.Event", compare(ours_ms, raw), "ms"),
    ]
    return compare(
        ours_ms,
        alone,
        {
            "label": f"resolver_cold_1000 vs the loader alone ({LOAD_SLEEP * 1e3:g} ms sleep)",
            "rows": rows,
            "concurrent": n,
            "load_sleep_ms": LOAD_SLEEP * 1e3,
            "loader_calls": loads,
            "coalesced": coalesced,
            "late_hits": late_hits,
            "load_start_ms": load_start_ms,
            "ms_ours": ours_ms,
            "ms_loader_alone": alone,
            "ms_single_flight": raw,
            "ratio_single_flight": median(ours_ms) / median(raw),
        },
    )


SCENARIOS = by_name(
    Scenario(
        name="resolver_cached",
        run=resolver_cached,
        unit="resolves/s",
        higher_is_better=True,
        target=None,
        n={"full": 100_000, "quick": 25_000, "smoke": 2_000},
    ),
    Scenario(
        name="resolver_cold_1000",
        run=resolver_cold_1000,
        unit="ms",
        higher_is_better=False,
        target=None,
        # N is the number of concurrent resolves: 1,000 in every mode.
        n={"full": 1_000, "quick": 1_000, "smoke": 1_000},
    ),
)
