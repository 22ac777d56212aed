"""Backpressure with a database: the outbox relay takes one in-flight slot per committed
event it routes, publishers see the same states and refusals as in memory, and every slot
comes back — handled, dead-lettered, dropped, projected or cut short by shutdown. Also the
store's pragmas behind the durability promises: the busy timeout and ``synchronous``.

All on real SQLite files in ``tmp_path``. After a commit the relay routes the new events
asynchronously (from memory, or from the outbox in a worker thread), a lag the contract
allows: the tests wait it out with ``until`` on the dispatcher's public statistics, never
on the depth under test. A durable subscription takes live events only once it caught up
(events it catches up on hold no slot); ``go_live`` waits for that the same way.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio.testing

from engine import (
    BackpressureConfig,
    BackpressureError,
    BackpressureMetrics,
    BackpressureState,
    Engine,
    Event,
    Overflow,
)

pytestmark = pytest.mark.anyio

NORMAL, WARNING, CRITICAL = (
    BackpressureState.NORMAL,
    BackpressureState.WARNING,
    BackpressureState.CRITICAL,
)
# WARNING from 7, CRITICAL from 9; each is left one below its threshold (margin 1).
SMALL = BackpressureConfig(max_depth=10, hysteresis=0.1)
DISPATCHER = "actorbus.dispatcher"


class Job(Event, tag="t8.dbp.job"):
    n: int


class Unrouted(Event, tag="t8.dbp.unrouted"):
    """No subscription takes it."""

    n: int


class Probe(Event, tag="t8.dbp.probe"):
    """Published until the dispatcher routes one: the subscriptions taking it are live."""

    n: int


class ProbeB(Event, tag="t8.dbp.probe_b"):
    n: int


class Abort(Exception):
    """Leaves an engine block with an error: shutdown without draining."""


class Valve:
    """A subscription handler that lets probes through and finishes one job per token,
    so a test decides when the depth drops; ``open()`` lets every job through."""

    def __init__(self) -> None:
        self.tokens = anyio.Semaphore(0)
        self.opened = False
        self.handled: list[int] = []
        self.entered: list[int] = []

    async def __call__(self, event: Any) -> None:
        if isinstance(event, Probe | ProbeB):
            return
        self.entered.append(event.n)
        if not self.opened:
            await self.tokens.acquire()
        self.handled.append(event.n)

    async def finish(self, count: int) -> None:
        for _ in range(count):
            self.tokens.release()
        await anyio.wait_all_tasks_blocked()

    def open(self) -> None:
        self.opened = True
        # One handler task per partition waits at most.
        for _ in range(4):
            self.tokens.release()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "app.db")


def state(engine: Engine) -> BackpressureMetrics:
    return engine.metrics().backpressure


def routed(engine: Engine) -> int:
    return engine.metrics().actors[DISPATCHER].processed


def queued(engine: Engine, actor: str) -> int:
    return engine.metrics().actors[actor].depth


def head(engine: Engine) -> int:
    return engine.metrics().outbox_head


async def until(condition: Callable[[], bool], what: str, *, limit: int = 1000) -> None:
    """Wait out the relay's lag; on return ``condition()`` held with every task blocked."""
    for _ in range(limit):
        await anyio.wait_all_tasks_blocked()
        if condition():
            return
        await anyio.sleep(0.01)  # the relay may be reading the outbox in a worker thread
    raise AssertionError(f"gave up waiting until {what}")


async def routed_to(engine: Engine, count: int) -> None:
    """Wait until the dispatcher has routed ``count`` events since the engine started."""
    await until(lambda: routed(engine) >= count, f"the dispatcher routed {count} events")


async def go_live(engine: Engine, probe: type[Probe | ProbeB] = Probe) -> None:
    """Wait until the subscriptions taking ``probe`` caught up and take live events.

    Until then the relay passes an event no live subscription takes, without a slot,
    and the catch-up delivers it. The relay hands a probe to the dispatcher only when a
    live subscription takes it (each probe is routed or passed before the next one).
    """
    for n in range(500):
        before = routed(engine)
        await engine.publish(probe(n=n))
        await anyio.wait_all_tasks_blocked()
        if routed(engine) > before:
            return
    raise AssertionError("the subscription never went live")


