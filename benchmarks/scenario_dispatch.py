"""Publishing events against its raw limit: a hand-written fan-out over memory object streams.

Ours publishes through the engine: validation, a backpressure slot, the
dispatcher actor, one handler actor per subscription partition. Raw is what a
developer would write instead: one memory object stream and one consumer task
per subscriber, the producer doing ``send_nowait`` into each stream (awaiting
``send`` only if a stream were full). Both sides publish the same prebuilt
events to the same async handler, which counts them and signals the last one,
and both are timed from the first publish until the handler has seen every
delivery. Raw does not validate; the engine does on every publish, and that
is part of the cost being measured.

Buffers on both sides hold the whole burst (subscription ``capacity`` and raw
stream buffers are the number of events, ``max_depth`` is at least twice it),
so no publisher waits and the figures are the cost of dispatching, not of
throttling.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine import BackpressureConfig, BackpressureError, Engine
from engine.events import Event

from ._common import (
    Measurement,
    Probe,
    Scenario,
    alternate,
    by_name,
    compare,
    median,
    now,
    row,
    settle,
    throughput,
)

ORDER = 20
"""The harness runs scenario modules by ascending ORDER."""

Handler = Callable[["Tick"], Awaitable[None]]


class Tick(Event, tag="bench.tick"):
    """The benchmark's event: the envelope plus one integer (the partition key)."""

    n: int


def _events(count: int) -> list[Tick]:
    """``count`` distinct valid events, built once and published by both sides."""
    return [Tick(n=i) for i in range(count)]


def _counting(probe: Probe) -> Handler:
    """The user's handler, the same function on both sides."""

    async def handle(event: Tick) -> None:
        probe.count += 1
        if probe.count == probe.target:
            probe.done.set()

    return handle


def _key(event: Tick) -> int:
    return event.n


def _max_depth(events: int) -> int:
    # The warning threshold (0.7 of max_depth) stays above the burst: the
    # state never leaves NORMAL, nothing is throttled.
    return max(100_000, 2 * events)


# --------------------------------------------------------------------- ours


def _ours(
    engine: Engine, events: Sequence[Tick], probe: Probe, deliveries: int
) -> Callable[[], Awaitable[float]]:
    """Publish a burst the way a user would: ``try_publish``, awaiting ``publish`` only
    when the engine says CRITICAL (it never does here: ``max_depth`` holds the burst)."""

    async def ours() -> float:
        probe.arm(deliveries)
        try_publish = engine.try_publish
        publish = engine.publish
        start = now()
        for event in events:
            try:
                try_publish(event)
            except BackpressureError:
                await publish(event)
        await probe.done.wait()
        return now() - start

    return ours


def _subscribe(
    engine: Engine,
    handle: Handler,
    *,
    subscriptions: int,
    capacity: int,
    partitions: int = 1,
) -> None:
    for i in range(subscriptions):
        engine.subscribe(
            Tick,
            handler=handle,
            name=f"bench-{i}",
            capacity=capacity,
            partitions=partitions,
            key=_key if partitions > 1 else None,
        )


# ---------------------------------------------------------------------- raw


async def _consume(
    receive: MemoryObjectReceiveStream[Tick],
    handle: Handler,
    *,
    task_status: TaskStatus[None],
) -> None:
    """One subscriber: drain the buffer without waiting, await only when it is empty."""
    task_status.started()
    receive_nowait = receive.receive_nowait
    with receive:
        while True:
            try:
                event = receive_nowait()
            except anyio.WouldBlock:
                try:
                    event = await receive.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            await handle(event)


def _raw(
    events: Sequence[Tick],
    probe: Probe,
    handle: Handler,
    *,
    streams: int,
    capacity: int,
    keyed: bool,
    deliveries: int,
) -> Callable[[], Awaitable[float]]:
    """Raw fan-out (every stream gets every event) or, ``keyed``, one stream per key hash."""

    async def raw() -> float:
        pairs = [anyio.create_memory_object_stream[Tick](capacity) for _ in range(streams)]
        sends: list[MemoryObjectSendStream[Tick]] = [send for send, _ in pairs]
        probe.arm(deliveries)
        async with anyio.create_task_group() as tg:
            for _, receive in pairs:
                await tg.start(_consume, receive, handle)
            await settle()
            nowait = [send.send_nowait for send in sends]
            count = len(sends)
            start = now()
            if keyed:
                for event in events:
                    index = hash(_key(event)) % count
                    try:
                        nowait[index](event)
                    except anyio.WouldBlock:
                        await sends[index].send(event)
            else:
                for event in events:
                    for index, send_nowait in enumerate(nowait):
                        try:
                            send_nowait(event)
                        except anyio.WouldBlock:
                            await sends[index].send(event)
            await probe.done.wait()
            elapsed = now() - start
            for send in sends:
                send.close()
        return elapsed

    return raw


# ---------------------------------------------------------------- scenarios


