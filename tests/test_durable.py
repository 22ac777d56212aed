"""``Engine("app.db")``: the durable outbox, group commit, relay, subscriptions, projections,
dead letters, schema growth, pruning and shutdown — on real SQLite files in ``tmp_path``.

The writer runs in a real worker thread, so these tests wait for what it does with
``until`` (a bounded poll of a condition); they never assert timings.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from uuid import uuid4

import anyio
import msgspec
import pytest

from engine import (
    ActorStopped,
    Engine,
    EngineError,
    Event,
    EventValidationError,
    TransactionControlRefused,
)
from engine._durable import _poll as poll_outbox
from engine._routing import stable_hash
from engine._store import StorageError, Store, Transaction, TransactionEnded, read_outbox
from engine.events import encode

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------- events


class Item(Event, tag="t5.item"):
    n: int
    key: str = ""


class Other(Event, tag="t5.other"):
    n: int


class Checked(Event, tag="t5.checked"):
    n: Annotated[int, msgspec.Meta(ge=0)]


class Grown(Event, tag="t5.grown"):
    """A newer version of an event: ``note`` was added with a default."""

    n: int
    note: str = "none"


class Boom(Exception):
    """Raised by a transact function: its work rolls back."""


Handler = Callable[[Any], Awaitable[None]]


# ---------------------------------------------------------------------- helpers


async def until(condition: Callable[[], object], what: str, *, limit: int = 2000) -> None:
    """Wait until ``condition()`` holds, polling (the writer is a real thread)."""
    for _ in range(limit):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"gave up waiting until {what}")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "app.db")


def is_file(path: str) -> bool:
    return Path(path).is_file()


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def listing(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def query(path: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        rows: list[tuple[Any, ...]] = conn.execute(sql, args).fetchall()
        return rows


def scalar(path: str, sql: str, args: tuple[Any, ...] = ()) -> Any:
    return query(path, sql, args)[0][0]


def execute(path: str, sql: str, args: tuple[Any, ...] = ()) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        conn.execute(sql, args)


def outbox_ids(path: str) -> list[str]:
    """Event ids in the outbox, in seq order."""
    return [row[0] for row in query(path, "SELECT id FROM outbox ORDER BY seq")]


def seq_of(path: str, event: Event) -> int:
    seq: int = scalar(path, "SELECT seq FROM outbox WHERE id = ?", (str(event.id),))
    return seq


def positions(path: str, name: str) -> list[int]:
    return [
        row[0]
        for row in query(
            path, "SELECT position FROM tracking WHERE subscriber = ? ORDER BY partition", (name,)
        )
    ]


async def live(engine: Engine, name: str) -> None:
    """Wait until the durable subscription ``name`` caught up and takes live events."""
    await until(lambda: engine._bus.router.subscriptions[name].live, f"{name!r} is live")


def store_of(engine: Engine) -> Store:
    """The engine's database (a private part: these tests count its batches)."""
    outbox = engine._outbox
    assert outbox is not None
    return outbox.store


def head_reached(engine: Engine, seq: int) -> Callable[[], bool]:
    return lambda: engine.metrics().outbox_head >= seq


def has(log: list[Any], count: int) -> Callable[[], bool]:
    return lambda: len(log) >= count


def ids(events: list[Any]) -> list[str]:
    return [str(event.id) for event in events]


def numbers(events: list[Any]) -> list[int]:
    return [event.n for event in events]


def recorder(log: list[Any]) -> Handler:
    async def handle(event: Any) -> None:
        log.append(event)

    return handle


def insert_raw(path: str, type_: str, payload: bytes, event_id: str | None = None) -> None:
    """Append an outbox row as another writer (or an older version) would have."""
    execute(
        path,
        "INSERT INTO outbox (id, type, tenant_id, payload, created_at) "
        "VALUES (?, ?, NULL, ?, strftime('%s', 'now'))",
        (event_id or str(uuid4()), type_, payload),
    )


def insert_event(path: str, event: Event) -> None:
    insert_raw(path, type(event).event_type, encode(event), str(event.id))


async def create_schema(path: str) -> None:
    async with Engine(path):
        pass


def create_table(sql: str) -> Callable[[Transaction], None]:
    def fn(tx: Transaction) -> None:
        tx.conn.execute(sql)

    return fn


# ---------------------------------------------------------------------- opening