async def fill(engine: Engine, first: int, last: int) -> None:
    """Publish jobs ``first..last`` and wait until the relay routed each of them."""
    target = routed(engine) + last - first + 1
    for n in range(first, last + 1):
        await engine.publish(Job(n=n))
    await routed_to(engine, target)


async def writes_committed(engine: Engine) -> None:
    """Return once every write queued so far (dead letters, projections) has committed:
    the writer commits in order, and a call returns after its own commit."""
    await engine.transact(lambda tx: None)


def count_rows(path: str, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        value: int = conn.execute(sql).fetchone()[0]
        return value


# ------------------------------------------------------------- depth and states


async def test_each_committed_event_routed_to_a_subscription_takes_a_slot_until_handled(
    path: str,
) -> None:
    valve = Valve()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="slow")
    async with engine:
        await go_live(engine)
        base = state(engine)
        assert (base.depth, base.state) == (0, NORMAL)
        start = routed(engine)
        expected = {n: NORMAL for n in range(1, 7)} | {7: WARNING, 8: WARNING, 9: CRITICAL}
        for n in range(1, 10):
            await engine.publish(Job(n=n))
            await routed_to(engine, start + n)
            bp = state(engine)
            assert (bp.depth, bp.state) == (n, expected[n]), f"after job {n}"
            if n == 3:
                # No subscription takes it: passed at once, holding no slot (the next
                # job is routed after it and finds the depth at 4).
                await engine.publish(Unrouted(n=0))
        assert valve.entered == [1]  # the rest wait in the mailbox, each holding its slot
        assert queued(engine, "slow") == 8
        # Leaving a state takes the depth one below its threshold.
        for depth, after in [(8, WARNING), (7, WARNING), (6, NORMAL), (0, NORMAL)]:
            await valve.finish(state(engine).depth - depth)
            bp = state(engine)
            assert (bp.depth, bp.state) == (depth, after)
        assert valve.handled == list(range(1, 10))
        assert bp.accepted - base.accepted == 9
        assert bp.transitions - base.transitions == 4  # up to WARNING, CRITICAL and back
        assert bp.peak_depth == 9
        assert bp.rejected == 0


async def test_events_of_a_rolled_back_transaction_take_no_slot(path: str) -> None:
    valve = Valve()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="slow")

    def publish_then_fail(tx: Any) -> None:
        tx.publish(Job(n=1))
        raise Abort

    async with engine:
        await go_live(engine)
        base = state(engine)
        start = routed(engine)
        with pytest.raises(Abort):
            await engine.transact(publish_then_fail)
        await engine.transact(lambda tx: tx.publish(Job(n=2)))
        await routed_to(engine, start + 1)
        assert state(engine).depth == 1
        assert state(engine).accepted - base.accepted == 1
        valve.open()
        await anyio.wait_all_tasks_blocked()
        assert state(engine).depth == 0
    assert valve.handled == [2]


async def test_events_committed_while_critical_wait_in_the_outbox_for_a_slot(path: str) -> None:
    valve = Valve()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="slow")
    async with engine:
        await go_live(engine)
        start = routed(engine)
        await fill(engine, 1, 9)
        assert state(engine).state is CRITICAL
        committed = head(engine)
        # transact does not wait for backpressure; the relay does, before routing.
        await engine.transact(lambda tx: [tx.publish(Job(n=n)) for n in range(10, 15)])
        assert head(engine) == committed + 5
        await anyio.wait_all_tasks_blocked()
        assert state(engine).depth == 9
        assert routed(engine) == start + 9
        # One finished: CRITICAL is left at 8 and the relay takes the freed slot.
        await valve.finish(1)
        await routed_to(engine, start + 10)
        bp = state(engine)
        assert (bp.depth, bp.state) == (9, CRITICAL)
        assert valve.entered == [1, 2]
        valve.open()
        await routed_to(engine, start + 14)
        bp = state(engine)
        assert (bp.depth, bp.state, bp.peak_depth) == (0, NORMAL, 9)
    assert valve.handled == list(range(1, 15))