async def _compare(
    events: Sequence[Tick], repeats: int, *, subscriptions: int, partitions: int = 1
) -> tuple[int, list[float], list[float]]:
    """Deliveries per repetition, raw seconds, ours seconds."""
    n = len(events)
    deliveries = n * subscriptions
    probe = Probe()
    handle = _counting(probe)
    keyed = partitions > 1
    raw = _raw(
        events,
        probe,
        handle,
        streams=partitions if keyed else subscriptions,
        capacity=n,
        keyed=keyed,
        deliveries=deliveries,
    )
    async with Engine(backpressure=BackpressureConfig(max_depth=_max_depth(n))) as engine:
        _subscribe(engine, handle, subscriptions=subscriptions, capacity=n, partitions=partitions)
        ours = _ours(engine, events, probe, deliveries)
        raw_seconds, ours_seconds = await alternate(raw, ours, repeats)
        depth = engine.metrics().backpressure.depth
    if depth:  # pragma: no cover - a leaked slot would make every figure suspect
        raise AssertionError(f"backpressure depth is {depth} after the runs, expected 0")
    return deliveries, raw_seconds, ours_seconds


async def publish_1(n: int, repeats: int) -> Measurement:
    """N events published to one subscriber."""
    deliveries, raw_seconds, ours_seconds = await _compare(_events(n), repeats, subscriptions=1)
    return throughput(deliveries, raw_seconds, ours_seconds)


async def fanout_8(n: int, repeats: int) -> Measurement:
    """N events published to 8 subscriptions of their type: 8 N deliveries."""
    deliveries, raw_seconds, ours_seconds = await _compare(_events(n), repeats, subscriptions=8)
    return throughput(deliveries, raw_seconds, ours_seconds)


async def partitions_4(n: int, repeats: int) -> Measurement:
    """N events published to one subscription of 4 partitions, keyed by ``event.n``."""
    deliveries, raw_seconds, ours_seconds = await _compare(
        _events(n), repeats, subscriptions=1, partitions=4
    )
    return throughput(deliveries, raw_seconds, ours_seconds)


async def publish_1_otel(n: int, repeats: int) -> Measurement:
    """publish -> 1 subscriber with OpenTelemetry's API installed and no SDK (ours),
    beside the same engine with tracing switched off altogether (``OTEL_SDK_DISABLED``,
    read when an engine starts): what the API costs a publisher without an SDK."""
    events = _events(n)
    probe = Probe()
    handle = _counting(probe)
    config = BackpressureConfig(max_depth=_max_depth(n))
    os.environ["OTEL_SDK_DISABLED"] = "true"
    try:
        off = Engine(backpressure=config)
        await off.__aenter__()
    finally:
        del os.environ["OTEL_SDK_DISABLED"]
    try:
        async with Engine(backpressure=config) as api:
            for engine in (off, api):
                _subscribe(engine, handle, subscriptions=1, capacity=n)
            limit_seconds, ours_seconds = await alternate(
                _ours(off, events, probe, n), _ours(api, events, probe, n), repeats
            )
    finally:
        await off.__aexit__(None, None, None)
    return throughput(n, limit_seconds, ours_seconds)


SCALE_COUNTS = (8, 100, 1000)


async def fanout_scale(n: int, repeats: int) -> Measurement:
    """About ``n`` deliveries per repetition at 8, 100 and 1,000 subscriptions.

    The events per repetition are ``n // subscriptions``, so every count
    delivers the same total. The target is on ours alone: the cost of one
    delivery (ns) at 1,000 subscriptions over that at 8. Raw runs at the same
    counts, for reference.
    """
    events = _events(n // min(SCALE_COUNTS))
    rows: list[dict[str, Any]] = []
    ours_cost: dict[int, list[float]] = {}
    raw_cost: dict[int, list[float]] = {}
    for count in SCALE_COUNTS:
        deliveries, raw_seconds, ours_seconds = await _compare(
            events[: n // count], repeats, subscriptions=count
        )
        ours_cost[count] = [seconds / deliveries * 1e9 for seconds in ours_seconds]
        raw_cost[count] = [seconds / deliveries * 1e9 for seconds in raw_seconds]
        measured = throughput(deliveries, raw_seconds, ours_seconds)
        rows.append(
            row(
                f"fanout_scale @{count}",
                measured,
                "deliveries/s",
                subscriptions=count,
                events=n // count,
            )
        )
    low, high = SCALE_COUNTS[0], SCALE_COUNTS[-1]
    return compare(
        ours_cost[high],
        ours_cost[low],
        {
            "label": f"fanout_scale ns/delivery @{high} vs @{low}",
            "rows": rows,
            "limit_growth": median(raw_cost[high]) / median(raw_cost[low]),
        },
    )


SCENARIOS = by_name(
    Scenario(
        name="publish_1",
        run=publish_1,
        unit="deliveries/s",
        higher_is_better=True,
        target=0.35,  # issue 14
        n={"full": 100_000, "quick": 10_000, "smoke": 200},
    ),
    Scenario(
        name="publish_1_otel",
        run=publish_1_otel,
        unit="deliveries/s",
        higher_is_better=True,
        target=0.95,  # issue 15: the API without an SDK costs a publisher nothing
        n={"full": 100_000, "quick": 10_000, "smoke": 200},
    ),
    Scenario(
        name="fanout_8",
        run=fanout_8,
        unit="deliveries/s",
        higher_is_better=True,
        target=0.25,
        n={"full": 50_000, "quick": 5_000, "smoke": 100},
    ),
    Scenario(
        name="partitions_4",
        run=partitions_4,
        unit="deliveries/s",
        higher_is_better=True,
        target=0.3,  # issue 14
        n={"full": 100_000, "quick": 10_000, "smoke": 200},
    ),
    Scenario(
        name="fanout_scale",
        run=fanout_scale,
        unit="ns/delivery",
        higher_is_better=False,
        target=1.25,
        n={"full": 400_000, "quick": 40_000, "smoke": 2_000},
    ),
)
