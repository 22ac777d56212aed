"""The actor runtime against its raw limit: anyio memory object streams.

Each scenario has two adapters, ``ours`` (the engine) and ``raw`` (the same
traffic over bare memory object streams on the same backend), and runs them in
one event loop, alternating repetition by repetition. Both adapters do the same
user work per message (count it, signal the last one), so the difference is
what the runtime costs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from engine import Actor, Engine, MailboxFull

from ._harness import Measurement, Scenario, median, percentile

_T = TypeVar("_T")

# perf_counter, not anyio.current_time(): we want wall time at the finest
# resolution, and no backend's clock is involved in what is measured.
_now = time.perf_counter


class _Probe:
    """Counts handled messages and signals the last one; shared by both adapters' sinks."""

    __slots__ = ("count", "done", "target")

    def __init__(self) -> None:
        self.arm(0)

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = anyio.Event()


class _Sink(Actor):
    def __init__(self, probe: _Probe) -> None:
        self._probe = probe

    async def receive(self, message: object) -> None:
        probe = self._probe
        probe.count += 1
        if probe.count == probe.target:
            probe.done.set()


class _Echo(Actor):
    async def receive(self, message: object) -> object:
        return message


async def _settle() -> None:
    """Let every task reach its wait, so each repetition starts from idle consumers."""
    # A few plain checkpoints first: on asyncio wait_all_tasks_blocked sleeps
    # 0.1 s whenever it finds a runnable task, which would only waste time here.
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


async def _alternate(
    raw: Callable[[], Awaitable[_T]],
    ours: Callable[[], Awaitable[_T]],
    repeats: int,
    *,
    settle: Callable[[], Awaitable[None]] = _settle,
) -> tuple[list[_T], list[_T]]:
    """Run ``repeats`` pairs, swapping the order in every other pair (raw-ours, ours-raw).

    ``settle`` runs before each timed repetition (default: ``_settle``).
    """
    # One untimed round first: lazy imports, first-call caches and heap growth
    # would otherwise land on whichever adapter runs first.
    await raw()
    await ours()
    raw_results: list[_T] = []
    ours_results: list[_T] = []
    for i in range(repeats):
        order = ((raw, raw_results), (ours, ours_results))
        for adapter, results in order if i % 2 == 0 else reversed(order):
            # Collect now so a cycle left by the previous repetition is not
            # collected inside this one's timed section.
            gc.collect()
            await settle()
            results.append(await adapter())
    return raw_results, ours_results


def _throughput(n: int, raw_seconds: list[float], ours_seconds: list[float]) -> Measurement:
    raw_rates = [n / seconds for seconds in raw_seconds]
    ours_rates = [n / seconds for seconds in ours_seconds]
    return Measurement(
        ours=median(ours_rates),
        limit=median(raw_rates),
        pair_ratios=[o / r for o, r in zip(ours_rates, raw_rates, strict=True)],
        extra={"ours_rates": ours_rates, "limit_rates": raw_rates},
    )


# ------------------------------------------------------------ (a) try_tell burst


async def try_tell_burst(n: int, repeats: int) -> Measurement:
    """N non-waiting sends into one idle consumer, timed until it has handled the N-th."""
    async with Engine() as engine:
        probe = _Probe()
        ref = await engine.spawn(lambda: _Sink(probe), name="sink", capacity=n)

        async def ours() -> float:
            probe.arm(n)
            try_tell = ref.try_tell
            start = _now()
            for i in range(n):
                try_tell(i)
            await probe.done.wait()
            return _now() - start

        async def raw() -> float:
            send, receive = anyio.create_memory_object_stream[int](n)
            done = anyio.Event()

            async def consume(*, task_status: TaskStatus[None]) -> None:
                task_status.started()
                receive_nowait = receive.receive_nowait
                count = 0
                while count < n:
                    try:
                        receive_nowait()
                    except anyio.WouldBlock:
                        await receive.receive()
                    count += 1
                done.set()

            with send, receive:
                async with anyio.create_task_group() as tg:
                    await tg.start(consume)
                    await _settle()
                    send_nowait = send.send_nowait
                    start = _now()
                    for i in range(n):
                        send_nowait(i)
                    await done.wait()
                    elapsed = _now() - start
            return elapsed

        raw_seconds, ours_seconds = await _alternate(raw, ours, repeats)
    return _throughput(n, raw_seconds, ours_seconds)