async def test_opening_creates_a_wal_database_with_the_schema(path: str) -> None:
    async with Engine(path) as engine:
        assert engine.database == path
    assert is_file(path)
    assert scalar(path, "PRAGMA journal_mode") == "wal"
    assert scalar(path, "PRAGMA user_version") == 1
    tables = {row[0] for row in query(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"outbox", "tracking", "dead_letters"} <= tables


async def test_reopening_keeps_what_was_committed(path: str) -> None:
    first = Item(n=1)
    async with Engine(path) as engine:
        await engine.publish(first)
    async with Engine(path) as engine:
        await engine.publish(Item(n=2))
        assert engine.metrics().outbox_head == 2
    assert scalar(path, "PRAGMA user_version") == 1
    assert outbox_ids(path)[0] == str(first.id)
    assert len(outbox_ids(path)) == 2


async def test_a_newer_schema_version_is_refused(path: str) -> None:
    await create_schema(path)
    execute(path, "PRAGMA user_version = 2")
    with pytest.raises(StorageError, match="newer") as info:
        async with Engine(path):
            pass
    assert isinstance(info.value, EngineError)
    assert scalar(path, "PRAGMA user_version") == 2


async def test_a_path_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "app.db"
    with pytest.raises(StorageError, match="no directory"):
        async with Engine(missing):
            pass
    assert listing(tmp_path) == []  # nothing created


async def test_a_pathlib_path_works(tmp_path: Path) -> None:
    target = tmp_path / "app.db"
    async with Engine(target) as engine:
        assert engine.database == str(target)
        await engine.publish(Item(n=1))
    assert len(outbox_ids(str(target))) == 1


async def test_a_file_that_is_no_database_or_a_directory_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    write_bytes(garbage, b"not a database" * 100)
    for target in (garbage, tmp_path):
        with pytest.raises(StorageError, match="cannot open database"):
            async with Engine(target):
                pass


def test_an_empty_path_is_refused() -> None:
    with pytest.raises(ValueError, match="file path"):
        Engine("")


# ---------------------------------------------------------------------- transact


async def test_transact_returns_the_function_result(path: str) -> None:
    async with Engine(path) as engine:
        assert await engine.transact(lambda tx: 42) == 42
        assert await engine.transact(lambda tx: tx.conn.execute("SELECT 7").fetchone()[0]) == 7


async def test_transact_commits_the_domain_write_and_the_event_together(path: str) -> None:
    event = Item(n=1)

    def place(tx: Transaction) -> int:
        tx.db.table("orders").insert({"id": 1, "total": 1250}, pk="id")
        return tx.publish(event)

    async with Engine(path) as engine:
        seq = await engine.transact(place)
        # Both are visible to another connection once transact returned.
        assert query(path, "SELECT id, total FROM orders") == [(1, 1250)]
        assert seq_of(path, event) == seq


async def test_transact_rolls_back_both_when_the_function_raises(path: str) -> None:
    raised: list[Boom] = []
    received: list[Any] = []

    def fail(tx: Transaction) -> None:
        tx.conn.execute("INSERT INTO notes (n) VALUES (1)")
        tx.publish(Item(n=1))
        error = Boom("no")
        raised.append(error)
        raise error

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        with pytest.raises(Boom) as info:
            await engine.transact(fail)
        assert info.value is raised[0]
        await engine.publish(Item(n=2))
        await until(lambda: received, "the later event is delivered")
    assert query(path, "SELECT * FROM notes") == []
    assert numbers(received) == [2]
    assert len(outbox_ids(path)) == 1


async def test_an_invalid_event_in_tx_publish_rolls_back_everything(path: str) -> None:
    def publish_invalid(tx: Transaction) -> None:
        tx.conn.execute("INSERT INTO notes (n) VALUES (1)")
        tx.publish(Item(n=1))
        tx.publish(Checked(n=-1))

    async with Engine(path) as engine:
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        with pytest.raises(EventValidationError) as info:
            await engine.transact(publish_invalid)
        assert info.value.field == "n"
    assert query(path, "SELECT * FROM notes") == []
    assert outbox_ids(path) == []


async def test_tx_publish_of_a_non_event_is_a_type_error(path: str) -> None:
    async with Engine(path) as engine:
        with pytest.raises(TypeError, match="Event"):
            await engine.transact(lambda tx: tx.publish({"n": 1}))  # type: ignore[arg-type]
    assert outbox_ids(path) == []


async def test_transact_refuses_async_and_non_callable_functions(path: str) -> None:
    async def coroutine_fn(tx: Transaction) -> None:
        pass

    async with Engine(path) as engine:
        with pytest.raises(TypeError, match="coroutine"):
            await engine.transact(coroutine_fn)  # type: ignore[unused-coroutine]
        with pytest.raises(TypeError, match="function"):
            await engine.transact(42)  # type: ignore[arg-type]


async def test_transact_needs_a_database() -> None:
    async with Engine() as engine:
        with pytest.raises(EngineError, match="database"):
            await engine.transact(lambda tx: None)


async def test_transact_after_the_engine_exited_is_refused(path: str) -> None:
    async with Engine(path) as engine:
        pass
    with pytest.raises(EngineError, match="not running"):
        await engine.transact(lambda tx: None)


async def test_a_transact_called_in_a_cancelled_scope_never_runs(path: str) -> None:
    # It checks for cancellation before handing the call to the writer (trio's rule:
    # an operation that raises Cancelled had no effect).
    called: list[int] = []
    received: list[Item] = []
    event = Item(n=1)

    def fn(tx: Transaction) -> None:
        called.append(1)
        tx.conn.execute("INSERT INTO notes (n) VALUES (1)")
        tx.publish(event)

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await engine.transact(fn)
        assert scope.cancelled_caught
        await engine.publish(Item(n=2))  # the next batch
        await until(lambda: len(received) == len(outbox_ids(path)), "everything is delivered")
    assert not called
    assert query(path, "SELECT n FROM notes") == []
    assert numbers(received) == [2]


async def test_a_transact_cancelled_while_its_function_runs_still_commits(path: str) -> None:
    running = threading.Event()
    proceed = threading.Event()
    received: list[Item] = []
    event = Item(n=1)

    def fn(tx: Transaction) -> None:
        tx.publish(event)
        running.set()
        proceed.wait(10)

    async def call(engine: Engine, scope: anyio.CancelScope) -> None:
        with scope:
            await engine.transact(fn)

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, engine, scope)
            await until(running.is_set, "the function runs in the writer thread")
            scope.cancel()  # the caller gives up; the commit is not cancellable
            proceed.set()
        await until(lambda: received, "the committed event is delivered")
    assert scope.cancelled_caught
    assert outbox_ids(path) == [str(event.id)]
    assert received == [event]


# ---------------------------------------------------------------------- group commit


async def test_group_commit_rolls_back_only_the_failing_calls(path: str) -> None:
    made: dict[int, Boom] = {}
    results: dict[int, int] = {}
    errors: dict[int, BaseException] = {}
    received: list[Any] = []

    def work(n: int) -> Callable[[Transaction], int]:
        def fn(tx: Transaction) -> int:
            tx.conn.execute("INSERT INTO notes (n) VALUES (?)", (n,))
            tx.publish(Item(n=n))
            if n % 7 == 0:
                made[n] = Boom(n)
                raise made[n]
            return n * 10

        return fn

    async def call(engine: Engine, n: int) -> None:
        try:
            results[n] = await engine.transact(work(n))
        except Boom as exc:
            errors[n] = exc

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        store = store_of(engine)
        before = store.batches
        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(call, engine, n)
        batches = store.batches - before
    failing = {n for n in range(200) if n % 7 == 0}
    committed = set(range(200)) - failing
    assert set(errors) == failing
    assert all(errors[n] is made[n] for n in failing)
    assert results == {n: n * 10 for n in committed}
    assert sorted(row[0] for row in query(path, "SELECT n FROM notes")) == sorted(committed)
    assert len(outbox_ids(path)) == len(committed)
    assert sorted(numbers(received)) == sorted(committed)
    assert batches < 200  # calls shared commits


ENDING_STATEMENTS: dict[str, Callable[[sqlite3.Connection, str], object]] = {
    "COMMIT": lambda conn, savepoint: conn.execute("COMMIT"),
    "commit()": lambda conn, savepoint: conn.commit(),
    "ROLLBACK": lambda conn, savepoint: conn.execute("ROLLBACK"),
    "rollback()": lambda conn, savepoint: conn.rollback(),
    "BEGIN": lambda conn, savepoint: conn.execute("BEGIN"),
    "executescript": lambda conn, savepoint: conn.executescript("SELECT 1"),
    "RELEASE engine savepoint": lambda conn, savepoint: conn.execute(f"RELEASE {savepoint}"),
    "ROLLBACK TO engine savepoint": (
        lambda conn, savepoint: conn.execute(f"ROLLBACK TO {savepoint}")
    ),
}


def engine_savepoint(engine: Engine) -> str:
    """The name of the engine's savepoint around each call of a batch (private)."""
    name = getattr(store_of(engine), "_savepoint", "actorbus_call")
    assert isinstance(name, str)
    return name


def refused(error: BaseException) -> bool:
    """The engine refused the statement, or SQLite's authorizer denied it."""
    if isinstance(error, TransactionControlRefused):
        return True
    chain = [error, error.__cause__]
    return any(isinstance(e, sqlite3.DatabaseError) and "not authorized" in str(e) for e in chain)


