"""``engine.idle()``: publish, wait until nothing is in flight, assert — no polling.

And ``engine.forget(name)``: a retired durable subscription's stored positions go.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine import Engine, EngineError, Event

pytestmark = pytest.mark.anyio


class Job(Event, tag="t15.job"):
    n: int


class Unwatched(Event, tag="t15.unwatched"):
    n: int


def _slow_counter(seen: list[int], steps: int = 3) -> Any:
    async def handle(event: Job) -> None:
        for _ in range(steps):  # a handler that yields a few times
            await anyio.lowlevel.checkpoint()
        seen.append(event.n)

    return handle


# ---------------------------------------------------------------- in memory


async def test_idle_returns_once_every_published_event_was_handled(
    actorbus_engine: Engine,
) -> None:
    seen: list[int] = []
    other: list[int] = []
    engine = actorbus_engine  # the project's own pytest plugin (engine.testing)
    engine.subscribe(Job, handler=_slow_counter(seen), name="a", partitions=3, key=lambda e: e.n)
    engine.subscribe(Job, handler=_slow_counter(other, 7), name="b")
    for n in range(200):
        await engine.publish(Job(n=n))
    await engine.idle()
    assert sorted(seen) == list(range(200))
    assert other == list(range(200))
    assert engine.metrics().backpressure.depth == 0


async def test_idle_waits_for_retries_and_the_dead_letter() -> None:
    calls = 0

    async def flaky(event: Job) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("always")

    async with Engine() as engine:
        engine.subscribe(Job, handler=flaky, name="flaky", max_attempts=3)
        engine.try_publish(Job(n=1))
        await engine.idle()
        assert calls == 3
        assert engine.dead_letters.count() == 1
        assert engine.metrics().backpressure.depth == 0


async def test_idle_returns_at_once_when_nothing_was_published(actorbus_engine: Engine) -> None:
    actorbus_engine.subscribe(Job, handler=_slow_counter([]), name="quiet")
    with anyio.fail_after(5):
        await actorbus_engine.idle()
    await actorbus_engine.idle(timeout=0)


async def test_idle_with_a_timeout_names_what_is_still_in_flight() -> None:
    gate = anyio.Event()

    async def stuck(event: Job) -> None:
        await gate.wait()

    async with Engine() as engine:
        engine.subscribe(Job, handler=stuck, name="stuck")
        engine.try_publish(Job(n=1))
        engine.try_publish(Job(n=2))
        with pytest.raises(TimeoutError, match=r"not idle within 0.05 s: .*at work.*2 events"):
            await engine.idle(timeout=0.05)
        gate.set()
        await engine.idle()
        assert engine.metrics().backpressure.depth == 0


async def test_idle_from_inside_a_handler_is_refused() -> None:
    errors: list[BaseException] = []

    async def impatient(event: Job) -> None:
        try:
            await engine.idle()
        except EngineError as exc:
            errors.append(exc)

    async with Engine() as engine:
        engine.subscribe(Job, handler=impatient, name="impatient")
        engine.try_publish(Job(n=1))
        await engine.idle()
    [error] = errors
    assert "would wait for itself" in str(error)


@pytest.mark.parametrize("bad", [-1, math.nan, -math.inf, "1", True])
async def test_idle_refuses_a_bad_timeout(actorbus_engine: Engine, bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="timeout"):
        await actorbus_engine.idle(timeout=bad)


async def test_idle_outside_the_engine_is_refused() -> None:
    engine = Engine()
    with pytest.raises(EngineError, match="not running"):
        await engine.idle()
    async with engine:
        pass
    with pytest.raises(EngineError, match="not running"):
        await engine.idle()


# ----------------------------------------------------------------- durable


async def test_idle_waits_for_the_outbox_relay_subscriptions_and_projections(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    seen: list[int] = []

    def project(tx: Any, event: Job) -> None:
        tx.db["jobs"].insert({"n": event.n})

    async with Engine(path) as engine:
        engine.subscribe(Job, handler=_slow_counter(seen), name="handler", partitions=2)
        engine.project(Job, projector=project, name="jobs")
        for n in range(50):
            engine.try_publish(Job(n=n))  # background writes: not committed yet

        def write(tx: Any) -> None:
            for n in range(50, 60):
                tx.publish(Job(n=n))
            tx.publish(Unwatched(n=0))  # no subscription takes it

        await engine.transact(write)
        await engine.idle()
        assert sorted(seen) == list(range(60))
        assert engine.metrics().backpressure.depth == 0
        assert set(engine.metrics().lag.values()) == {0}
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (60,)


async def test_idle_waits_until_a_durable_dead_letter_is_stored(tmp_path: Path) -> None:
    async def failing(event: Job) -> None:
        raise RuntimeError(f"cannot {event.n}")

    async with Engine(tmp_path / "app.db") as engine:
        engine.subscribe(Job, handler=failing, name="failing", max_attempts=1)
        for n in range(5):
            await engine.publish(Job(n=n))
        await engine.idle()
        assert engine.dead_letters.count() == 5
        assert engine.metrics().backpressure.depth == 0
        assert engine.metrics().lag == {"failing": 0}


# ------------------------------------------------------------------ forget


async def _run_once(path: Path, name: str) -> None:
    async with Engine(path) as engine:
        engine.subscribe(Job, handler=_slow_counter([]), name=name, partitions=2)
        for n in range(3):
            await engine.publish(Job(n=n))
        await engine.idle()


async def test_forget_drops_a_retired_subscriptions_positions(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    await _run_once(path, "retired")
    async with Engine(path) as engine:
        for n in range(3, 5):
            await engine.publish(Job(n=n))  # after the retired subscription's positions
        await engine.idle()
        assert await engine.prune(older_than=0) == 3  # "retired" holds back the new two
        assert await engine.forget("retired") == 2
        with pytest.raises(KeyError, match="'retired'"):
            await engine.forget("retired")
        assert await engine.prune(older_than=0) == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM tracking").fetchone() == (0,)


async def test_forget_refuses_a_registered_subscription_and_bad_names(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    await _run_once(path, "running")
    async with Engine(path) as engine:
        engine.subscribe(Job, handler=_slow_counter([]), name="running", partitions=2)
        with pytest.raises(ValueError, match="'running' is registered"):
            await engine.forget("running")
        with pytest.raises(ValueError, match="engine's own"):
            await engine.forget("actorbus.cluster.forwarder")
        with pytest.raises(ValueError, match="empty or blank"):
            await engine.forget(" ")
        with pytest.raises(TypeError, match="name must be a str"):
            await engine.forget(3)  # type: ignore[arg-type]
        with pytest.raises(KeyError, match="'never'"):
            await engine.forget("never")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM tracking").fetchone() == (2,)


async def test_forget_needs_a_database(actorbus_engine: Engine) -> None:
    with pytest.raises(EngineError, match="forget needs a database"):
        await actorbus_engine.forget("anything")