# ------------------------------------------------------------ (b) awaited tells


_STREAM_CAPACITY = 1000


async def tell_stream(n: int, repeats: int) -> Measurement:
    """A producer task awaiting each of N sends, timed until the consumer has the N-th."""
    async with Engine() as engine:
        probe = _Probe()
        ref = await engine.spawn(lambda: _Sink(probe), name="sink", capacity=_STREAM_CAPACITY)

        async def ours() -> float:
            probe.arm(n)

            async def produce() -> None:
                tell = ref.tell
                for i in range(n):
                    await tell(i)

            async with anyio.create_task_group() as tg:
                start = _now()
                tg.start_soon(produce)
                await probe.done.wait()
                elapsed = _now() - start
            return elapsed

        async def raw() -> float:
            send, receive = anyio.create_memory_object_stream[int](_STREAM_CAPACITY)
            done = anyio.Event()

            async def consume(*, task_status: TaskStatus[None]) -> None:
                task_status.started()
                for _ in range(n):
                    await receive.receive()
                done.set()

            async def produce() -> None:
                for i in range(n):
                    await send.send(i)

            with send, receive:
                async with anyio.create_task_group() as tg:
                    await tg.start(consume)
                    await _settle()
                    start = _now()
                    tg.start_soon(produce)
                    await done.wait()
                    elapsed = _now() - start
            return elapsed

        raw_seconds, ours_seconds = await _alternate(raw, ours, repeats)
    return _throughput(n, raw_seconds, ours_seconds)


# ------------------------------------------------------------- (c) ask round trip


async def ask_roundtrip(n: int, repeats: int) -> Measurement:
    """N sequential request/reply round trips; latency of each, in microseconds."""
    async with Engine() as engine:
        ref = await engine.spawn(_Echo, name="echo")

        async def ours() -> list[float]:
            ask = ref.ask
            latencies: list[float] = []
            record = latencies.append
            for i in range(n):
                start = _now()
                await ask(i)
                record(_now() - start)
            return latencies

        async def raw() -> list[float]:
            request_send, request_receive = anyio.create_memory_object_stream[int](1)
            reply_send, reply_receive = anyio.create_memory_object_stream[int](1)

            async def serve(*, task_status: TaskStatus[None]) -> None:
                task_status.started()
                with request_receive, reply_send:
                    async for request in request_receive:
                        await reply_send.send(request)

            latencies: list[float] = []
            record = latencies.append
            with reply_receive:
                async with anyio.create_task_group() as tg:
                    await tg.start(serve)
                    await _settle()
                    with request_send:
                        for i in range(n):
                            start = _now()
                            await request_send.send(i)
                            await reply_receive.receive()
                            record(_now() - start)
            return latencies

        raw_runs, ours_runs = await _alternate(raw, ours, repeats)

    def micros(runs: list[list[float]]) -> list[float]:
        return [seconds * 1e6 for run in runs for seconds in run]

    ours_all, raw_all = micros(ours_runs), micros(raw_runs)
    extra: dict[str, Any] = {
        "ours_p99": percentile(ours_all, 99),
        "limit_p99": percentile(raw_all, 99),
    }
    return Measurement(
        ours=percentile(ours_all, 50),
        limit=percentile(raw_all, 50),
        pair_ratios=[
            percentile(o, 50) / percentile(r, 50) for o, r in zip(ours_runs, raw_runs, strict=True)
        ],
        extra=extra,
    )


# ---------------------------------------------------------- (d) many actors


SCALE_COUNTS = (10, 100, 1_000, 10_000)
_SCALE_MIN_SHARE = 10
"""A count runs only when each actor gets at least this many of the N messages."""


def scale_counts(n: int) -> tuple[int, ...]:
    """The actor counts measured with ``n`` messages: full 10 to 10,000, quick to 1,000."""
    return tuple(count for count in SCALE_COUNTS if count * _SCALE_MIN_SHARE <= n)