@pytest.mark.parametrize(
    "statement",
    list(ENDING_STATEMENTS),
)
async def test_a_function_may_not_end_the_shared_transaction(path: str, statement: str) -> None:
    end = ENDING_STATEMENTS[statement]
    received: list[Item] = []

    savepoint = ""

    def rogue(tx: Transaction) -> None:
        tx.conn.execute("INSERT INTO notes (n) VALUES (-1)")
        tx.publish(Item(n=-1))
        end(tx.conn, savepoint)

    def good(n: int) -> Callable[[Transaction], None]:
        def fn(tx: Transaction) -> None:
            tx.conn.execute("INSERT INTO notes (n) VALUES (?)", (n,))
            tx.publish(Item(n=n))

        return fn

    def failing(tx: Transaction) -> None:
        raise Boom

    failures: list[BaseException] = []

    async def call(engine: Engine, fn: Callable[[Transaction], None]) -> None:
        try:
            await engine.transact(fn)
        except Exception as exc:
            failures.append(exc)

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        await live(engine, "s")
        savepoint = engine_savepoint(engine)
        # A first batch with a failing call: the engine has run its own savepoint
        # statements (RELEASE and ROLLBACK TO) before the rogue's batch.
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, engine, good(0))
            tg.start_soon(call, engine, failing)
            tg.start_soon(call, engine, good(1))
        assert len(failures) == 1
        failures.clear()
        async with anyio.create_task_group() as tg:
            for n in range(2, 6):
                tg.start_soon(call, engine, good(n))
            tg.start_soon(call, engine, rogue)
            for n in range(6, 10):
                tg.start_soon(call, engine, good(n))
        await until(lambda: len(received) >= 10, "the committed events are delivered")
    assert len(failures) == 1
    assert refused(failures[0]), repr(failures[0])
    assert sorted(row[0] for row in query(path, "SELECT n FROM notes")) == list(range(10))
    assert ids(received) == outbox_ids(path)
    assert sorted(numbers(received)) == list(range(10))


# What a function does after catching the error of the statement that ended the
# transaction: SQLite would run it in autocommit mode, committed on its own.
AFTER_THE_END: dict[str, Callable[[Transaction], object] | None] = {
    "raises": None,
    "execute": lambda tx: tx.conn.execute("INSERT INTO guarded (n) VALUES (1000)"),
    "cursor": lambda tx: tx.conn.cursor().execute("INSERT INTO guarded (n) VALUES (1000)"),
    "db": lambda tx: tx.db.table("guarded").insert({"n": 1000}),
    "publish": lambda tx: tx.publish(Item(n=1000)),
}


@pytest.mark.parametrize("after", list(AFTER_THE_END))
async def test_a_statement_that_destroys_the_transaction_fails_alone(path: str, after: str) -> None:
    received: list[Any] = []
    then = AFTER_THE_END[after]

    def insert(n: int) -> Callable[[Transaction], int]:
        def fn(tx: Transaction) -> int:
            try:
                tx.conn.execute("INSERT INTO guarded (n) VALUES (?)", (n,))
            except sqlite3.IntegrityError:
                if then is None:
                    raise
                then(tx)  # the transaction ended: this must not commit on its own
            tx.publish(Item(n=n))
            return n

        return fn

    failures: dict[int, BaseException] = {}
    results: dict[int, int] = {}

    async def call(engine: Engine, n: int) -> None:
        try:
            results[n] = await engine.transact(insert(n))
        except Exception as exc:
            failures[n] = exc

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(create_table("CREATE TABLE guarded (n INTEGER)"))
        await engine.transact(
            create_table(
                "CREATE TRIGGER guard BEFORE INSERT ON guarded WHEN NEW.n = 13 "
                "BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
            )
        )
        async with anyio.create_task_group() as tg:
            for n in range(30):
                tg.start_soon(call, engine, n)
    expected = [n for n in range(30) if n != 13]
    assert set(failures) == {13}
    assert isinstance(failures[13], TransactionEnded)
    assert results == {n: n for n in expected}
    rows = query(path, "SELECT n, count(*) FROM guarded GROUP BY n ORDER BY n")
    assert rows == [(n, 1) for n in expected]
    assert len(outbox_ids(path)) == len(expected)
    assert sorted(numbers(received)) == expected


# ---------------------------------------------------------------------- order


async def test_concurrent_writers_give_readers_no_gaps_and_no_reordering(path: str) -> None:
    single: list[Item] = []
    partitioned: list[Item] = []  # each partition appends in the order it handles its events

    def partition(key: str) -> int:
        return stable_hash(key) % 3

    async def writer(engine: Engine, w: int) -> None:
        for i in range(15):
            events = [
                Item(n=w * 1000 + i * 10 + j, key=f"k{(w + j) % 5}") for j in range(1 + i % 3)
            ]

            def fn(tx: Transaction, events: list[Item] = events) -> None:
                for event in events:
                    tx.publish(event)

            if i % 4 == 3:
                await engine.publish(events[0])
            else:
                await engine.transact(fn)

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(single), name="all")
        engine.subscribe(
            Item,
            handler=recorder(partitioned),
            name="keyed",
            partitions=3,
            key=lambda event: event.key,
        )
        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(writer, engine, w)
        total = len(outbox_ids(path))
        await until(lambda: len(single) == total, "every event reached 'all'")
    order = outbox_ids(path)
    assert ids(single) == order
    keys = dict(query(path, "SELECT id, json_extract(payload, '$.key') FROM outbox"))
    assert sorted(ids(partitioned)) == sorted(order)
    for p in range(3):
        handled = [event for event in partitioned if partition(event.key) == p]
        assert ids(handled) == [i for i in order if partition(keys[i]) == p]


# ---------------------------------------------------------------------- relay


async def test_a_subscriber_gets_every_committed_event_once_in_seq_order(path: str) -> None:
    received: list[Item] = []
    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        for n in range(20):
            await engine.publish(Item(n=n))
        await engine.transact(lambda tx: [tx.publish(Item(n=n)) for n in range(20, 40)])
        for n in range(40, 60):
            engine.try_publish(Item(n=n))
        await until(lambda: len(received) == 60, "all 60 are delivered")
    assert ids(received) == outbox_ids(path)
    assert numbers(received) == list(range(60))


async def test_publish_returns_after_the_commit(path: str) -> None:
    async with Engine(path) as engine:
        for n in range(5):
            event = Item(n=n)
            await engine.publish(event)
            assert query(path, "SELECT count(*) FROM outbox WHERE id = ?", (str(event.id),)) == [
                (1,)
            ]


