"""Storage faults are not data faults: a locked, full or read-only database never loses
an event, never moves a position past an event that was neither applied nor stored as a
dead letter, and never dead-letters an event nobody's code failed on. One engine per
database file. All on real files, real processes and a real (small) file system.

The writer runs in a real worker thread and the faults come from other processes, so
these tests wait for what the engine does with ``until`` (a bounded poll); they assert
counts and states, never timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from engine import (
    BackpressureConfig,
    BackpressureError,
    Engine,
    EngineError,
    Event,
    StorageError,
    Transaction,
)
from engine._cli import main as cli
from tests.storage_faults import SmallDisk, engine_process, lock_held, release

pytestmark = pytest.mark.anyio


class Item(Event, tag="t11.item"):
    n: int
    note: str = ""


async def until(condition: Callable[[], object], what: str, *, limit: int = 3000) -> None:
    """Wait until ``condition()`` holds, polling (the faults come from other processes)."""
    for _ in range(limit):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"gave up waiting until {what}")


def query(path: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        rows: list[tuple[Any, ...]] = conn.execute(sql, args).fetchall()
        return rows


def project(tx: Transaction, event: Item) -> None:
    tx.conn.execute("CREATE TABLE IF NOT EXISTS projected (id TEXT, n INTEGER)")
    tx.conn.execute("INSERT INTO projected VALUES (?, ?)", (str(event.id), event.n))


def settled(engine: Engine, *names: str) -> bool:
    metrics = engine.metrics()
    return (
        metrics.backpressure.depth == 0
        and metrics.storage is not None
        and metrics.storage.pending_writes == 0
        and all(metrics.lag.get(name) == 0 for name in names)
    )


class Workload:
    """Events published the three ways a user can, with what each call answered."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n = 0
        self.accepted: list[Item] = []
        self.refused: list[Item] = []

    def next(self, note: str = "") -> Item:
        event = Item(n=self.n, note=note)
        self.n += 1
        return event

    def try_publish(self, count: int, note: str = "") -> None:
        for _ in range(count):
            event = self.next(note)
            self.engine.try_publish(event)
            self.accepted.append(event)

    async def publish(self) -> None:
        event = self.next()
        try:
            await self.engine.publish(event)
        except StorageError:
            self.refused.append(event)
            return
        self.accepted.append(event)

    async def transact(self) -> None:
        event = self.next()

        def write(tx: Transaction) -> None:
            tx.conn.execute("CREATE TABLE IF NOT EXISTS orders (n INTEGER)")
            tx.conn.execute("INSERT INTO orders VALUES (?)", (event.n,))
            tx.publish(event)

        try:
            await self.engine.transact(write)
        except StorageError:
            self.refused.append(event)
            return
        self.accepted.append(event)

    async def mixed(self, rounds: int) -> None:
        for _ in range(rounds):
            self.try_publish(2)
            await self.publish()
            await self.transact()


def check_history(path: str, work: Workload, failing: Callable[[int], bool]) -> None:
    """Nothing missing, nothing doubled, nothing dead-lettered for the storage."""
    accepted = {str(e.id): e.n for e in work.accepted}
    refused = {str(e.id) for e in work.refused}
    outbox = [row[0] for row in query(path, "SELECT id FROM outbox ORDER BY seq")]
    assert sorted(outbox) == sorted(accepted), "every accepted event committed, once"
    assert not refused & set(outbox), "a refused call committed nothing"
    orders = [row[0] for row in query(path, "SELECT n FROM orders")]
    assert len(orders) == len(set(orders))
    projected = [row[0] for row in query(path, "SELECT id FROM projected")]
    assert sorted(projected) == sorted(outbox), "the projection applied each event once"
    letters = query(path, "SELECT subscriber, seq, error FROM dead_letters ORDER BY seq")
    expected = sorted(n for n in accepted.values() if failing(n))
    assert [row[0] for row in letters] == ["mailer"] * len(expected)
    assert sorted(int(row[2].rpartition(" ")[2]) for row in letters) == expected
    assert all(row[2].startswith("ValueError: cannot mail") for row in letters)
    head = query(path, "SELECT max(seq) FROM outbox")[0][0]
    positions = dict(query(path, "SELECT subscriber, min(position) FROM tracking GROUP BY 1"))
    assert positions == {"mailer": head, "totals": head}