async def _actors_at(count: int, n: int, repeats: int) -> tuple[list[float], list[float]]:
    """``n`` messages round-robin over ``count`` actors (ours) or streams (raw); seconds each.

    Every mailbox and stream buffer holds its actor's whole share, so the
    ``await tell`` / ``await send`` fallback is there as a user would write it
    but no sender waits: the figures are the cost of delivering, not of throttling.
    """
    share = -(-n // count)
    probe = _Probe()

    async def raw() -> float:
        pairs = [anyio.create_memory_object_stream[int](share) for _ in range(count)]
        sends = [send for send, _ in pairs]

        async def consume(receive: MemoryObjectReceiveStream[int]) -> None:
            receive_nowait = receive.receive_nowait
            with receive:
                while True:
                    try:
                        message = receive_nowait()
                    except anyio.WouldBlock:
                        try:
                            message = await receive.receive()
                        except anyio.EndOfStream:
                            return
                    except anyio.EndOfStream:
                        return
                    # The same user work as _Sink.receive.
                    del message
                    probe.count += 1
                    if probe.count == probe.target:
                        probe.done.set()

        probe.arm(n)
        async with anyio.create_task_group() as tg:
            for _, receive in pairs:
                tg.start_soon(consume, receive)
            await _settle()
            nowait = [send.send_nowait for send in sends]
            start = _now()
            for i in range(n):
                index = i % count
                try:
                    nowait[index](i)
                except anyio.WouldBlock:
                    await sends[index].send(i)
            await probe.done.wait()
            elapsed = _now() - start
            for send in sends:
                send.close()
        return elapsed

    async with Engine() as engine:
        refs = [
            await engine.spawn(lambda: _Sink(probe), name=f"a{i}", capacity=share)
            for i in range(count)
        ]

        async def ours() -> float:
            probe.arm(n)
            try_tells = [ref.try_tell for ref in refs]
            start = _now()
            for i in range(n):
                index = i % count
                try:
                    try_tells[index](i)
                except MailboxFull:
                    await refs[index].tell(i)
            await probe.done.wait()
            return _now() - start

        return await _alternate(raw, ours, repeats)


async def actors_scale(n: int, repeats: int) -> Measurement:
    """Aggregate throughput of ``n`` messages sent round-robin to 10 ... 10,000 actors.

    Each count (see ``scale_counts``) spawns its actors in a fresh engine; raw
    runs one memory object stream and one consumer task per actor. One row per
    count (ours, raw, ratio); the headline is ours at the largest count against
    ours at the smallest: how aggregate throughput holds up as actors multiply.
    """
    counts = scale_counts(n)
    rows: list[dict[str, Any]] = []
    ours_rates: dict[int, list[float]] = {}
    raw_rates: dict[int, list[float]] = {}
    for count in counts:
        raw_seconds, ours_seconds = await _actors_at(count, n, repeats)
        measured = _throughput(n, raw_seconds, ours_seconds)
        ours_rates[count] = measured.extra["ours_rates"]
        raw_rates[count] = measured.extra["limit_rates"]
        rows.append(
            {
                "label": f"actors_scale @{count}",
                "actors": count,
                "messages": n,
                "unit": "msgs/s",
                "ours": measured.ours,
                "limit": measured.limit,
                "pair_ratio_min": min(measured.pair_ratios),
                "pair_ratio_max": max(measured.pair_ratios),
            }
        )
        gc.collect()
    low, high = counts[0], counts[-1]
    return Measurement(
        ours=median(ours_rates[high]),
        limit=median(ours_rates[low]),
        pair_ratios=[h / lo for h, lo in zip(ours_rates[high], ours_rates[low], strict=True)],
        extra={
            "label": f"actors_scale ours @{high} vs ours @{low}",
            "rows": rows,
            "limit_growth": median(raw_rates[high]) / median(raw_rates[low]),
        },
    )


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="try_tell_burst",
            run=try_tell_burst,
            unit="msgs/s",
            higher_is_better=True,
            target=0.45,
            n={"full": 200_000, "quick": 20_000, "smoke": 200},
        ),
        Scenario(
            name="tell_stream",
            run=tell_stream,
            unit="msgs/s",
            higher_is_better=True,
            target=2.5,
            n={"full": 50_000, "quick": 10_000, "smoke": 200},
        ),
        Scenario(
            name="ask_roundtrip",
            run=ask_roundtrip,
            unit="µs",
            higher_is_better=False,
            target=0.9,
            n={"full": 10_000, "quick": 1_000, "smoke": 200},
        ),
        Scenario(
            name="actors_scale",
            run=actors_scale,
            unit="msgs/s",
            higher_is_better=True,
            target=None,
            # N messages per count: 10 to 10,000 actors in full, to 1,000 in quick, 10 and 100
            # in smoke (see scale_counts).
            n={"full": 200_000, "quick": 20_000, "smoke": 1_000},
        ),
    )
}