async def test_try_publish_commits_shortly_after(path: str) -> None:
    async with Engine(path) as engine:
        event = Item(n=1)
        engine.try_publish(event)
        await until(lambda: str(event.id) in outbox_ids(path), "the event is committed")


async def test_events_of_rolled_back_transactions_are_never_delivered(path: str) -> None:
    received: list[Item] = []

    def fail(tx: Transaction) -> None:
        tx.publish(Item(n=-1))
        raise Boom

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        for n in range(10):
            with pytest.raises(Boom):
                await engine.transact(fail)
            await engine.publish(Item(n=n))
        await until(lambda: len(received) == 10, "the committed events are delivered")
    assert numbers(received) == list(range(10))
    assert ids(received) == outbox_ids(path)


async def test_an_event_another_process_appends_is_delivered(path: str) -> None:
    await create_schema(path)
    received: list[Item] = []
    event = Item(n=7)
    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.publish(Item(n=1))
        await until(lambda: len(received) == 1, "the first event is delivered")
        await live(engine, "s")  # from now on only the relay delivers
        insert_event(path, event)  # another process, sharing the database
        # The housekeeping polls the outbox about every second; once it has seen the new
        # head the relay is awake and the delivery follows at once.
        await until(lambda: engine.metrics().outbox_head == 2, "the poll saw the new head")
        await until(lambda: len(received) == 2, "the other process's event is delivered", limit=200)
    assert ids(received)[1] == str(event.id)


# ---------------------------------------------------------------------- durable subscriptions


async def test_a_subscription_resumes_after_a_clean_restart(path: str) -> None:
    first: list[Item] = []
    second: list[Item] = []
    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(first), name="s")
        for n in range(5):
            await engine.publish(Item(n=n))
        await until(lambda: len(first) == 5, "run 1 delivered")
    assert positions(path, "s") == [5]
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(second), name="s")
    async with engine:
        for n in range(5, 8):
            await engine.publish(Item(n=n))
        await until(lambda: len(second) == 3, "run 2 delivered")
    assert numbers(first) == [0, 1, 2, 3, 4]
    assert numbers(second) == [5, 6, 7]
    assert positions(path, "s") == [8]


async def test_a_new_subscription_catches_up_from_the_oldest_event_then_goes_live(
    path: str,
) -> None:
    old: list[Item] = []
    new: list[Item] = []
    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(old), name="old")
        for n in range(10):
            await engine.publish(Item(n=n))
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(old), name="old")
    engine.subscribe(Item, handler=recorder(new), name="new")
    async with engine:
        await until(lambda: len(new) == 10, "'new' caught up")
        for n in range(10, 15):
            await engine.publish(Item(n=n))
        await until(lambda: len(new) == 15, "'new' got the live events")
    assert numbers(new) == list(range(15))
    assert ids(new) == outbox_ids(path)
    assert numbers(old) == list(range(15))


async def test_a_subscription_added_while_events_are_written_gets_each_once(path: str) -> None:
    late: dict[int, list[Item]] = {}
    thresholds = [0, 40, 120, 200, 280]

    async def writer(engine: Engine, w: int) -> None:
        for i in range(20):
            batch = [Item(n=w * 100 + i * 3 + j) for j in range(3)]

            def fn(tx: Transaction, batch: list[Item] = batch) -> None:
                for event in batch:
                    tx.publish(event)

            await engine.transact(fn)

    async with Engine(path) as engine:
        async with anyio.create_task_group() as tg:
            for w in range(6):
                tg.start_soon(writer, engine, w)
            for threshold in thresholds:
                await until(head_reached(engine, threshold), f"{threshold} events committed")
                late[threshold] = []
                engine.subscribe(Item, handler=recorder(late[threshold]), name=f"late{threshold}")
        total = len(outbox_ids(path))
        assert total == 6 * 20 * 3
        for threshold, log in late.items():
            await until(has(log, total), f"late{threshold} has everything")
    order = outbox_ids(path)
    for log in late.values():
        assert ids(log) == order


async def test_partitioned_subscription_keeps_order_per_key(path: str) -> None:
    received: dict[str, list[Item]] = collections.defaultdict(list)
    seen: list[tuple[str, str]] = []

    async def handle(event: Item) -> None:
        received[event.key].append(event)
        seen.append((event.key, str(event.id)))

    async with Engine(path) as engine:
        await engine.transact(
            lambda tx: [tx.publish(Item(n=n, key=f"k{n % 5}")) for n in range(30)]
        )
        engine.subscribe(Item, handler=handle, name="p", partitions=4, key=lambda e: e.key)
        for n in range(30, 60):
            engine.try_publish(Item(n=n, key=f"k{n % 5}"))
        await until(lambda: len(seen) == 60, "every event is delivered")
    for key, events in received.items():
        assert numbers(events) == [n for n in range(60) if f"k{n % 5}" == key]
    assert len(set(seen)) == 60
    assert len(positions(path, "p")) == 4


async def test_changing_the_partition_count_still_delivers_everything(path: str) -> None:
    first: list[Item] = []
    second: list[Item] = []

    def key(event: Item) -> str:
        return event.key

    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(first), name="s", partitions=2, key=key)
    async with engine:
        for n in range(20):
            await engine.publish(Item(n=n, key=f"k{n % 4}"))
        await until(lambda: len(first) == 20, "run 1 delivered")
    async with Engine(path) as engine:  # without the subscription: it falls behind
        for n in range(20, 30):
            await engine.publish(Item(n=n, key=f"k{n % 4}"))
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(second), name="s", partitions=3, key=key)
    async with engine:
        await until(lambda: set(range(20, 30)) <= set(numbers(second)), "run 3 delivered")
    assert set(range(20, 30)) <= set(numbers(second))
    assert len(ids(second)) == len(set(ids(second)))
    for k in range(4):
        got = [n for n in numbers(second) if n % 4 == k]
        assert got == sorted(got)
    assert positions(path, "s") == [30, 30, 30]


# ---------------------------------------------------------------------- projections


def project_into_table(tx: Transaction, event: Item) -> None:
    tx.conn.execute("INSERT INTO projected (n) VALUES (?)", (event.n,))


async def test_a_projection_applies_each_event_exactly_once(path: str) -> None:
    async with Engine(path) as engine:
        await engine.transact(create_table("CREATE TABLE projected (n INTEGER)"))
        engine.project(Item, projector=project_into_table, name="p")
        for n in range(10):
            await engine.publish(Item(n=n))
        await engine.transact(lambda tx: [tx.publish(Item(n=n)) for n in range(10, 20)])
        await until(
            lambda: scalar(path, "SELECT count(*) FROM projected") == 20, "20 rows projected"
        )
        assert positions(path, "p") == [20]
    engine = Engine(path)
    engine.project(Item, projector=project_into_table, name="p")
    async with engine:
        for n in range(20, 25):
            await engine.publish(Item(n=n))
        await until(lambda: positions(path, "p") == [25], "the projection reached the head")
    rows = query(path, "SELECT n, count(*) FROM projected GROUP BY n ORDER BY n")
    assert rows == [(n, 1) for n in range(25)]
    assert query(path, "SELECT partition, position, kind FROM tracking WHERE subscriber = 'p'") == [
        (0, 25, "projection")
    ]