# ------------------------------------------------------------- publishers


async def test_try_publish_is_refused_while_critical_and_each_refusal_is_counted(
    path: str,
) -> None:
    valve = Valve()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="slow")
    async with engine:
        await go_live(engine)
        await fill(engine, 1, 9)
        before = state(engine)
        committed = head(engine)
        for n in (10, 11):
            with pytest.raises(BackpressureError, match=r"CRITICAL: 9 of 10"):
                engine.try_publish(Job(n=n))
        # A refused event is never written: the next commit holds nothing of it.
        await writes_committed(engine)
        assert head(engine) == committed
        bp = state(engine)
        assert (bp.depth, bp.state) == (9, CRITICAL)
        assert bp.rejected - before.rejected == 2
        assert bp.accepted == before.accepted
        await valve.finish(1)  # out of CRITICAL at 8: accepted again
        engine.try_publish(Job(n=12))
        valve.open()
    assert valve.handled == [*range(1, 10), 12]
    assert state(engine).depth == 0


async def test_try_publish_is_refused_when_the_writer_has_max_depth_writes_waiting(
    path: str,
) -> None:
    received: list[int] = []

    async def record(event: Job) -> None:
        received.append(event.n)

    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, handler=record, name="s")
    async with engine:
        before = state(engine).rejected
        accepted = 0
        # Nothing yields in between, so the writer has committed none of them yet.
        with pytest.raises(BackpressureError, match="10 writes waiting"):
            for n in range(SMALL.max_depth + 1):
                engine.try_publish(Job(n=n))
                accepted += 1
        assert 1 <= accepted <= SMALL.max_depth
        assert state(engine).rejected - before == 1
    assert received == list(range(accepted))
    assert state(engine).depth == 0


async def test_publish_waits_while_critical_without_a_slot_then_gets_in(path: str) -> None:
    valve = Valve()
    published = anyio.Event()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="slow")

    async def publish_job_10() -> None:
        await engine.publish(Job(n=10))
        published.set()

    async with anyio.create_task_group() as tg, engine:
        await go_live(engine)
        await fill(engine, 1, 9)
        committed = head(engine)
        start = routed(engine)
        tg.start_soon(publish_job_10)
        await anyio.wait_all_tasks_blocked()
        # Waiting: not committed, and no slot taken for it.
        assert not published.is_set()
        assert head(engine) == committed
        assert state(engine).depth == 9
        await valve.finish(1)
        with anyio.fail_after(10):
            await published.wait()
        await routed_to(engine, start + 1)
        bp = state(engine)
        assert (bp.depth, bp.state, bp.rejected) == (9, CRITICAL, 0)
        valve.open()
    assert valve.handled == list(range(1, 11))
    assert state(engine).depth == 0


# ------------------------------------------------------------- slots on every path


async def test_failed_durable_events_give_their_slots_back_while_the_engine_runs(
    path: str,
) -> None:
    last_attempt = anyio.Event()
    calls: list[int] = []

    async def always_fails(event: Any) -> None:
        if isinstance(event, Probe):
            return
        calls.append(event.n)
        if calls.count(5) == 2:
            last_attempt.set()
        raise ValueError(f"cannot take job {event.n}")

    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=always_fails, name="fails", max_attempts=2)
    async with engine:
        await go_live(engine)
        base = state(engine)
        for n in range(1, 6):
            await engine.publish(Job(n=n))
        with anyio.fail_after(10):
            await last_attempt.wait()
        await anyio.wait_all_tasks_blocked()  # the dead letter follows the last attempt
        await writes_committed(engine)  # and is stored
        bp = state(engine)
        assert (bp.depth, bp.state) == (0, NORMAL)
        assert bp.accepted - base.accepted == 5
        letters = engine.dead_letters.list()
        assert [(d.message.n, d.reason, d.attempts) for d in letters] == [
            (n, "failed", 2) for n in range(1, 6)
        ]


