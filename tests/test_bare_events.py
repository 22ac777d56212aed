"""Bare events: an in-memory event bound for one mailbox travels as itself.

Published while the dispatcher is idle and routed to exactly one partition,
an event is queued without a ``Delivery`` around it: nothing is made per
event. Its backpressure slot is still given back exactly once on every way
the event can end (handled, failed, dropped, stopped, shut down), and its
dead letters carry the subscription's name. A partition's ref takes nothing
from outside: everything in its mailbox is an event the engine counted.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from engine import (
    Actor,
    ActorState,
    BackpressureConfig,
    Engine,
    Event,
    Overflow,
)

pytestmark = pytest.mark.anyio


class Bare(Event, tag="t14.bare"):
    n: int


class Abort(Exception):
    """Leaves an engine block with an error: shutdown without draining."""


def _depth(engine: Engine) -> int:
    return engine.metrics().backpressure.depth


# ---------------------------------------------------------- nothing per event


@pytest.mark.parametrize("partitions", [1, 4])
async def test_a_burst_to_one_subscription_makes_no_object_per_event(partitions: int) -> None:
    count = 20_000
    events = [Bare(n=n) for n in range(count)]
    for event in events:
        event.validate()  # its validator is built once, before the count starts
    gate = anyio.Event()
    handled = 0

    async def held(event: Bare) -> None:
        nonlocal handled
        await gate.wait()
        handled += 1

    async with Engine(backpressure=BackpressureConfig(max_depth=4 * count)) as engine:
        engine.subscribe(
            Bare,
            handler=held,
            name="burst",
            capacity=count,
            partitions=partitions,
            key=(lambda event: event.n) if partitions > 1 else None,
        )
        await anyio.wait_all_tasks_blocked()
        try_publish = engine.try_publish
        gc.collect()
        before = sys.getallocatedblocks()
        for event in events:
            try_publish(event)
        grown = sys.getallocatedblocks() - before
        assert _depth(engine) == count
        # The mailboxes' own blocks (a deque block holds 64 items) and the wake-ups;
        # one object per event would be at least ``count`` blocks.
        assert grown < count // 10, grown
        gate.set()
    assert handled == count
    assert _depth(engine) == 0


# ------------------------------------------------- the slot, on every ending


class Failing(Actor):
    async def receive(self, message: Any) -> None:
        raise RuntimeError(f"cannot handle {message.n}")


async def _failing(event: Bare) -> None:
    raise RuntimeError(f"cannot handle {event.n}")


async def test_a_handled_bare_event_gives_its_slot_back() -> None:
    depths: list[int] = []
    async with Engine() as engine:

        async def handle(event: Bare) -> None:
            depths.append(_depth(engine))

        engine.subscribe(Bare, handler=handle, name="plain")
        for n in range(3):
            engine.try_publish(Bare(n=n))
        assert _depth(engine) == 3
        await anyio.wait_all_tasks_blocked()
        assert _depth(engine) == 0
    # Each event holds its slot while its handler runs.
    assert depths == [3, 2, 1]


@pytest.mark.parametrize("kind", ["function", "actor"])
async def test_a_bare_event_whose_handler_fails_is_dead_lettered_and_gives_its_slot_back(
    kind: str,
) -> None:
    handler: Any = _failing if kind == "function" else Failing
    async with Engine() as engine:
        engine.subscribe(Bare, handler=handler, name="failing", max_attempts=2)
        event = Bare(n=7)
        await engine.publish(event)
        with anyio.fail_after(10):
            while engine.dead_letters.count() == 0:
                await anyio.wait_all_tasks_blocked()
                await anyio.sleep(0.01)
        assert _depth(engine) == 0
        [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.message, letter.reason, letter.attempts) == (
        "failing",
        event,
        "failed",
        2,
    )
    assert "cannot handle 7" in (letter.error or "")


async def test_a_bare_event_dropped_by_a_full_mailbox_gives_its_slot_back() -> None:
    gate = anyio.Event()
    seen: list[int] = []

    async def slow(event: Bare) -> None:
        await gate.wait()
        seen.append(event.n)

    async with Engine() as engine:
        engine.subscribe(
            Bare, handler=slow, name="lossy", capacity=2, overflow=Overflow.DROP_OLDEST
        )
        for n in range(5):
            await engine.publish(Bare(n=n))
            await anyio.wait_all_tasks_blocked()
        # One in the handler, two queued; the two oldest queued were dropped for newer ones.
        letters = engine.dead_letters.list()
        assert [(d.actor, d.reason, d.message.n) for d in letters] == [
            ("lossy", "dropped", 1),
            ("lossy", "dropped", 2),
        ]
        assert _depth(engine) == 3
        gate.set()
        await anyio.wait_all_tasks_blocked()
        assert _depth(engine) == 0
    assert seen == [0, 3, 4]


async def test_bare_events_queued_in_a_stopped_partition_are_dead_lettered_with_their_slots() -> (
    None
):
    gate = anyio.Event()
    entered = anyio.Event()

    async def stuck(event: Bare) -> None:
        entered.set()
        await gate.wait()

    async with Engine() as engine:
        ref = engine.subscribe(Bare, handler=stuck, name="stopping")
        for n in range(4):
            engine.try_publish(Bare(n=n))
        with anyio.fail_after(10):
            await entered.wait()
        [partition] = ref.partitions
        async with anyio.create_task_group() as tg:
            tg.start_soon(partition.stop)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert partition.statistics().state is ActorState.STOPPED
        assert _depth(engine) == 0
        letters = engine.dead_letters.list()
    assert [(d.actor, d.reason, d.message.n) for d in letters] == [
        ("stopping", "stopped", n) for n in (1, 2, 3)
    ]


async def test_bare_events_cut_short_by_shutdown_are_dead_lettered_with_their_slots() -> None:
    gate = anyio.Event()
    entered = anyio.Event()

    async def stuck(event: Bare) -> None:
        entered.set()
        await gate.wait()

    with pytest.raises(Abort):
        async with Engine(shutdown_timeout=0.5) as engine:
            engine.subscribe(Bare, handler=stuck, name="stuck")
            for n in range(3):
                engine.try_publish(Bare(n=n))
            with anyio.fail_after(10):
                await entered.wait()
            raise Abort
    letters = engine.dead_letters.list()
    assert sorted((d.actor, d.reason, d.message.n) for d in letters) == [
        ("stuck", "shutdown", n) for n in range(3)
    ]
    assert _depth(engine) == 0


# ------------------------------------------------ a partition takes no tells


@asynccontextmanager
async def _partition() -> AsyncIterator[Any]:
    seen: list[Any] = []

    async def handle(event: Bare) -> None:
        seen.append(event)

    async with Engine() as engine:
        ref = engine.subscribe(Bare, handler=handle, name="closed-door")
        [partition] = ref.partitions
        await anyio.wait_all_tasks_blocked()  # its actor started
        yield partition
        await anyio.wait_all_tasks_blocked()
        assert seen == []
        assert _depth(engine) == 0


def _calls(partition: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
    async def try_tell() -> None:
        partition.try_tell(Bare(n=1))

    return {
        "try_tell": try_tell,
        "tell": lambda: partition.tell(Bare(n=1)),
        "ask": lambda: partition.ask(Bare(n=1)),
    }


@pytest.mark.parametrize("call", ["try_tell", "tell", "ask"])
async def test_a_partition_refuses_messages_told_from_outside(call: str) -> None:
    async with _partition() as partition:
        with pytest.raises(TypeError, match=r"'closed-door' is a subscription partition.*Bare"):
            await _calls(partition)[call]()
        assert partition.statistics().depth == 0


async def test_a_partition_ref_still_reports_and_stops() -> None:
    async with _partition() as partition:
        assert partition.name == "closed-door"
        assert partition.statistics().state is ActorState.RUNNING
        await partition.stop()
        assert partition.statistics().state is ActorState.STOPPED