def fails(n: int) -> bool:
    return n % 5 == 0


class Mailer:
    """A subscription handler that fails on every fifth event, once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.handled: list[int] = []

    async def __call__(self, event: Item) -> None:
        if fails(event.n):
            await self.gate.wait()
            raise ValueError(f"cannot mail {event.n}")
        self.handled.append(event.n)


# ------------------------------------------------------- another process's lock


async def test_a_write_lock_held_by_another_process_loses_doubles_and_dead_letters_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "app.db")
    mailer = Mailer()
    caplog.set_level(logging.WARNING, "actorbus.store")
    async with Engine(path, storage_timeout=0.2) as engine:
        engine.project(Item, projector=project, name="totals")
        engine.subscribe(Item, handler=mailer, name="mailer", max_attempts=1)
        work = Workload(engine)
        await work.mixed(5)
        with lock_held(path) as holder:
            # Failures while the lock is held: their dead letters wait for it too.
            mailer.gate.set()
            while not work.refused:
                await work.mixed(1)  # an awaited call gives up after storage_timeout
            storage = engine.metrics().storage
            assert storage is not None
            assert not storage.available
            assert storage.pending_writes > 0
            work.try_publish(30)  # accepted into the writer's queue: committed later
            release(holder)
        await work.mixed(5)
        await until(lambda: settled(engine, "totals", "mailer"), "everything settled")
        storage = engine.metrics().storage
        assert storage is not None
        assert storage.available
        assert storage.outages == 1
        assert engine.dead_letters.count() == sum(fails(e.n) for e in work.accepted)
    check_history(path, work, fails)
    assert set(mailer.handled) == {e.n for e in work.accepted if not fails(e.n)}
    outage = [r.getMessage() for r in caplog.records if r.name == "actorbus.store"]
    assert len(outage) == 2, outage  # once when it began, once when it ended
    assert "cannot be written" in outage[0]
    assert "works again" in outage[1]


async def test_a_lock_shorter_than_the_busy_timeout_is_waited_out_inside_sqlite(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path) as engine:
        await engine.transact(lambda tx: tx.publish(Item(n=0)))
        with contextlib.closing(
            sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        ) as other:
            other.execute("BEGIN IMMEDIATE")
            timer = threading.Timer(0.2, lambda: other.execute("COMMIT"))
            timer.start()
            try:
                await engine.transact(lambda tx: tx.publish(Item(n=1)))
            finally:
                timer.join()
        storage = engine.metrics().storage
        assert storage is not None
        assert (storage.outages, storage.retries, storage.available) == (0, 0, True)


async def test_awaited_calls_raise_storage_error_after_storage_timeout_and_leave_no_trace(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path, storage_timeout=0.1) as engine:
        with lock_held(path) as holder:
            with pytest.raises(StorageError, match="stayed unwritable") as caught:
                await engine.transact(lambda tx: tx.publish(Item(n=1)))
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
            assert "locked" in str(caught.value)
            with pytest.raises(StorageError):
                await engine.publish(Item(n=2))
            with pytest.raises(StorageError):
                await engine.prune(older_than=0)
            release(holder)
        await engine.transact(lambda tx: tx.publish(Item(n=3)))
    assert [row[0] for row in query(path, "SELECT count(*) FROM outbox")] == [1]


async def test_writes_waiting_on_an_outage_are_bounded_and_an_awaited_call_gives_up(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")
    config = BackpressureConfig(max_depth=10)
    async with Engine(path, backpressure=config, storage_timeout=0.1) as engine:
        with lock_held(path) as holder:
            for n in range(10):
                engine.try_publish(Item(n=n))
            with pytest.raises(BackpressureError, match="10 writes waiting"):
                engine.try_publish(Item(n=10))
            with pytest.raises(StorageError, match="did not take this write"):
                await engine.transact(lambda tx: tx.publish(Item(n=11)))
            release(holder)
        await until(lambda: engine.metrics().outbox_head == 10, "the ten waiting commit")
    assert query(path, "SELECT count(*) FROM outbox") == [(10,)]


async def test_a_cancelled_call_held_back_by_an_outage_never_runs(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    ran: list[int] = []

    def write(tx: Transaction) -> None:
        ran.append(1)
        tx.publish(Item(n=1))

    async with Engine(path, storage_timeout=60) as engine:
        with lock_held(path) as holder:
            with anyio.move_on_after(0.05):
                await engine.transact(write)  # taken, rolled back by the lock, then withdrawn
            await until(lambda: engine.metrics().storage.available is False, "the outage")  # type: ignore[union-attr]
            attempts = len(ran)
            release(holder)
        await engine.transact(lambda tx: None)
        assert len(ran) == attempts
    assert query(path, "SELECT count(*) FROM outbox") == [(0,)]


async def test_an_engine_stopping_during_an_outage_logs_the_writes_it_could_not_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "app.db")
    caplog.set_level(logging.ERROR, "actorbus.store")
    with contextlib.ExitStack() as stack:
        async with Engine(path, shutdown_timeout=0.2) as engine:
            holder = stack.enter_context(lock_held(path))
            engine.try_publish(Item(n=1))
            await until(
                lambda: engine.metrics().storage.available is False,  # type: ignore[union-attr]
                "the outage",
            )
        # Left with the lock still held: the write is given up, and said so.
        release(holder)
    lost = [r.getMessage() for r in caplog.records if r.name == "actorbus.store"]
    assert len(lost) == 1, lost
    assert "1 writes not committed" in lost[0]
    assert "1 events" in lost[0]
    assert query(path, "SELECT count(*) FROM outbox") == [(0,)]


# ------------------------------------------------------------------ start-up


async def test_start_up_waits_out_a_lock_and_then_runs_the_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path):
        pass
    caplog.set_level(logging.WARNING, "actorbus.store")
    ran = []
    with lock_held(path) as holder:
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                async with Engine(path) as engine:
                    ran.append(engine)
                    await engine.transact(lambda tx: tx.publish(Item(n=1)))

            tg.start_soon(start)
            # Past one busy timeout: the engine says it waits for the lock.
            await until(lambda: caplog.records, "the engine reports the lock")
            assert ran == []
            release(holder)
    assert len(ran) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "locked" in messages[0]
    assert query(path, "SELECT count(*) FROM outbox") == [(1,)]


async def test_start_up_fails_with_one_storage_error_after_start_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path):
        pass
    ran = []
    with (
        lock_held(path),
        pytest.raises(StorageError, match=r"stayed unusable for 0\.1 s") as caught,
    ):
        async with Engine(path, start_timeout=0.1):
            ran.append(1)
    assert ran == []
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    async with Engine(path):  # the lock file was let go
        pass


async def test_a_cancelled_start_lets_go_of_the_database(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path):
        pass
    with lock_held(path) as holder:
        with anyio.move_on_after(0.2) as scope:
            async with Engine(path):
                pytest.fail("the engine started under the lock")
        assert scope.cancelled_caught
        release(holder)
    async with Engine(path) as engine:
        await engine.transact(lambda tx: None)


# ------------------------------------------------------- one engine per file


async def test_a_second_engine_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path) as first:
        with pytest.raises(StorageError, match=f"in use by another engine \\(pid {os.getpid()} "):
            async with Engine(path):
                pytest.fail("two engines ran on one file")
        await first.transact(lambda tx: tx.publish(Item(n=1)))  # the first is untouched
    async with Engine(path) as again:  # a stopped engine let go
        assert again.metrics().outbox_head == 1


async def test_an_engine_in_another_process_is_refused_until_it_dies_and_the_cli_works_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path) as engine:
        await engine.transact(lambda tx: tx.publish(Item(n=1)))
    with engine_process(path) as other:
        with pytest.raises(StorageError, match=f"in use by another engine \\(pid {other.pid} "):
            async with Engine(path):
                pytest.fail("two engines ran on one file")
        assert cli(["status", path]) == 0
        assert cli(["dead-letters", path, "list"]) == 0
        assert cli(["prune", path, "--older-than", "7d"]) == 0
        capsys.readouterr()
        other.kill()  # SIGKILL: the kernel drops its lock
    async with Engine(path) as engine:
        assert engine.metrics().outbox_head == 1


async def test_an_engine_that_left_normally_in_another_process_lets_the_next_start(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")
    with engine_process(path) as other:
        other.tell()
        other.expect("stopped")
    async with Engine(path):
        pass


# ----------------------------------------------------------------- dead letters


async def test_dead_letter_ids_come_from_sqlite_beside_rows_written_by_others(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")

    async def fail(event: Item) -> None:
        raise ValueError(f"cannot {event.n}")

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=fail, name="f", max_attempts=1)
        await engine.publish(Item(n=1))
        await until(lambda: engine.dead_letters.count() == 1, "the first dead letter")
        # Another tool writes a row while the engine runs: its id is taken.
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
            conn.execute(
                "INSERT INTO dead_letters (subscriber, encoding, reason, attempts, at) "
                "VALUES ('elsewhere', 'repr', 'failed', 1, 0)"
            )
        await engine.publish(Item(n=2))
        await until(lambda: engine.dead_letters.count() == 3, "the second, and the other row")
        mine = [letter.id for letter in engine.dead_letters.list() if letter.actor == "f"]
    rows = query(path, "SELECT id, subscriber FROM dead_letters ORDER BY id")
    assert [row[1] for row in rows] == ["f", "elsewhere", "f"]
    assert mine == [rows[0][0], rows[2][0]]


async def test_a_purge_beside_the_engine_shows_in_its_count_list_and_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "app.db")

    async def fail(event: Item) -> None:
        raise ValueError("no")

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=fail, name="f", max_attempts=1)
        await engine.publish(Item(n=1))
        await engine.publish(Item(n=2))
        await until(lambda: engine.dead_letters.count() == 2, "two dead letters")
        [first, _] = engine.dead_letters.list()
        assert cli(["dead-letters", path, "purge"]) == 0
        with pytest.raises(KeyError):
            await engine.dead_letters.replay(first.id)  # the row is gone: nothing replayed
        await until(lambda: engine.dead_letters.count() == 0, "the count follows the purge")
        assert engine.dead_letters.list() == []
        await engine.publish(Item(n=3))
        await until(lambda: engine.dead_letters.count() == 1, "a new dead letter counts")
    capsys.readouterr()


# ---------------------------------------------------------- what is opened


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_another_applications_database_is_refused_and_left_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "theirs.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
        conn.execute("PRAGMA user_version = 7")
    before = digest(path)
    with pytest.raises(StorageError, match="newer than this actorbus knows"):
        async with Engine(path):
            pass
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
        conn.execute("PRAGMA user_version = 1")
    before = digest(path)
    with pytest.raises(StorageError, match=r"not an actorbus database.*left unchanged"):
        async with Engine(path):
            pass
    assert digest(path) == before
    assert query(str(path), "PRAGMA journal_mode") == [("delete",)]
    assert listing(tmp_path) == ["theirs.db"]  # no -wal, no lock file


async def test_a_database_with_a_table_named_like_the_engines_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY)")
    before = digest(path)
    with pytest.raises(StorageError, match="tables named outbox"):
        async with Engine(path):
            pass
    assert digest(path) == before


async def test_an_application_database_without_a_schema_version_is_joined(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    async with Engine(path) as engine:
        await engine.transact(lambda tx: tx.conn.execute("INSERT INTO orders VALUES (1)"))
    assert query(str(path), "SELECT id FROM orders") == [(1,)]


def test_memory_databases_are_refused_clearly() -> None:
    for name in (":memory:", "file::memory:?cache=shared"):
        with pytest.raises(ValueError, match="the outbox needs a file"):
            Engine(name)


@pytest.mark.parametrize("name", ["storage_timeout", "start_timeout"])
def test_storage_timeouts_are_checked(name: str) -> None:
    bad: dict[str, Any] = {name: -1.0}
    with pytest.raises(ValueError, match=name):
        Engine("app.db", **bad)
    bad = {name: "5"}
    with pytest.raises(TypeError, match=name):
        Engine("app.db", **bad)
    if name == "storage_timeout":
        with pytest.raises(TypeError, match=name):
            Engine("app.db", storage_timeout=None)  # type: ignore[arg-type]


# ------------------------------------------------------------ a real small disk


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "disk", "32m")
    try:
        yield small
    finally:
        small.close()


async def test_a_full_disk_loses_doubles_and_dead_letters_nothing(disk: SmallDisk) -> None:
    path = str(disk.path / "app.db")
    mailer = Mailer()
    mailer.gate.set()
    async with Engine(path, storage_timeout=0.2) as engine:
        engine.project(Item, projector=project, name="totals")
        engine.subscribe(Item, handler=mailer, name="mailer", max_attempts=1)
        work = Workload(engine)
        await work.mixed(5)
        await until(lambda: settled(engine, "totals", "mailer"), "a first round settled")
        disk.fill()
        # Awaited calls until one meets the full disk (each waits for its own
        # commit, so what waits on the disk stays small), then writes handed
        # over while it is full: none may be lost.
        for _ in range(2000):
            await work.publish()
            if work.refused:
                break
        else:
            pytest.fail("no write met the full disk")
        work.try_publish(20)
        await work.mixed(2)
        disk.free()
        await work.mixed(3)
        await until(lambda: settled(engine, "totals", "mailer"), "everything settled")
        assert engine.dead_letters.count() == sum(fails(e.n) for e in work.accepted)
    check_history(path, work, fails)


async def test_a_read_only_database_is_refused_at_start_with_a_storage_error(
    disk: SmallDisk,
) -> None:
    path = str(disk.path / "app.db")
    async with Engine(path) as engine:
        await engine.publish(Item(n=0))
    with disk.read_only_file(path), pytest.raises(StorageError, match="readonly database"):
        async with Engine(path):
            pass
    # A read-only file system: not even the lock file can be made.
    disk.read_only(True)
    try:
        with pytest.raises(StorageError, match="Read-only file system"):
            async with Engine(path):
                pass
    finally:
        disk.read_only(False)
    assert query(path, "SELECT count(*) FROM outbox") == [(1,)]


async def test_a_write_that_faults_after_the_writer_stopped_fails_instead_of_waiting(
    tmp_path: Path,
) -> None:
    """A caller runs its own write in the writer's thread (nothing else pending); the
    engine stops meanwhile, beyond its shutdown timeout, and the write then meets a
    storage fault: with no writer left to retry it, the caller learns at once that
    nothing was committed, instead of waiting for ever."""
    path = str(tmp_path / "app.db")
    entered = threading.Event()
    go_on = threading.Event()
    outcome: list[BaseException] = []

    def stuck(tx: Transaction) -> None:
        entered.set()
        go_on.wait(30)
        # A real storage fault (SQLITE_BUSY, with its error code): another connection
        # cannot take the write lock this transaction holds.
        other = sqlite3.connect(path, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()

    async def call(engine: Engine) -> None:
        try:
            await engine.transact(stuck)
        except EngineError as exc:
            outcome.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with Engine(path, shutdown_timeout=0.1) as engine:
                tg.start_soon(call, engine)
                await anyio.to_thread.run_sync(entered.wait)
                # Let the write go on once the engine's stop has given up waiting for it.
                timer = threading.Timer(0.5, go_on.set)
                timer.start()
            timer.join()
    assert len(outcome) == 1
    assert "stopped before this write committed" in str(outcome[0])
    assert query(path, "SELECT count(*) FROM outbox") == [(0,)]