async def test_a_failing_projector_is_dead_lettered_and_replayed_once(path: str) -> None:
    calls: collections.Counter[int] = collections.Counter()
    broken = True

    def projector(tx: Transaction, event: Item) -> None:
        calls[event.n] += 1
        tx.conn.execute("INSERT INTO projected (n) VALUES (?)", (event.n,))
        if event.n == 3 and broken:
            raise ValueError("cannot project 3")

    async with Engine(path) as engine:
        await engine.transact(create_table("CREATE TABLE projected (n INTEGER)"))
        engine.project(Item, projector=projector, name="p", max_attempts=3)
        events = [Item(n=n) for n in range(6)]
        for event in events:
            await engine.publish(event)
        await until(lambda: positions(path, "p") == [6], "the projection passed every event")
        assert calls[3] == 3
        assert sorted(row[0] for row in query(path, "SELECT n FROM projected")) == [0, 1, 2, 4, 5]
        rows = query(path, "SELECT id, subscriber, seq, error, attempts, reason FROM dead_letters")
        assert len(rows) == 1
        letter_id, subscriber, seq, error, attempts, reason = rows[0]
        assert (subscriber, seq, error, attempts, reason) == (
            "p",
            seq_of(path, events[3]),
            "ValueError: cannot project 3",
            3,
            "failed",
        )
        await until(lambda: engine.dead_letters.count() == 1, "the engine counts it")
        assert [letter.actor for letter in engine.dead_letters.list()] == ["p"]
        broken = False
        await engine.dead_letters.replay(letter_id)
        assert query(path, "SELECT count(*) FROM dead_letters") == [(0,)]
        assert engine.dead_letters.count() == 0
    rows = query(path, "SELECT n, count(*) FROM projected GROUP BY n ORDER BY n")
    assert rows == [(n, 1) for n in range(6)]


async def test_a_projector_that_destroys_the_transaction_is_dead_lettered_alone(
    path: str,
) -> None:
    events = [Item(n=n) for n in range(8)]

    def note_and_publish(event: Item) -> Callable[[Transaction], None]:
        def fn(tx: Transaction) -> None:
            tx.conn.execute("INSERT INTO notes (n) VALUES (?)", (event.n,))
            tx.publish(event)

        return fn

    async with Engine(path) as engine:
        await engine.transact(create_table("CREATE TABLE projected (n INTEGER)"))
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))
        await engine.transact(
            create_table(
                "CREATE TRIGGER guard BEFORE INSERT ON projected WHEN NEW.n = 3 "
                "BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
            )
        )
        engine.project(Item, projector=project_into_table, name="p")
        await live(engine, "p")
        async with anyio.create_task_group() as tg:
            for event in events:  # domain writes share the batches with the projection
                tg.start_soon(engine.transact, note_and_publish(event))
        await until(lambda: positions(path, "p") == [8], "the projection passed every event")
        await until(lambda: engine.dead_letters.count() == 1, "one dead letter")
    rows = query(path, "SELECT n, count(*) FROM projected GROUP BY n ORDER BY n")
    assert rows == [(n, 1) for n in range(8) if n != 3]
    notes = query(path, "SELECT n, count(*) FROM notes GROUP BY n ORDER BY n")
    assert notes == [(n, 1) for n in range(8)]
    [(subscriber, seq, error)] = query(path, "SELECT subscriber, seq, error FROM dead_letters")
    assert (subscriber, seq) == ("p", seq_of(path, events[3]))
    assert "boom" in error


async def test_events_a_failing_projector_published_are_rolled_back_with_it(path: str) -> None:
    shipped: list[Other] = []

    def projector(tx: Transaction, event: Item) -> None:
        tx.publish(Other(n=event.n))
        if event.n == 1:
            raise ValueError("cannot project 1")

    engine = Engine(path)
    engine.subscribe(Other, handler=recorder(shipped), name="shipping")
    engine.project(Item, projector=projector, name="p", max_attempts=2)
    async with engine:
        await engine.publish(Item(n=1))
        await until(lambda: engine.dead_letters.count() == 1, "event 1 is dead-lettered")
        outbox = engine._outbox
        assert outbox is not None
        state = outbox.state
        await until(lambda: state.cursor >= state.head, "the relay dispatched what it holds")
        await engine.publish(Item(n=2))
    # Leaving the block drained everything: event 2, its projection and what it published.
    committed = query(path, "SELECT id FROM outbox WHERE type = 't5.other' ORDER BY seq")
    assert [row[0] for row in committed] == ids(shipped)
    assert numbers(shipped) == [2]


async def test_project_needs_a_database_and_a_plain_function(path: str) -> None:
    with pytest.raises(EngineError, match="database"):
        Engine().project(Item, projector=project_into_table, name="p")

    async def async_projector(tx: Transaction, event: Item) -> None:
        pass

    with pytest.raises(TypeError, match="plain function"):
        Engine(path).project(Item, projector=async_projector, name="p")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- dead letters


def failing_on(n: int, log: list[Item], error: str = "cannot digest") -> Handler:
    async def handle(event: Item) -> None:
        if event.n == n:
            raise ValueError(error)
        log.append(event)

    return handle


async def test_a_failing_handler_event_is_stored_as_a_dead_letter(path: str) -> None:
    received: list[Item] = []
    events = [Item(n=n) for n in range(4)]
    async with Engine(path) as engine:
        engine.subscribe(Item, handler=failing_on(2, received), name="s", max_attempts=2)
        for event in events:
            await engine.publish(event)
        await until(lambda: len(received) == 3, "the others are delivered")
        # Counted once its row committed: from then on the row is there.
        await until(lambda: engine.dead_letters.count() == 1, "the dead letter is stored")
        assert scalar(path, "SELECT count(*) FROM dead_letters") == 1
    rows = query(
        path,
        "SELECT subscriber, seq, event_id, type, reason, error, traceback, attempts "
        "FROM dead_letters",
    )
    subscriber, seq, event_id, type_, reason, error, traceback, attempts = rows[0]
    assert (subscriber, seq, event_id, type_, reason, error, attempts) == (
        "s",
        seq_of(path, events[2]),
        str(events[2].id),
        "t5.item",
        "failed",
        "ValueError: cannot digest",
        2,
    )
    assert "ValueError: cannot digest" in traceback
    assert numbers(received) == [0, 1, 3]
    assert positions(path, "s") == [4]  # the position moved past it


