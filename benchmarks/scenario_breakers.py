"""Circuit breakers: what a call through a closed breaker costs, beside aiobreaker and pybreaker.

Every adapter awaits the same no-op in a loop; its cost per call minus that of
the bare loop (``await noop()``) is its overhead. All adapters run in one event
loop (ours with its engine running), taking turns block by block (see
``_rounds``), and each repetition's overheads are taken against the bare loop
of the same repetition, so drift hits them alike. The peers:

- aiobreaker: ``await breaker.call_async(noop)``. Its closed path never
  touches asyncio (only ``sleep_until_open`` does, which is not called here),
  so it runs on trio as well and is measured on both backends.
- pybreaker: its async support needs tornado (and an asyncio loop). With
  tornado installed, on asyncio, ``await breaker.call_async(noop)``; otherwise
  its sync ``breaker.call(sync_noop)`` minus a bare ``sync_noop()`` loop, the
  reference for a sync peer, labelled as such.

With ``call_timeout`` set our breaker enters a cancel scope with a deadline
around each call; the raw cost of that (``with anyio.CancelScope(deadline=
anyio.current_time() + 1): await noop()`` minus bare) is measured beside it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

import aiobreaker  # type: ignore[import-untyped]
import anyio
import anyio.lowlevel
import pybreaker

from engine import CircuitBreakerConfig, Engine

from ._harness import Measurement, Scenario, median, meets, target_text
from .scenario_actors import _now, _settle

BLOCK = 500
"""Calls per timed block; the adapters take turns block by block."""
TIMEOUT_BUDGET_NS = 500.0
"""What a call with ``call_timeout`` may cost beyond entering the raw cancel scope."""
TIMEOUT_TARGET = 1.0
"""ours / (cancel scope + budget): at most 1."""


async def _noop() -> None:
    return None


def _sync_noop() -> None:
    return None


def _tornado_available() -> bool:
    return bool(getattr(pybreaker, "HAS_TORNADO_SUPPORT", False)) and (
        importlib.util.find_spec("tornado") is not None
    )


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


Adapter = Callable[[int], Awaitable[float]]
"""``adapter(count)``: make ``count`` calls, return the seconds they took."""


def _adapters(engine: Engine, pybreaker_async: bool) -> dict[str, Adapter]:
    """One coroutine per implementation, each timing a loop of calls to a no-op."""
    ours = engine.breaker("bench.closed", CircuitBreakerConfig())
    ours_timeout = engine.breaker("bench.call_timeout", CircuitBreakerConfig(call_timeout=1.0))
    aio = aiobreaker.CircuitBreaker()
    py = pybreaker.CircuitBreaker()

    async def bare(count: int) -> float:
        noop = _noop
        start = _now()
        for _ in range(count):
            await noop()
        return _now() - start

    async def ours_closed(count: int) -> float:
        call, noop = ours.call, _noop
        start = _now()
        for _ in range(count):
            await call(noop)
        return _now() - start

    async def ours_call_timeout(count: int) -> float:
        call, noop = ours_timeout.call, _noop
        start = _now()
        for _ in range(count):
            await call(noop)
        return _now() - start

    async def cancel_scope(count: int) -> float:
        noop = _noop
        start = _now()
        for _ in range(count):
            # Spelled as the breaker spells it (module attribute look-ups included).
            with anyio.CancelScope(deadline=anyio.current_time() + 1):
                await noop()
        return _now() - start

    async def aiobreaker_closed(count: int) -> float:
        call, noop = aio.call_async, _noop
        start = _now()
        for _ in range(count):
            await call(noop)
        return _now() - start

    async def pybreaker_async_closed(count: int) -> float:
        # A tornado coroutine (untyped): awaitable on asyncio, tornado's own loop.
        call: Callable[..., Awaitable[None]] = py.call_async
        noop = _noop
        start = _now()
        for _ in range(count):
            await call(noop)
        return _now() - start

    async def sync_bare(count: int) -> float:
        noop = _sync_noop
        start = _now()
        for _ in range(count):
            noop()
        return _now() - start

    async def pybreaker_sync_closed(count: int) -> float:
        call, noop = py.call, _sync_noop
        start = _now()
        for _ in range(count):
            call(noop)
        return _now() - start

    adapters: dict[str, Adapter] = {
        "bare": bare,
        "ours": ours_closed,
        "ours_call_timeout": ours_call_timeout,
        "cancel_scope": cancel_scope,
        "aiobreaker": aiobreaker_closed,
    }
    if pybreaker_async:
        adapters["pybreaker"] = pybreaker_async_closed
    else:
        adapters["sync_bare"] = sync_bare
        adapters["pybreaker"] = pybreaker_sync_closed
    return adapters


async def _rounds(adapters: dict[str, Adapter], n: int, repeats: int) -> dict[str, list[float]]:
    """Nanoseconds per call of each adapter, one figure per repetition of about n calls.

    A repetition runs the adapters in blocks of ``BLOCK`` calls, one block of
    each in turn (reversed every other turn), so drift within a repetition hits
    them alike; its figure is the median block, so a block that took a
    collection of the old generations or an interrupt does not move it. Between
    blocks, untimed, the loop gets a turn: a cancel scope with a deadline leaves
    a timer entry that asyncio and trio prune only when their loop runs, and a
    tight loop that never yields would time a heap growing by one entry a call.
    """
    # One untimed round first: first-call caches and lazy imports land nowhere.
    for adapter in adapters.values():
        await adapter(BLOCK)
    names = list(adapters)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        gc.collect()
        await _settle()
        blocks: dict[str, list[float]] = {name: [] for name in names}
        for block in range(max(1, n // BLOCK)):
            for name in names if block % 2 == 0 else reversed(names):
                blocks[name].append(await adapters[name](BLOCK))
                await anyio.lowlevel.checkpoint()
        for name in names:
            per_call[name].append(median(blocks[name]) / BLOCK * 1e9)
    return per_call


def _row(
    label: str, ours: list[float], limit: list[float], target: float | None = None
) -> dict[str, Any]:
    ratio = median(ours) / median(limit)
    pairs = [o / lim for o, lim in zip(ours, limit, strict=True)]
    row: dict[str, Any] = {
        "label": label,
        "unit": "ns/call",
        "ours": median(ours),
        "limit": median(limit),
        "pair_ratio_min": min(pairs),
        "pair_ratio_max": max(pairs),
    }
    if target is not None:
        row["target"] = target_text(target, higher_is_better=False)
        row["met"] = meets(ratio, target, higher_is_better=False)
    return row


async def breaker_overhead(n: int, repeats: int) -> Measurement:
    """ns per call that each breaker adds to ``await noop()`` on its closed (success) path."""
    tornado = _tornado_available()
    pybreaker_async = tornado and _on_asyncio()
    async with Engine() as engine:
        per_call = await _rounds(_adapters(engine, pybreaker_async), n, repeats)
    bare = per_call["bare"]

    def overhead(name: str, base: list[float] = bare) -> list[float]:
        return [cost - b for cost, b in zip(per_call[name], base, strict=True)]

    ours = overhead("ours")
    ours_timeout = overhead("ours_call_timeout")
    scope = overhead("cancel_scope")
    aio = overhead("aiobreaker")
    py = overhead("pybreaker", bare if pybreaker_async else per_call["sync_bare"])
    budget = [s + TIMEOUT_BUDGET_NS for s in scope]
    if pybreaker_async:
        py_label = "breaker vs pybreaker (async: tornado)"
        py_mode = "async: await call_async(noop), through tornado"
    else:
        why = "tornado needs asyncio" if tornado else "no tornado"
        py_label = f"breaker vs pybreaker (sync call: {why})"
        py_mode = f"sync: call(sync_noop) minus a bare sync loop ({why}), a sync peer's reference"
    rows = [
        _row("breaker call vs bare await", per_call["ours"], bare),
        _row(py_label, ours, py),
        _row("breaker call_timeout vs cancel scope", ours_timeout, scope),
        _row("breaker call_timeout vs cancel scope + 0.5 µs", ours_timeout, budget, TIMEOUT_TARGET),
    ]
    return Measurement(
        ours=median(ours),
        limit=median(aio),
        pair_ratios=[o / a for o, a in zip(ours, aio, strict=True)],
        extra={
            "label": "breaker vs aiobreaker",
            "rows": rows,
            "ns_per_call": {name: median(costs) for name, costs in per_call.items()},
            "overhead_ns": {
                "ours": median(ours),
                "ours_call_timeout": median(ours_timeout),
                "cancel_scope": median(scope),
                "aiobreaker": median(aio),
                "pybreaker": median(py),
            },
            "ratio_aiobreaker": median(ours) / median(aio),
            "ratio_pybreaker": median(ours) / median(py),
            "call_timeout_excess_ns": median(
                [t - s for t, s in zip(ours_timeout, scope, strict=True)]
            ),
            "pybreaker_mode": py_mode,
            "aiobreaker_mode": (
                "async: await call_async(noop) on "
                + ("asyncio" if _on_asyncio() else "trio (its closed path never touches asyncio)")
            ),
        },
    )


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="breaker_overhead",
            run=breaker_overhead,
            unit="ns/call",
            higher_is_better=False,
            target=0.25,
            n={"full": 100_000, "quick": 25_000, "smoke": 2_000},
        ),
    )
}