@pytest.mark.parametrize(
    ("overflow", "dropped", "kept"),
    [(Overflow.DROP_NEWEST, 3, [1, 2]), (Overflow.DROP_OLDEST, 2, [1, 3])],
)
async def test_a_durable_event_a_dropping_subscription_sheds_gives_its_slot_back(
    path: str, overflow: Overflow, dropped: int, kept: list[int]
) -> None:
    valve = Valve()
    engine = Engine(path, backpressure=SMALL)
    engine.subscribe(Job, Probe, handler=valve, name="small", capacity=1, overflow=overflow)
    async with engine:
        await go_live(engine)
        base = state(engine)
        await fill(engine, 1, 1)  # in progress
        await fill(engine, 2, 3)  # one queued, one over capacity
        await writes_committed(engine)  # the dropped one is stored as a dead letter
        [letter] = [d for d in engine.dead_letters.list() if isinstance(d.message, Job)]
        assert (letter.actor, letter.reason, letter.message.n) == ("small", "dropped", dropped)
        assert letter.seq is not None
        bp = state(engine)
        assert (bp.depth, bp.accepted - base.accepted) == (2, 3)
        valve.open()
        await anyio.wait_all_tasks_blocked()
        assert state(engine).depth == 0
    assert valve.handled == kept


async def test_a_projection_gives_each_slot_back_once_its_transaction_committed(
    path: str,
) -> None:
    def add(tx: Any, event: Any) -> None:
        if isinstance(event, Probe):
            return
        if event.n % 3 == 0:
            raise ValueError(f"cannot project job {event.n}")
        tx.conn.execute("INSERT INTO projected (n) VALUES (?)", (event.n,))

    # Room for every event: the relay never waits, so one commit after the last
    # publish covers every projection write.
    engine = Engine(path, backpressure=BackpressureConfig(max_depth=100))
    engine.project(Job, Probe, projector=add, name="totals", max_attempts=2)
    async with engine:
        await engine.transact(lambda tx: tx.conn.execute("CREATE TABLE projected (n INTEGER)"))
        await go_live(engine)
        await writes_committed(engine)  # the probes' projection
        base = state(engine)
        assert base.depth == 0
        start = routed(engine)
        for n in range(1, 21):
            await engine.publish(Job(n=n))
        await routed_to(engine, start + 20)  # each is in the projection's hands
        await writes_committed(engine)
        bp = state(engine)
        assert (bp.depth, bp.state) == (0, NORMAL)
        assert bp.accepted - base.accepted == 20
        letters = engine.dead_letters.list()
        assert sorted(d.message.n for d in letters) == [3, 6, 9, 12, 15, 18]
    assert count_rows(path, "SELECT count(*) FROM projected") == 14


# ------------------------------------------------------------- shutdown


@pytest.mark.parametrize("layout", ["one subscription", "two subscriptions", "dispatcher held"])
async def test_durable_deliveries_cut_short_by_an_error_exit_give_their_slots_back(
    path: str, layout: str
) -> None:
    first, second = Valve(), Valve()
    engine = Engine(path, backpressure=SMALL)
    if layout == "dispatcher held":
        # Capacity 1: job 1 in progress, job 2 queued, the dispatcher waits with job 3
        # and job 4 waits in the dispatcher's mailbox.
        engine.subscribe(Job, Probe, handler=first, name="a", capacity=1)
    else:
        engine.subscribe(Job, Probe, handler=first, name="a")
    if layout == "two subscriptions":
        engine.subscribe(Job, ProbeB, handler=second, name="b")
    with pytest.raises(Abort):
        async with engine:
            await go_live(engine)
            if layout == "two subscriptions":
                await go_live(engine, ProbeB)
            if layout == "dispatcher held":
                for n in range(1, 5):
                    await engine.publish(Job(n=n))
                await until(lambda: queued(engine, DISPATCHER) == 1, "job 4 waits for job 3")
            else:
                await fill(engine, 1, 4)
            assert state(engine).depth == 4
            assert first.entered == [1]
            if layout == "two subscriptions":
                assert second.entered == [1]
            raise Abort
    bp = state(engine)
    assert (bp.depth, bp.state) == (0, NORMAL)
    # Durable: not dead-lettered; the positions stay before them for the next run.
    assert engine.dead_letters.count() == 0
    assert first.handled == []


class TestOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_publish_raises_backpressure_error_when_its_timeout_runs_out(
        self, path: str
    ) -> None:
        valve = Valve()
        engine = Engine(path, backpressure=SMALL)
        engine.subscribe(Job, Probe, handler=valve, name="slow")
        async with engine:
            await go_live(engine)
            await fill(engine, 1, 9)
            before = state(engine)
            committed = head(engine)
            start = anyio.current_time()
            with pytest.raises(BackpressureError, match="CRITICAL"):
                await engine.publish(Job(n=10), timeout=30)
            assert anyio.current_time() - start == pytest.approx(30)
            with pytest.raises(BackpressureError):
                await engine.publish(Job(n=11), timeout=0)
            assert anyio.current_time() - start == pytest.approx(30)
            await writes_committed(engine)
            assert head(engine) == committed  # neither was written
            bp = state(engine)
            assert (bp.depth, bp.state) == (9, CRITICAL)
            assert bp.rejected - before.rejected == 2
            assert bp.accepted == before.accepted
            valve.open()
        assert valve.handled == list(range(1, 10))
        assert state(engine).depth == 0

    async def test_durable_deliveries_cut_short_by_the_shutdown_timeout_give_their_slots_back(
        self, path: str
    ) -> None:
        valve = Valve()
        engine = Engine(path, backpressure=SMALL, shutdown_timeout=3)
        engine.subscribe(Job, Probe, handler=valve, name="stuck")
        async with engine:
            await go_live(engine)
            await fill(engine, 1, 5)
            assert state(engine).depth == 5
            start = anyio.current_time()
        assert round(anyio.current_time() - start, 6) >= 3  # the drain waited its timeout out
        bp = state(engine)
        assert (bp.depth, bp.state) == (0, NORMAL)
        assert engine.dead_letters.count() == 0
        assert valve.handled == []


# ------------------------------------------------------------- the store's pragmas


async def test_transact_waits_for_a_write_lock_another_connection_holds(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="actorbus.store")
    async with Engine(path) as engine:
        await engine.transact(lambda tx: tx.conn.execute("CREATE TABLE notes (text TEXT)"))
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        released = threading.Event()

        def release() -> None:
            other.execute("COMMIT")
            released.set()

        # Held for a while by another writer (another process would do the same).
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO notes (text) VALUES ('written by the other connection')")
        timer = threading.Timer(0.3, release)
        timer.start()
        try:

            def read_then_write(tx: Any) -> list[str]:
                rows = [r[0] for r in tx.conn.execute("SELECT text FROM notes")]
                tx.conn.execute("INSERT INTO notes (text) VALUES ('written by the engine')")
                return rows

            seen = await engine.transact(read_then_write)
        finally:
            timer.join()
            other.close()
        # It began only once the lock was free: it saw the other writer's row.
        assert released.is_set()
        assert seen == ["written by the other connection"]
    assert count_rows(path, "SELECT count(*) FROM notes") == 2
    # SQLite's busy timeout waited it out: the engine saw no storage fault to report.
    assert [r.getMessage() for r in caplog.records if r.name == "actorbus.store"] == []


@pytest.mark.parametrize(
    ("durability", "level"),
    [(None, 2), ("full", 2), ("normal", 1)],
    ids=["default", "full", "normal"],
)
async def test_synchronous_follows_durability_on_the_writer(
    path: str, durability: Any, level: int
) -> None:
    engine = Engine(path) if durability is None else Engine(path, durability=durability)
    async with engine:
        synchronous = await engine.transact(
            lambda tx: tx.conn.execute("PRAGMA synchronous").fetchone()[0]
        )
    assert synchronous == level  # 2 is FULL, 1 is NORMAL