async def test_dead_letters_survive_a_restart_and_replay_to_that_subscriber_only(
    path: str,
) -> None:
    bad: list[Item] = []
    good: list[Item] = []
    poison = Item(n=2)
    engine = Engine(path)
    engine.subscribe(Item, handler=failing_on(2, bad), name="bad", max_attempts=1)
    engine.subscribe(Item, handler=recorder(good), name="good")
    async with engine:
        for event in [Item(n=0), Item(n=1), poison, Item(n=3)]:
            await engine.publish(event)
        await until(lambda: len(bad) == 3 and len(good) == 4, "run 1 delivered")
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 1

    bad2: list[Item] = []
    good2: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(bad2), name="bad")  # fixed
    engine.subscribe(Item, handler=recorder(good2), name="good")
    async with engine:
        assert engine.dead_letters.count() == 1
        [letter] = engine.dead_letters.list()
        assert letter.actor == "bad"
        assert letter.message == poison
        assert letter.seq == seq_of(path, poison)
        assert letter.error == "ValueError: cannot digest"
        assert letter.attempts == 1
        await engine.dead_letters.replay(letter.id)
        await until(lambda: bad2, "the replay is delivered")
        assert engine.dead_letters.count() == 0
    assert bad2 == [poison]
    assert good2 == []
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 0


async def test_list_keeps_showing_the_oldest_stored_dead_letters_after_a_replay(
    path: str,
) -> None:
    engine = Engine(path, dead_letter_limit=2)
    engine.subscribe(Item, handler=failing_on(-1, []), name="s", max_attempts=1)
    async with engine:
        for _ in range(3):
            await engine.publish(Item(n=-1))
        await until(lambda: engine.dead_letters.count() == 3, "three dead letters")
    stored = [row[0] for row in query(path, "SELECT id FROM dead_letters ORDER BY id")]
    assert len(stored) == 3
    engine = Engine(path, dead_letter_limit=2)
    engine.subscribe(Item, handler=recorder([]), name="s")
    async with engine:
        assert [letter.id for letter in engine.dead_letters.list()] == stored[:2]
        await engine.dead_letters.replay(stored[0])
        assert engine.dead_letters.count() == 2
        assert [letter.id for letter in engine.dead_letters.list()] == stored[1:]


async def test_purge_deletes_the_stored_dead_letters(path: str) -> None:
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=failing_on(-1, received), name="s", max_attempts=1)
    async with engine:
        for n in [-1, 0, -1, 1]:
            await engine.publish(Item(n=n))
        await until(lambda: len(received) == 2, "the good events are delivered")
        await until(lambda: engine.dead_letters.count() == 2, "two dead letters")
        await until(
            lambda: scalar(path, "SELECT count(*) FROM dead_letters") == 2, "both rows written"
        )
        assert engine.dead_letters.purge() == 2
        assert engine.dead_letters.count() == 0
        assert engine.dead_letters.list() == []
        await until(
            lambda: scalar(path, "SELECT count(*) FROM dead_letters") == 0, "the rows are deleted"
        )
    async with Engine(path) as engine:
        assert engine.dead_letters.count() == 0


async def test_a_replay_requested_from_outside_is_picked_up(path: str) -> None:
    received: list[Item] = []
    poison = Item(n=9)
    engine = Engine(path)
    engine.subscribe(Item, handler=failing_on(9, received), name="s", max_attempts=1)
    async with engine:
        await engine.publish(poison)
        await until(
            lambda: scalar(path, "SELECT count(*) FROM dead_letters") == 1, "the row is written"
        )
    fixed: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(fixed), name="s")
    async with engine:
        execute(path, "UPDATE dead_letters SET replay_requested = 1")
        await until(lambda: fixed, "the requested replay is delivered")
        await until(
            lambda: scalar(path, "SELECT count(*) FROM dead_letters") == 0, "the row is deleted"
        )
        await until(lambda: engine.dead_letters.count() == 0, "the count follows")
    assert fixed == [poison]


# ---------------------------------------------------------------------- schema growth


async def test_an_old_payload_without_a_newer_field_still_decodes(path: str) -> None:
    await create_schema(path)
    event = Grown(n=1, note="x")
    payload = json.loads(encode(event))
    del payload["note"]
    insert_raw(path, "t5.grown", json.dumps(payload).encode(), str(event.id))
    received: list[Grown] = []
    engine = Engine(path)
    engine.subscribe(Grown, handler=recorder(received), name="s")
    async with engine:
        await until(lambda: received, "the old event is delivered")
    assert received == [Grown(n=1, note="none", id=event.id, occurred_at=event.occurred_at)]


async def test_an_unregistered_event_type_is_dead_lettered_and_does_not_stop_the_rest(
    path: str,
) -> None:
    await create_schema(path)
    before, after = Item(n=0), Item(n=1)
    insert_event(path, before)
    gone = json.dumps({"type": "t5.gone", "id": str(uuid4()), "n": 1}).encode()
    insert_raw(path, "t5.gone", gone)
    insert_event(path, after)
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        await until(lambda: len(received) == 2, "the registered events are delivered")
        await until(lambda: engine.dead_letters.count() == 1, "the unknown one is dead-lettered")
        [letter] = engine.dead_letters.list()
        assert letter.actor == "s"
        assert letter.error is not None
        assert "t5.gone" in letter.error
        later = Item(n=2)
        await engine.publish(later)
        await until(lambda: len(received) == 3, "a later event is delivered")
    assert ids(received) == [str(before.id), str(after.id), str(later.id)]
    rows = query(path, "SELECT subscriber, seq, type, error FROM dead_letters")
    assert rows[0][:3] == ("s", 2, "t5.gone")
    assert "t5.gone" in rows[0][3]


async def test_a_raw_dead_letter_replays_once_its_type_is_registered(path: str) -> None:
    await create_schema(path)
    tag = f"t5.later.{uuid4().hex}"  # registered below, once per test run
    event_id = uuid4()
    insert_raw(path, tag, json.dumps({"type": tag, "id": str(event_id), "n": 5}).encode())
    received: list[Event] = []
    engine = Engine(path)
    engine.subscribe(Event, handler=recorder(received), name="all")
    async with engine:
        await until(lambda: engine.dead_letters.count() == 1, "the row is dead-lettered")
    assert received == []

    class Later(Event, tag=tag):
        n: int

    engine = Engine(path)
    engine.subscribe(Event, handler=recorder(received), name="all")
    async with engine:
        [letter] = engine.dead_letters.list()
        assert isinstance(letter.message, bytes)  # kept as stored
        assert letter.seq == 1
        with pytest.raises(KeyError):
            await engine.dead_letters.replay(letter.id + 1)
        await engine.dead_letters.replay(letter.id)
        await until(lambda: received, "the replay is delivered")
    [event] = received
    assert isinstance(event, Later)
    assert (event.id, event.n) == (event_id, 5)
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 0


