"""The actor runtime against its raw limit: anyio memory object streams.

Each scenario has two adapters, ``ours`` (the engine) and ``raw`` (the same
traffic over bare memory object streams on the same backend), and runs them in
one event loop, alternating repetition by repetition. Both adapters do the same
user work per message (count it, signal the last one), so the difference is
what the runtime costs.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from engine import Engine, MailboxFull

from ._common import (
    STREAM_CAPACITY,
    Echo,
    Measurement,
    Probe,
    Scenario,
    Sink,
    alternate,
    by_name,
    compare,
    now,
    percentile,
    row,
    settle,
    throughput,
    timed_asks,
    timed_hand_off,
    timed_tells,
)

ORDER = 10
"""The harness runs scenario modules by ascending ORDER."""


# ------------------------------------------------------------ (a) try_tell burst


async def try_tell_burst(n: int, repeats: int) -> Measurement:
    """N non-waiting sends into one idle consumer, timed until it has handled the N-th."""
    async with Engine() as engine:
        probe = Probe()
        ref = await engine.spawn(lambda: Sink(probe), name="sink", capacity=n)

        async def ours() -> float:
            probe.arm(n)
            try_tell = ref.try_tell
            start = now()
            for i in range(n):
                try_tell(i)
            await probe.done.wait()
            return now() - start

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
                    await settle()
                    send_nowait = send.send_nowait
                    start = now()
                    for i in range(n):
                        send_nowait(i)
                    await done.wait()
                    elapsed = now() - start
            return elapsed

        raw_seconds, ours_seconds = await alternate(raw, ours, repeats)
    return throughput(n, raw_seconds, ours_seconds)


# ------------------------------------------------------------ (b) awaited tells


async def tell_stream(n: int, repeats: int) -> Measurement:
    """A producer task awaiting each of N sends, timed until the consumer has the N-th."""
    async with Engine() as engine:
        probe = Probe()
        ref = await engine.spawn(lambda: Sink(probe), name="sink", capacity=STREAM_CAPACITY)
        ours = functools.partial(timed_tells, ref, probe, n)

        async def raw() -> float:
            send, receive = anyio.create_memory_object_stream[int](STREAM_CAPACITY)
            with send, receive:
                return await timed_hand_off(send.send, receive.receive, n)

        raw_seconds, ours_seconds = await alternate(raw, ours, repeats)
    return throughput(n, raw_seconds, ours_seconds)


# ------------------------------------------------------------- (c) ask round trip


async def ask_roundtrip(n: int, repeats: int) -> Measurement:
    """N sequential request/reply round trips; latency of each, in microseconds."""
    async with Engine() as engine:
        ref = await engine.spawn(Echo, name="echo")
        ours = functools.partial(timed_asks, ref, n)

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
                    await settle()
                    with request_send:
                        for i in range(n):
                            start = now()
                            await request_send.send(i)
                            await reply_receive.receive()
                            record(now() - start)
            return latencies

        raw_runs, ours_runs = await alternate(raw, ours, repeats)

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
    probe = Probe()

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
                    # The same user work as Sink.receive.
                    del message
                    probe.count += 1
                    if probe.count == probe.target:
                        probe.done.set()

        probe.arm(n)
        async with anyio.create_task_group() as tg:
            for _, receive in pairs:
                tg.start_soon(consume, receive)
            await settle()
            nowait = [send.send_nowait for send in sends]
            start = now()
            for i in range(n):
                index = i % count
                try:
                    nowait[index](i)
                except anyio.WouldBlock:
                    await sends[index].send(i)
            await probe.done.wait()
            elapsed = now() - start
            for send in sends:
                send.close()
        return elapsed

    async with Engine() as engine:
        refs = [
            await engine.spawn(lambda: Sink(probe), name=f"a{i}", capacity=share)
            for i in range(count)
        ]

        async def ours() -> float:
            probe.arm(n)
            try_tells = [ref.try_tell for ref in refs]
            start = now()
            for i in range(n):
                index = i % count
                try:
                    try_tells[index](i)
                except MailboxFull:
                    await refs[index].tell(i)
            await probe.done.wait()
            return now() - start

        return await alternate(raw, ours, repeats)


async def actors_scale(n: int, repeats: int) -> Measurement:
    """Aggregate throughput of ``n`` messages sent round-robin to 10 ... 10,000 actors.

    Each count (see ``scale_counts``) spawns its actors in a fresh engine; raw
    runs one memory object stream and one consumer task per actor. One row per
    count (ours, raw, ratio); the headline is ours at the largest count against
    ours at the smallest: how aggregate throughput holds up as actors multiply.
    """
    counts = scale_counts(n)
    measured: dict[int, Measurement] = {}
    for count in counts:
        raw_seconds, ours_seconds = await _actors_at(count, n, repeats)
        measured[count] = throughput(n, raw_seconds, ours_seconds)
        gc.collect()
    low, high = measured[counts[0]], measured[counts[-1]]
    return compare(
        high.extra["ours_rates"],
        low.extra["ours_rates"],
        {
            "label": f"actors_scale ours @{counts[-1]} vs ours @{counts[0]}",
            "rows": [
                row(f"actors_scale @{count}", figures, "msgs/s", actors=count, messages=n)
                for count, figures in measured.items()
            ],
            "limit_growth": high.limit / low.limit,
        },
    )


SCENARIOS = by_name(
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
        target=0.6,  # issue 14 (issue 2 set 0.9)
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
