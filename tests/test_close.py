"""``await subscription.close()``: unsubscribe, drain, stop; a durable one keeps its position."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from engine import Actor, ActorState, Engine, EngineError, Event

pytestmark = pytest.mark.anyio


class Item(Event, tag="t15.close.item"):
    n: int


def _recorder(seen: list[int], steps: int = 2) -> Any:
    async def handle(event: Item) -> None:
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        seen.append(event.n)

    return handle


def _positions(path: Path, name: str) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT partition, position FROM tracking WHERE subscriber = ? ORDER BY partition",
            (name,),
        ).fetchall()


# ----------------------------------------------------------------- in memory


async def test_close_drains_the_mailboxes_then_takes_no_more_events(
    actorbus_engine: Engine,
) -> None:
    engine = actorbus_engine
    seen: list[int] = []
    others: list[int] = []
    ref = engine.subscribe(Item, handler=_recorder(seen), name="closing", partitions=2)
    engine.subscribe(Item, handler=_recorder(others), name="staying")
    for n in range(50):
        engine.try_publish(Item(n=n))
    assert not ref.closed
    await ref.close()
    # Everything its mailboxes held was handled before close returned.
    assert sorted(seen) == list(range(50))
    assert ref.closed
    assert not ref.live
    assert [stats.state for stats in ref.statistics()] == [ActorState.STOPPED] * 2
    engine.try_publish(Item(n=50))
    await engine.idle()
    assert sorted(seen) == list(range(50))
    assert others == list(range(51))
    assert engine.metrics().backpressure.depth == 0
    assert engine.dead_letters.count() == 0
    # Its names are free again.
    again: list[int] = []
    engine.subscribe(Item, handler=_recorder(again), name="closing", partitions=2)
    engine.try_publish(Item(n=51))
    await engine.idle()
    assert again == [51]


class Journal(Actor):
    stopped: ClassVar[list[str]] = []

    async def receive(self, message: Any) -> None:
        await anyio.lowlevel.checkpoint()

    async def on_stop(self) -> None:
        Journal.stopped.append(self.ref.name)


async def test_close_stops_actor_handlers_through_on_stop(actorbus_engine: Engine) -> None:
    Journal.stopped = []
    ref = actorbus_engine.subscribe(Item, handler=Journal, name="journal", partitions=3)
    for n in range(9):
        await actorbus_engine.publish(Item(n=n))
    await ref.close()
    assert sorted(Journal.stopped) == ["journal#0", "journal#1", "journal#2"]
    assert [s.processed for s in ref.statistics()] != [0, 0, 0]
    assert sum(s.processed for s in ref.statistics()) == 9


async def test_close_with_a_timeout_cuts_short_and_dead_letters_what_is_left(
    actorbus_engine: Engine,
) -> None:
    engine = actorbus_engine
    entered = anyio.Event()
    cancelled: list[int] = []

    async def stuck(event: Item) -> None:
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(event.n)
            raise

    ref = engine.subscribe(Item, handler=stuck, name="stuck")
    for n in range(4):
        engine.try_publish(Item(n=n))
    await entered.wait()
    await ref.close(timeout=0.05)
    assert cancelled == [0]
    letters = engine.dead_letters.list()
    assert sorted((d.actor, d.reason, d.message.n) for d in letters) == [
        ("stuck", "stopped", n) for n in range(4)
    ]
    assert engine.metrics().backpressure.depth == 0


async def test_closing_twice_does_nothing_and_bad_timeouts_are_refused(
    actorbus_engine: Engine,
) -> None:
    ref = actorbus_engine.subscribe(Item, handler=_recorder([]), name="twice")
    for bad in (-1, math.nan, "soon"):
        with pytest.raises((TypeError, ValueError), match="timeout"):
            await ref.close(timeout=bad)  # type: ignore[arg-type]
    assert not ref.closed
    await ref.close()
    await ref.close()
    assert ref.closed


async def test_a_subscription_cannot_close_itself_from_its_handler(
    actorbus_engine: Engine,
) -> None:
    errors: list[BaseException] = []

    async def handle(event: Item) -> None:
        try:
            await ref.close()
        except EngineError as exc:
            errors.append(exc)

    ref = actorbus_engine.subscribe(Item, handler=handle, name="self-closing")
    actorbus_engine.try_publish(Item(n=1))
    await actorbus_engine.idle()
    [error] = errors
    assert "cannot close itself from its own handler" in str(error)
    assert not ref.closed


async def test_a_subscription_closed_before_the_engine_starts_never_runs() -> None:
    seen: list[int] = []
    engine = Engine()
    ref = engine.subscribe(Item, handler=_recorder(seen), name="early")
    await ref.close()
    async with engine:
        engine.try_publish(Item(n=1))
        await engine.idle()
        assert ref.partitions == []
        engine.subscribe(Item, handler=_recorder(seen), name="early")  # the name is free
        engine.try_publish(Item(n=2))
        await engine.idle()
    assert seen == [2]


async def test_close_after_the_engine_left_is_refused() -> None:
    async with Engine() as engine:
        ref = engine.subscribe(Item, handler=_recorder([]), name="late")
    with pytest.raises(EngineError, match="not running"):
        await ref.close()


# ------------------------------------------------------------------- durable


async def test_a_closed_durable_subscription_resumes_after_its_position(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    first: list[int] = []
    second: list[int] = []
    async with Engine(path) as engine:
        ref = engine.subscribe(Item, handler=_recorder(first), name="billing", partitions=2)
        for n in range(20):
            await engine.publish(Item(n=n))
        await engine.idle()
        await ref.close()
        head = engine.metrics().lag  # no longer followed
        assert "billing" not in head
        assert [position for _, position in _positions(path, "billing")] == [20, 20]
        for n in range(20, 30):
            await engine.publish(Item(n=n))
        await engine.idle()
        assert sorted(first) == list(range(20))
        engine.subscribe(Item, handler=_recorder(second), name="billing", partitions=2)
        await engine.idle()
    assert sorted(second) == list(range(20, 30))


async def test_durable_events_cut_short_by_a_close_timeout_come_again(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    gate = anyio.Event()
    entered = anyio.Event()
    handled: list[int] = []

    async def stuck(event: Item) -> None:
        entered.set()
        await gate.wait()
        handled.append(event.n)

    async with Engine(path) as engine:
        ref = engine.subscribe(Item, handler=stuck, name="slow")
        for n in range(3):
            await engine.publish(Item(n=n))
        await entered.wait()
        await ref.close(timeout=0.05)
        assert engine.dead_letters.count() == 0  # not dead letters: still in the outbox
        assert _positions(path, "slow") == [(0, 0)]
        gate.set()
        engine.subscribe(Item, handler=stuck, name="slow")
        await engine.idle()
    assert handled == [0, 1, 2]


async def test_close_during_a_catch_up_stops_it_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with Engine(path) as engine:

        def backlog(tx: Any) -> None:
            for n in range(3000):
                tx.publish(Item(n=n))

        await engine.transact(backlog)
    seen: list[int] = []
    under_way = anyio.Event()

    async def handle(event: Item) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(event.n)
        if len(seen) == 100:
            under_way.set()

    async with Engine(path) as engine:
        ref = engine.subscribe(Item, handler=handle, name="late", capacity=16)
        await under_way.wait()  # the catch-up is under way
        await ref.close()
        assert len(seen) < 3000
        stored = min(position for _, position in _positions(path, "late"))
        assert stored == len(seen)  # handled in order, one partition: the position follows
        await engine.idle()  # nothing more reaches it: its catch-up stopped with the close
        assert engine.dead_letters.count() == 0
        assert len(seen) == stored
        engine.subscribe(Item, handler=handle, name="late")
        await engine.idle()
    assert sorted(seen) == list(range(3000))


async def test_a_closed_projection_keeps_its_position_and_projects_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"

    def project(tx: Any, event: Item) -> None:
        tx.db["items"].insert({"n": event.n})

    async with Engine(path) as engine:
        ref = engine.project(Item, projector=project, name="items")
        for n in range(30):
            await engine.publish(Item(n=n))
        await engine.idle()  # committed events the relay has not dispatched would wait
        await ref.close()
        assert _positions(path, "items") == [(0, 30)]
        for n in range(30, 40):
            await engine.publish(Item(n=n))
        engine.project(Item, projector=project, name="items")
        await engine.idle()
    with sqlite3.connect(path) as conn:
        rows = [n for (n,) in conn.execute("SELECT n FROM items ORDER BY n")]
    assert rows == list(range(40))


class Held:
    """A subscription whose handler holds its first event until ``gate`` is set."""

    def __init__(self, engine: Engine, name: str, events: int) -> None:
        self.gate = anyio.Event()
        self.entered = anyio.Event()
        self.seen: list[int] = []
        self.ref = engine.subscribe(Item, handler=self.handle, name=name)
        for n in range(events):
            engine.try_publish(Item(n=n))

    async def handle(self, event: Item) -> None:
        self.entered.set()
        await self.gate.wait()
        self.seen.append(event.n)


async def test_concurrent_closes_wait_for_the_one_under_way(actorbus_engine: Engine) -> None:
    held = Held(actorbus_engine, "contended", 3)
    ref, gate, seen = held.ref, held.gate, held.seen
    await held.entered.wait()
    returned: list[int] = []

    async def close(caller: int) -> None:
        await ref.close()
        returned.append(caller)

    async with anyio.create_task_group() as tg:
        for caller in range(3):
            tg.start_soon(close, caller)
        await anyio.wait_all_tasks_blocked()
        assert ref.closed
        assert returned == []  # all wait for the drain
        gate.set()
    assert sorted(returned) == [0, 1, 2]
    assert seen == [0, 1, 2]
    assert actorbus_engine.dead_letters.count() == 0


async def test_a_cancelled_close_can_be_finished_by_closing_again(
    actorbus_engine: Engine,
) -> None:
    held = Held(actorbus_engine, "interrupted", 2)
    ref, gate, seen = held.ref, held.gate, held.seen
    await held.entered.wait()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ref.close()
    assert not ref.closed  # the caller gave up: closing again does the rest
    gate.set()
    await ref.close()
    assert ref.closed
    assert seen == [0, 1]
    assert [s.state for s in ref.statistics()] == [ActorState.STOPPED]