async def test_a_dead_letter_of_the_relay_replays_to_the_subscriptions(path: str) -> None:
    tag = f"t5.later.{uuid4().hex}"  # registered below, once per test run
    event_id = uuid4()
    received: list[Event] = []
    engine = Engine(path)
    engine.subscribe(Event, handler=recorder(received), name="all")
    async with engine:
        await engine.publish(Item(n=0))
        await until(lambda: received, "the first event is delivered")
        await live(engine, "all")  # from now on the relay reads new rows
        payload = json.dumps({"type": tag, "id": str(event_id), "n": 5}).encode()
        insert_raw(path, tag, payload, str(event_id))  # a newer process wrote it
        await until(lambda: engine.dead_letters.count() == 1, "the relay dead-letters it")
        [letter] = engine.dead_letters.list()
        assert letter.error is not None
        assert tag in letter.error

        class Later(Event, tag=tag):
            n: int

        await engine.dead_letters.replay(letter.id)
    # Leaving the block drained whatever the replay queued.
    assert len(received) == 2
    assert isinstance(received[1], Later)
    assert received[1].id == event_id


async def test_a_row_the_relay_dead_lettered_is_not_dead_lettered_again(path: str) -> None:
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        await engine.publish(Item(n=0))
        await until(lambda: received, "the first event is delivered")
        await live(engine, "s")
        insert_raw(path, "t5.gone", json.dumps({"type": "t5.gone", "id": str(uuid4())}).encode())
        await until(lambda: engine.dead_letters.count() == 1, "the relay dead-letters the row")
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        later = Item(n=1)
        await engine.publish(later)
        await until(lambda: str(later.id) in ids(received), "a later event is delivered")
        assert engine.dead_letters.count() == 1
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 1


async def test_a_dead_letter_of_a_subscription_gone_stays(path: str) -> None:
    engine = Engine(path)
    engine.subscribe(Item, handler=failing_on(1, []), name="gone", max_attempts=1)
    async with engine:
        await engine.publish(Item(n=1))
        await until(lambda: engine.dead_letters.count() == 1, "the event is dead-lettered")
    async with Engine(path) as engine:  # "gone" is not subscribed in this run
        [letter] = engine.dead_letters.list()
        with pytest.raises(ActorStopped, match="gone"):
            await engine.dead_letters.replay(letter.id)
        assert engine.dead_letters.count() == 1
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 1


async def test_an_outbox_row_with_a_text_payload_does_not_stop_the_engine(path: str) -> None:
    await create_schema(path)
    text = Item(n=0)
    execute(
        path,
        "INSERT INTO outbox (id, type, tenant_id, payload, created_at) "
        "VALUES (?, 't5.item', NULL, ?, strftime('%s', 'now'))",
        (str(text.id), encode(text).decode()),  # TEXT, not a BLOB
    )
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        later = Item(n=1)
        await engine.publish(later)
        await until(lambda: str(later.id) in ids(received), "a later event is delivered")
        # The TEXT row holds valid JSON: delivered, or at least dead-lettered, never lost.
        assert str(text.id) in ids(received) or engine.dead_letters.count() == 1


# ---------------------------------------------------------------------- prune


async def test_prune_deletes_only_events_every_subscription_passed(path: str) -> None:
    fast: list[Item] = []
    slow: list[Item] = []
    gate = anyio.Event()
    entered = anyio.Event()

    async def blocked(event: Item) -> None:
        if event.n == 5:
            entered.set()
            await gate.wait()
        slow.append(event)

    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(fast), name="fast")
    engine.subscribe(Item, handler=blocked, name="slow")
    async with engine:
        events = [Item(n=n) for n in range(10)]
        for event in events:
            await engine.publish(event)
        await entered.wait()
        await until(lambda: engine.metrics().lag.get("fast") == 0, "'fast' has no lag")
        await until(lambda: positions(path, "fast") == [10], "'fast' is checkpointed")
        await until(lambda: positions(path, "slow") == [5], "'slow' is checkpointed before 5")
        assert await engine.prune(older_than=0) == 5
        assert outbox_ids(path) == ids(events[5:])
        gate.set()
        await until(lambda: positions(path, "slow") == [10], "'slow' is checkpointed at 10")
        assert await engine.prune(older_than=dt.timedelta(0)) == 5
        assert outbox_ids(path) == []
        late = Item(n=10)
        await engine.publish(late)
        assert seq_of(path, late) == 11
    async with Engine(path) as engine:
        assert engine.metrics().outbox_head == 11
        again = Item(n=11)
        await engine.publish(again)
    assert seq_of(path, again) == 12
    assert numbers(slow) == list(range(11))


async def test_prune_keeps_younger_events(path: str) -> None:
    async with Engine(path) as engine:
        for n in range(3):
            await engine.publish(Item(n=n))
        assert await engine.prune(older_than=dt.timedelta(days=1)) == 0
        assert await engine.prune(older_than=3600) == 0
    assert len(outbox_ids(path)) == 3


@pytest.mark.parametrize(
    ("older_than", "error"),
    [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1", TypeError)],
)
async def test_prune_refuses_bad_ages(path: str, older_than: Any, error: type[Exception]) -> None:
    async with Engine(path) as engine:
        with pytest.raises(error, match="older_than"):
            await engine.prune(older_than=older_than)


# ---------------------------------------------------------------------- shutdown


async def test_committed_events_are_delivered_before_the_engine_exits(path: str) -> None:
    async with Engine(path) as engine:
        await engine.transact(lambda tx: [tx.publish(Item(n=n)) for n in range(200)])
    received: list[Item] = []
    added: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="catching-up")
    async with engine:
        engine.subscribe(Item, handler=recorder(added), name="added")
        for n in range(200, 300):
            engine.try_publish(Item(n=n))
    # Nothing waited for the deliveries: leaving the block drained them.
    assert numbers(received) == list(range(300))
    assert numbers(added) == list(range(300))
    assert positions(path, "catching-up") == [300]
    assert positions(path, "added") == [300]


@pytest.mark.parametrize("leaving", ["timeout", "error"])
async def test_a_delivery_cut_short_by_shutdown_is_redelivered_next_run(
    path: str, leaving: str
) -> None:
    entered = anyio.Event()
    first, second = Item(n=1), Item(n=2)

    async def stuck(event: Item) -> None:
        entered.set()
        await anyio.sleep_forever()

    # Left normally, the drain gives up after shutdown_timeout; left by an error, it does
    # not drain at all. Either way the handler is cancelled in the middle of `first`.
    engine = Engine(path, shutdown_timeout=0.2)
    engine.subscribe(Item, handler=stuck, name="s")
    with pytest.raises(Boom) if leaving == "error" else contextlib.nullcontext():
        async with engine:
            await engine.publish(first)
            await engine.publish(second)
            await entered.wait()
            if leaving == "error":
                await live(engine, "s")  # the catch-up is over (see the next test)
                raise Boom
    assert engine.dead_letters.count() == 0
    assert scalar(path, "SELECT count(*) FROM dead_letters") == 0
    assert positions(path, "s") == [0]
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        await until(lambda: len(received) == 2, "both are redelivered")
    assert received == [first, second]
    assert positions(path, "s") == [2]


