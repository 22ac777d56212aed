"""System events: the engine's own state changes, subscribed to like any event,
in memory only, and never able to slow or stop the engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine import (
    Actor,
    ActorRestarted,
    BackpressureConfig,
    BackpressureStateChanged,
    BreakerStateChanged,
    CircuitBreakerConfig,
    CircuitOpenError,
    DeadLettered,
    Engine,
    Event,
    SystemEvent,
)

pytestmark = pytest.mark.anyio


class Work(Event, tag="t15.system.work"):
    n: int


def _collector(seen: list[Any]) -> Any:
    async def handle(event: Any) -> None:
        seen.append(event)

    return handle


async def _fail() -> None:
    raise ConnectionError("dependency down")


# -------------------------------------------------------------------- each kind


async def test_a_breaker_that_opens_and_closes_says_so(actorbus_engine: Engine) -> None:
    engine = actorbus_engine
    seen: list[BreakerStateChanged] = []
    engine.subscribe(BreakerStateChanged, handler=_collector(seen), name="watch")
    breaker = engine.breaker("payments", CircuitBreakerConfig(failure_threshold=2))
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
    with pytest.raises(CircuitOpenError):
        await breaker.call(_fail)
    await breaker.reset()
    await engine.idle()
    assert [(e.breaker, e.old, e.new) for e in seen] == [
        ("payments", "closed", "open"),
        ("payments", "open", "closed"),
    ]


async def test_backpressure_states_are_announced_with_their_depth() -> None:
    seen: list[BackpressureStateChanged] = []
    gate = anyio.Event()

    async def slow(event: Work) -> None:
        await gate.wait()

    config = BackpressureConfig(max_depth=10)
    async with Engine(backpressure=config) as engine:
        engine.subscribe(BackpressureStateChanged, handler=_collector(seen), name="watch")
        engine.subscribe(Work, handler=slow, name="slow", capacity=20)
        for n in range(9):
            engine.try_publish(Work(n=n))
        gate.set()
        await engine.idle()
    moves = [(e.old, e.new) for e in seen]
    assert moves[:2] == [("normal", "warning"), ("warning", "critical")]
    assert moves[-1][1] == "normal"
    assert [e.depth for e in seen[:2]] == [config.warning_depth, config.critical_depth]


class Fragile(Actor):
    async def receive(self, message: Any) -> None:
        if message == "boom":
            raise RuntimeError("boom")


async def test_a_restarted_actor_is_announced_with_its_reason(actorbus_engine: Engine) -> None:
    seen: list[ActorRestarted] = []
    actorbus_engine.subscribe(ActorRestarted, handler=_collector(seen), name="watch")
    ref = await actorbus_engine.spawn(Fragile, name="fragile", max_attempts=1)
    await ref.tell("boom")
    await actorbus_engine.idle()
    assert [(e.actor, e.reason) for e in seen] == [("fragile", "RuntimeError: boom")]


async def _always_fails(event: Work) -> None:
    raise ValueError(f"cannot {event.n}")


@pytest.mark.parametrize("durable", [False, True])
async def test_a_dead_letter_is_announced_once_recorded(tmp_path: Path, durable: bool) -> None:
    seen: list[DeadLettered] = []
    async with Engine(tmp_path / "app.db" if durable else None) as engine:
        engine.subscribe(DeadLettered, handler=_collector(seen), name="watch")
        engine.subscribe(Work, handler=_always_fails, name="failing", max_attempts=1)
        await engine.publish(Work(n=1))
        await engine.idle()
        [letter] = engine.dead_letters.list()
    assert [(e.actor, e.reason, e.dead_letter_id) for e in seen] == [
        ("failing", "failed", letter.id)
    ]


# ---------------------------------------------------------------------- rules


async def test_a_subscription_to_event_does_not_get_system_events(
    actorbus_engine: Engine,
) -> None:
    everything: list[Any] = []
    system: list[Any] = []
    actorbus_engine.subscribe(Event, handler=_collector(everything), name="all")
    actorbus_engine.subscribe(SystemEvent, handler=_collector(system), name="system")
    actorbus_engine.subscribe(Work, handler=_always_fails, name="failing", max_attempts=1)
    await actorbus_engine.publish(Work(n=1))
    await actorbus_engine.idle()
    assert [type(e) for e in everything] == [Work]
    assert [type(e) for e in system] == [DeadLettered]


async def test_system_event_subscriptions_are_refused_where_they_cannot_hold(
    tmp_path: Path,
) -> None:
    async with Engine(tmp_path / "app.db") as engine:
        with pytest.raises(ValueError, match="a subscription of their own"):
            engine.subscribe(Work, DeadLettered, handler=_always_fails, name="mixed")
        with pytest.raises(ValueError, match="cannot be projected"):
            engine.project(DeadLettered, projector=lambda tx, e: None, name="p")
        system = DeadLettered(actor="x", reason="failed", dead_letter_id=1)
        with pytest.raises(TypeError, match="system events are published by the engine"):
            engine.try_publish(system)
        with pytest.raises(TypeError, match="system events are published by the engine"):
            await engine.publish(system)
        with pytest.raises(TypeError, match=r"tx\.publish refuses BreakerStateChanged"):
            await engine.transact(
                lambda tx: tx.publish(BreakerStateChanged(breaker="b", old="closed", new="open"))
            )


async def test_system_events_never_reach_the_outbox_or_its_positions(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    seen: list[Any] = []
    async with Engine(path) as engine:
        engine.subscribe(SystemEvent, handler=_collector(seen), name="watch")
        engine.subscribe(Work, handler=_always_fails, name="failing", max_attempts=1)
        await engine.publish(Work(n=1))
        await engine.idle()
        assert "watch" not in engine.metrics().lag
    assert [type(e) for e in seen] == [DeadLettered]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT type FROM outbox").fetchall() == [("t15.system.work",)]
        names = {name for (name,) in conn.execute("SELECT subscriber FROM tracking")}
    assert names == {"failing"}


async def test_a_lagging_subscriber_loses_its_oldest_counted(actorbus_engine: Engine) -> None:
    engine = actorbus_engine
    gate = anyio.Event()
    seen: list[BreakerStateChanged] = []

    async def slow(event: BreakerStateChanged) -> None:
        await gate.wait()
        seen.append(event)

    engine.subscribe(BreakerStateChanged, handler=slow, name="slow", capacity=2)
    breaker = engine.breaker("flappy")
    for _ in range(5):
        await breaker.force_open()
        await breaker.reset()
    # Ten changes: one in the handler, the newest two queued, seven dropped.
    assert engine.metrics().system_events_dropped == 7
    assert engine.metrics().backpressure.depth == 0
    gate.set()
    await engine.idle()
    assert [(e.old, e.new) for e in seen] == [
        ("closed", "open"),
        ("closed", "open"),
        ("open", "closed"),
    ]


async def test_a_failing_system_subscriber_does_not_feed_itself(actorbus_engine: Engine) -> None:
    calls: list[Any] = []

    async def broken(event: Any) -> None:
        calls.append(event)
        raise RuntimeError("watcher is broken")

    class Broken(Actor):
        async def receive(self, message: Any) -> None:
            calls.append(message)
            raise RuntimeError("watcher actor is broken")

    actorbus_engine.subscribe(SystemEvent, handler=broken, name="broken", max_attempts=1)
    actorbus_engine.subscribe(SystemEvent, handler=Broken, name="broken-actor", max_attempts=1)
    actorbus_engine.subscribe(Work, handler=_always_fails, name="failing", max_attempts=1)
    await actorbus_engine.publish(Work(n=1))
    await actorbus_engine.idle()
    # One DeadLettered (for "failing"), to each watcher; their own failures make no more.
    assert [type(e) for e in calls] == [DeadLettered, DeadLettered]
    assert sorted(d.actor for d in actorbus_engine.dead_letters.list()) == [
        "broken",
        "broken-actor",
        "failing",
    ]
