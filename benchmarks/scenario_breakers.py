"""Circuit breakers: what a call through a closed breaker costs, beside aiobreaker and pybreaker.

Every adapter awaits the same no-op in a loop; its cost per call minus that of
the bare loop (``await noop()``) is its overhead. All adapters run in one event
loop (ours with its engine running), taking turns block by block (see
``_common.take_turns_in_blocks``), and each repetition's overheads are taken
against the bare loop of the same repetition, so drift hits them alike. The peers:

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

import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

import aiobreaker  # type: ignore[import-untyped]
import anyio
import pybreaker

from engine import CircuitBreakerConfig, Engine

from ._common import (
    BlockAdapter,
    Measurement,
    Scenario,
    by_name,
    compare,
    median,
    now,
    on_asyncio,
    row,
    take_turns_in_blocks,
    timed_awaits,
    with_target,
)

ORDER = 40
"""The harness runs scenario modules by ascending ORDER."""
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


def _adapters(engine: Engine, pybreaker_async: bool) -> dict[str, BlockAdapter]:
    """One coroutine per implementation, each timing a loop of calls to a no-op."""
    ours = engine.breaker("bench.closed", CircuitBreakerConfig())
    ours_timeout = engine.breaker("bench.call_timeout", CircuitBreakerConfig(call_timeout=1.0))
    aio = aiobreaker.CircuitBreaker()
    py = pybreaker.CircuitBreaker()

    async def bare(count: int) -> float:
        noop = _noop
        start = now()
        for _ in range(count):
            await noop()
        return now() - start

    async def cancel_scope(count: int) -> float:
        noop = _noop
        start = now()
        for _ in range(count):
            # Spelled as the breaker spells it (module attribute look-ups included).
            with anyio.CancelScope(deadline=anyio.current_time() + 1):
                await noop()
        return now() - start

    async def sync_bare(count: int) -> float:
        noop = _sync_noop
        start = now()
        for _ in range(count):
            noop()
        return now() - start

    async def pybreaker_sync_closed(count: int) -> float:
        call, noop = py.call, _sync_noop
        start = now()
        for _ in range(count):
            call(noop)
        return now() - start

    adapters: dict[str, BlockAdapter] = {
        "bare": bare,
        "ours": timed_awaits(ours.call, _noop),
        "ours_call_timeout": timed_awaits(ours_timeout.call, _noop),
        "cancel_scope": cancel_scope,
        "aiobreaker": timed_awaits(aio.call_async, _noop),
    }
    if pybreaker_async:
        # A tornado coroutine (untyped): awaitable on asyncio, tornado's own loop.
        call_async: Callable[..., Awaitable[None]] = py.call_async
        adapters["pybreaker"] = timed_awaits(call_async, _noop)
    else:
        adapters["sync_bare"] = sync_bare
        adapters["pybreaker"] = pybreaker_sync_closed
    return adapters


def _row(
    label: str, ours: list[float], limit: list[float], target: float | None = None
) -> dict[str, Any]:
    figures = row(label, compare(ours, limit), "ns/call")
    # Only a row with a target of its own says so: the others carry neither key.
    if target is None:
        return figures
    return with_target(figures, target, higher_is_better=False)


async def breaker_overhead(n: int, repeats: int) -> Measurement:
    """ns per call that each breaker adds to ``await noop()`` on its closed (success) path."""
    tornado = _tornado_available()
    pybreaker_async = tornado and on_asyncio()
    async with Engine() as engine:
        per_call = await take_turns_in_blocks(_adapters(engine, pybreaker_async), n, repeats)
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
    return compare(
        ours,
        aio,
        {
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
                + ("asyncio" if on_asyncio() else "trio (its closed path never touches asyncio)")
            ),
        },
    )


SCENARIOS = by_name(
    Scenario(
        name="breaker_overhead",
        run=breaker_overhead,
        unit="ns/call",
        higher_is_better=False,
        target=0.25,
        n={"full": 100_000, "quick": 25_000, "smoke": 2_000},
    ),
)