def hold_while_closing(engine: Engine) -> None:
    """In a read's worker thread: still reading while ``engine`` closes its database.

    Waits until the engine began closing, then gives it a moment (0.2 s at most) to close
    the connection under this read; a correct engine waits for the read instead.
    """
    store = store_of(engine)
    deadline = time.monotonic() + 10.0
    while not store._closing and time.monotonic() < deadline:
        time.sleep(0.001)
    deadline = time.monotonic() + 0.2
    while store._reader is not None and time.monotonic() < deadline:
        time.sleep(0.001)


async def test_leaving_with_an_error_during_a_catch_up_raises_that_error(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Engine(path) as engine:
        for n in range(3):
            await engine.publish(Item(n=n))
    received: list[Item] = []
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    reading = threading.Event()

    def held(conn: sqlite3.Connection, after: int, limit: int) -> Any:
        if not reading.is_set():
            reading.set()
            hold_while_closing(engine)
        return read_outbox(conn, after, limit)

    monkeypatch.setattr("engine._durable.read_outbox", held)
    with pytest.raises(Boom):
        async with engine:
            await until(reading.is_set, "the catch-up is reading")
            raise Boom
    monkeypatch.undo()
    engine = Engine(path)
    engine.subscribe(Item, handler=recorder(received), name="s")
    async with engine:
        await until(lambda: len(received) == 3, "the next run catches up")
    assert numbers(received) == [0, 1, 2]


async def test_leaving_while_the_outbox_poll_reads_exits_cleanly(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(path)
    reading = threading.Event()

    def held(conn: sqlite3.Connection) -> Any:
        if not reading.is_set():
            reading.set()
            hold_while_closing(engine)
        return poll_outbox(conn)

    monkeypatch.setattr("engine._durable.POLL_INTERVAL", 0.0)  # poll at every tick
    monkeypatch.setattr("engine._durable._poll", held)
    async with engine:
        await engine.publish(Item(n=1))
        await until(reading.is_set, "the housekeeping polls the outbox")
    assert len(outbox_ids(path)) == 1


# ---------------------------------------------------------------------- metrics


async def test_metrics_report_the_outbox_head_and_lag_per_subscription(path: str) -> None:
    gate = anyio.Event()
    entered = anyio.Event()

    async def blocked(event: Item) -> None:
        entered.set()
        await gate.wait()

    engine = Engine(path)
    engine.subscribe(Item, handler=recorder([]), name="fast")
    engine.subscribe(Item, handler=blocked, name="slow")
    engine.project(Item, projector=lambda tx, event: None, name="projection")
    async with engine:
        assert engine.metrics().outbox_head == 0
        await until(
            lambda: engine.metrics().lag == {"fast": 0, "slow": 0, "projection": 0},
            "every subscription is live",
        )
        for n in range(5):
            await engine.publish(Item(n=n))
        assert engine.metrics().outbox_head == 5
        await entered.wait()
        await until(lambda: engine.metrics().lag.get("fast") == 0, "'fast' has no lag")
        await until(lambda: engine.metrics().lag.get("projection") == 0, "the projection too")
        assert engine.metrics().lag["slow"] == 5
        gate.set()
        await until(lambda: engine.metrics().lag["slow"] == 0, "'slow' has no lag")
    async with Engine() as memory:
        metrics = memory.metrics()
        assert metrics.outbox_head == 0
        assert metrics.lag == {}


async def test_a_deferred_constraint_failing_at_commit_fails_only_its_own_call(path: str) -> None:
    received: list[Item] = []
    outcomes: dict[int, str] = {}

    def schema(tx: Transaction) -> None:
        tx.conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        tx.conn.execute(
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent (id) "
            "DEFERRABLE INITIALLY DEFERRED)"
        )
        tx.conn.execute("INSERT INTO parent VALUES (1)")

    def child(n: int, parent: int) -> Callable[[Transaction], None]:
        def fn(tx: Transaction) -> None:
            tx.conn.execute("INSERT INTO child (parent) VALUES (?)", (parent,))
            tx.publish(Item(n=n))

        return fn

    async def call(engine: Engine, n: int) -> None:
        try:
            await engine.transact(child(n, 99 if n == 3 else 1))  # the foreign key is enforced
        except sqlite3.IntegrityError as exc:
            outcomes[n] = str(exc)
        else:
            outcomes[n] = "ok"

    async with Engine(path) as engine:
        engine.subscribe(Item, handler=recorder(received), name="s")
        await engine.transact(schema)
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(call, engine, n)
        await until(lambda: len(received) == 7, "the committed events are delivered")
    assert outcomes == {n: "FOREIGN KEY constraint failed" if n == 3 else "ok" for n in range(8)}
    assert query(path, "SELECT count(*) FROM child") == [(7,)]
    assert sorted(numbers(received)) == [0, 1, 2, 4, 5, 6, 7]
    assert ids(received) == outbox_ids(path)


# ---------------------------------------------------------------------- savepoints


async def test_a_savepoint_rolls_back_only_its_own_rows_and_events(path: str) -> None:
    async with Engine(path) as engine:
        await engine.transact(create_table("CREATE TABLE notes (n INTEGER)"))

        def work(tx: Transaction) -> list[int]:
            tx.conn.execute("INSERT INTO notes VALUES (1)")
            tx.publish(Item(n=1))
            with pytest.raises(Boom), tx.savepoint():
                tx.conn.execute("INSERT INTO notes VALUES (2)")
                tx.publish(Item(n=2))
                raise Boom
            with tx.savepoint():
                tx.conn.execute("INSERT INTO notes VALUES (3)")
                with pytest.raises(Boom), tx.savepoint():  # nested: only the inner part goes
                    tx.publish(Item(n=4))
                    raise Boom
                tx.publish(Item(n=3))
            return [event.n for _, event in tx.published]  # type: ignore[attr-defined]

        assert await engine.transact(work) == [1, 3]
    assert [row[0] for row in query(path, "SELECT n FROM notes ORDER BY n")] == [1, 3]
    assert len(outbox_ids(path)) == 2


async def test_a_subscription_ref_says_when_a_durable_subscription_is_live(path: str) -> None:
    async with Engine(path) as engine:
        await engine.publish(Item(n=1))
    received: list[Item] = []
    engine = Engine(path)
    ref = engine.subscribe(Item, handler=recorder(received), name="s")
    assert not ref.live  # registered: it catches up first
    async with engine:
        await until(lambda: ref.live, "it caught up")
        assert numbers(received) == [1]
