"""Durable storage on SQLite: the schema, the writer with group commit, the reader.

One writer connection, used from one worker thread at a time (a capacity
limiter of 1), runs every write. Concurrent ``transact`` calls are batched
into one SQLite transaction with a SAVEPOINT per call: a failing call rolls
back only its own work, and every caller returns after the COMMIT that holds
its work. A separate reader connection serves catch-up reads (WAL lets it
read while the writer writes).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Final, Literal, cast

import anyio
import msgspec
import sqlite_utils

from ._errors import EngineError
from ._events import Event, decode, encode

__all__ = [
    "StorageError",
    "Store",
    "Transaction",
    "TransactionControlRefused",
    "TransactionEnded",
]

logger = logging.getLogger("actorbus.store")

SCHEMA_VERSION: Final = 1

# The schema only grows: a later version adds tables or columns with defaults
# and bumps PRAGMA user_version; opening a newer database than this code
# knows is refused rather than guessed at.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    tenant_id TEXT,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at);
CREATE TABLE IF NOT EXISTS tracking (
    subscriber TEXT NOT NULL,
    partition INTEGER NOT NULL,
    position INTEGER NOT NULL,
    partitions INTEGER NOT NULL,
    kind TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (subscriber, partition)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subscriber TEXT NOT NULL,
    seq INTEGER,
    event_id TEXT,
    type TEXT,
    payload BLOB,
    encoding TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT,
    traceback TEXT,
    attempts INTEGER NOT NULL,
    at REAL NOT NULL,
    replay_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_subscriber ON dead_letters (subscriber);
"""

_INSERT_OUTBOX: Final = (
    "INSERT INTO outbox (id, type, tenant_id, payload, created_at) VALUES (?, ?, ?, ?, ?)"
)
_BEGIN: Final = "BEGIN IMMEDIATE"
_COMMIT: Final = "COMMIT"
_ROLLBACK: Final = "ROLLBACK"

Durability = Literal["full", "normal"]


class StorageError(EngineError):
    """SQLite failed to begin or commit a transaction; the cause is chained."""


class TransactionEnded(EngineError):
    """A transact function's statement ended the engine's transaction."""


class TransactionControlRefused(EngineError):
    """A transact function tried to COMMIT, ROLLBACK or BEGIN the engine's transaction."""


_tags: dict[type, str] = {}


def event_tag(event: Event) -> str:
    cls = type(event)
    try:
        return _tags[cls]
    except KeyError:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str)
        _tags[cls] = tag
        return tag


def connect(
    path: str, *, durability: Durability = "full", timeout: float = 5.0
) -> sqlite3.Connection:
    """A connection with the engine's pragmas (WAL, synchronous, busy timeout).

    ``isolation_level=None``: the engine issues BEGIN / COMMIT itself, so
    Python's sqlite3 never opens or commits a transaction behind its back.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    except BaseException:
        conn.close()
        raise
    return conn


def last_seq(conn: sqlite3.Connection) -> int:
    """The highest seq ever given out (pruning every row does not lower it)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    last = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
    return max(int(row[0]) if row else 0, int(last))


def ensure_schema(
    conn: sqlite3.Connection,
    *,
    begin: str = _BEGIN,
    commit: str = _COMMIT,
    rollback: str = _ROLLBACK,
) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database schema version {version} is newer than this actorbus knows "
            f"({SCHEMA_VERSION}); upgrade actorbus to open it"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute(begin)
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute(commit)
    except BaseException:
        if conn.in_transaction:
            conn.execute(rollback)
        raise


class Transaction:
    """What a ``transact`` function gets: ``tx.db`` and ``tx.publish(event)``.

    ``tx.db`` is a ``sqlite_utils.Database`` on the engine's transaction; its
    writes commit (or roll back) together with the events published here.
    Committing or rolling back from inside is refused.
    """

    __slots__ = ("_events", "_now", "_raw", "conn", "db")

    def __init__(
        self, raw: sqlite3.Connection, conn: Any, db: sqlite_utils.Database, now: float
    ) -> None:
        self._raw = raw
        self._now = now  # one clock read per batch: the outbox's created_at
        self.conn: sqlite3.Connection = conn
        """The connection (guarded: it refuses statements once the transaction ended)."""
        self.db = db
        self._events: list[tuple[int, Event]] = []

    def publish(self, event: Event) -> int:
        """Validate ``event`` and append it to the outbox in this transaction; returns its seq."""
        if not isinstance(event, Event):
            raise TypeError(f"tx.publish takes an Event, got {type(event).__name__}")
        event.validate()
        return self._append(event)

    def _append(self, event: Event) -> int:
        raw = self._raw
        if not raw.in_transaction:
            raise _ended()
        tenant = event.tenant_id
        cursor = raw.execute(
            _INSERT_OUTBOX,
            (
                str(event.id),
                event_tag(event),
                None if tenant is None else str(tenant),
                encode(event),
                self._now,
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None
        self._events.append((seq, event))
        return seq


def _ended() -> TransactionEnded:
    return TransactionEnded(
        "the transaction already ended inside this transact function (a statement destroyed "
        "it); no further statement runs"
    )


class _GuardedConnection:
    """The writer connection as a transact function sees it.

    Once a statement destroyed the transaction (a RAISE(ROLLBACK) trigger, an
    I/O error), SQLite would run the function's next statements in autocommit
    mode, each committed on its own; while a function runs this refuses them.
    """

    __slots__ = ("_conn", "_store")

    def __init__(self, conn: sqlite3.Connection, store: Store) -> None:
        self._conn = conn
        self._store = store

    def _check(self, sql: str) -> None:
        store = self._store
        if store._guarded:
            if not self._conn.in_transaction:
                raise _ended()
            if isinstance(sql, str) and store._token in sql:
                # The authorizer cannot catch a cached copy of the engine's own statement.
                raise TransactionControlRefused(
                    "a transact function may not use the engine's own savepoint or transaction"
                )

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.executemany(sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        if self._store._guarded:
            raise TransactionControlRefused(
                "executescript commits first, so a transact function may not use it; "
                "run the statements one by one with execute"
            )
        return self._conn.executescript(script)

    def cursor(self) -> _GuardedCursor:
        return _GuardedCursor(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _GuardedCursor:
    __slots__ = ("_cursor", "_guard")

    def __init__(self, guard: _GuardedConnection) -> None:
        self._guard = guard
        self._cursor = guard._conn.cursor()

    def execute(self, sql: str, parameters: Any = (), /) -> _GuardedCursor:
        self._guard._check(sql)
        self._cursor.execute(sql, parameters)
        return self

    def executemany(self, sql: str, parameters: Any, /) -> _GuardedCursor:
        self._guard._check(sql)
        self._cursor.executemany(sql, parameters)
        return self

    def __iter__(self) -> Any:
        return iter(self._cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class Request:
    """One unit of work for the writer: a function of the transaction."""

    __slots__ = ("cancelled", "error", "events", "fn", "on_done", "result", "taken")

    def __init__(
        self,
        fn: Callable[[Transaction], Any],
        on_done: Callable[[Request], None] | None = None,
    ) -> None:
        self.fn = fn
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: list[tuple[int, Event]] = []
        self.cancelled = False
        self.taken = False


class _Batch:
    __slots__ = ("done", "requests")

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.done = anyio.Event()


class Store:
    """The database: one writer (group commit) and one reader connection."""

    def __init__(
        self,
        path: str,
        *,
        durability: Durability,
        max_pending: int,
        on_commit: Callable[[list[tuple[int, Event]]], None],
        on_busy: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.durability = durability
        self.max_pending = max_pending
        self.on_commit = on_commit
        # Pending work keeps the engine's shutdown drain waiting for the commit.
        self.on_busy = on_busy
        self.on_idle = on_idle
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._db: sqlite_utils.Database | None = None
        self._guarded_conn: _GuardedConnection | None = None
        token = secrets.token_hex(8)
        self._token = token
        # Names only this store knows. sqlite3 caches prepared statements by
        # their text and the authorizer runs only when one is prepared: a
        # function's COMMIT or RELEASE must never reuse the engine's own,
        # already authorised statement.
        self._savepoint = f"actorbus_{token}"
        self._savepoint_sql = (
            f"SAVEPOINT {self._savepoint}",
            f"RELEASE {self._savepoint}",
            f"ROLLBACK TO {self._savepoint}",
        )
        self._begin = f"BEGIN IMMEDIATE /* {token} */"
        self._commit = f"COMMIT /* {token} */"
        self._rollback = f"ROLLBACK /* {token} */"
        self._write_limiter = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(1)
        self._batch = _Batch()
        self._wakeup = anyio.Event()
        self._space: anyio.Event | None = None
        self._pending = 0
        self._closing = False
        self._guarded = False
        self._denied = False
        self.batches = 0
        """Transactions committed by the writer (each holds one or more requests)."""
        self.requests = 0
        """Requests run by the writer."""

    # ----------------------------------------------------------------- life

    async def open(self) -> int:
        """Open both connections, create or check the schema; returns the last seq."""
        return await anyio.to_thread.run_sync(self._open, limiter=self._write_limiter)

    def _open(self) -> int:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot open database {self.path!r}: no directory {directory!r}")
        try:
            writer = connect(self.path, durability=self.durability)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self.path!r}: {exc}") from exc
        try:
            ensure_schema(writer, begin=self._begin, commit=self._commit, rollback=self._rollback)
            reader = connect(self.path, durability=self.durability)
        except sqlite3.Error as exc:
            writer.close()
            raise StorageError(f"cannot open database {self.path!r}: {exc}") from exc
        except BaseException:
            writer.close()
            raise
        # Foreign keys are enforced (SQLite's default is off); a deferred one
        # is checked at COMMIT, where a violation fails only the call behind it.
        writer.execute("PRAGMA foreign_keys=ON")
        # WAL checkpoints run from the housekeeping (checkpoint()), off the commit
        # path: an automatic one inside a COMMIT is what made commit latency spike.
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.set_authorizer(self._authorize)
        self._writer = writer
        self._reader = reader
        guarded = _GuardedConnection(writer, self)
        self._guarded_conn = guarded
        self._db = sqlite_utils.Database(cast(sqlite3.Connection, guarded))
        return last_seq(writer)

    async def close(self) -> None:
        """Commit what is pending, then close the connections."""
        self._closing = True
        self._wakeup.set()

    def _close_connections(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None

    async def run(self) -> None:
        """The writer loop: one transaction per batch of pending requests."""
        try:
            while True:
                if not self._closing:
                    await self._wakeup.wait()
                batch = self._batch
                if not batch.requests:
                    if self._closing:
                        return
                    self._wakeup = anyio.Event()
                    continue
                self._batch = _Batch()
                self._wakeup = anyio.Event()
                requests = [r for r in batch.requests if not r.cancelled]
                for request in requests:
                    request.taken = True
                if requests:
                    # Not cancellable: the thread runs to the end of its COMMIT.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(
                            self._write_batch, requests, limiter=self._write_limiter
                        )
                self._finish(batch, requests)
        finally:
            with anyio.CancelScope(shield=True):
                # Anything still pending when the loop ends (cancelled) fails clearly.
                for request in self._batch.requests:
                    request.error = EngineError("the engine stopped before this write committed")
                self._batch.done.set()
                if self._pending:
                    self._pending = 0
                    self.on_idle()
                # A read still running in its thread finishes before its connection closes.
                async with self._read_limiter:
                    await anyio.to_thread.run_sync(
                        self._close_connections, limiter=self._write_limiter
                    )

    def _finish(self, batch: _Batch, requests: list[Request]) -> None:
        committed: list[tuple[int, Event]] = []
        for request in requests:
            if request.error is None:
                committed.extend(request.events)
        if committed:
            self.on_commit(committed)
        for request in requests:
            if request.on_done is not None:
                try:
                    request.on_done(request)
                except Exception:  # pragma: no cover - the engine's own callbacks
                    logger.exception("write completion callback failed")
        batch.done.set()
        self._pending -= len(batch.requests)
        if not self._pending:
            self.on_idle()
        if self._space is not None:
            self._space.set()
            self._space = None

    # ------------------------------------------------------------ submitting

    def _check_open(self) -> None:
        if self._closing:
            raise EngineError("the engine's database is closed")

    def submit(self, request: Request, *, bounded: bool = True) -> _Batch | None:
        """Queue ``request`` for the next batch; ``None`` if the writer is full."""
        self._check_open()
        if bounded and self._pending >= self.max_pending:
            return None
        batch = self._batch
        batch.requests.append(request)
        if not self._pending:
            self.on_busy()
        self._pending += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return batch

    async def call(self, fn: Callable[[Transaction], Any]) -> Any:
        """Run ``fn(tx)`` in the next group commit; return its result after the COMMIT.

        Cancelled before the writer took it, it never runs. Once taken it cannot
        be undone: the cancellation waits for the COMMIT and is raised after it.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        request = Request(fn)
        while True:
            batch = self.submit(request)
            if batch is not None:
                break
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()
        try:
            await batch.done.wait()
        except BaseException:
            if not request.taken:
                request.cancelled = True
            else:
                with anyio.CancelScope(shield=True):
                    await batch.done.wait()
            raise
        if request.error is not None:
            raise request.error
        return request.result

    # ------------------------------------------------------- in the thread

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
        # While a user's function runs, it may not end the engine's transaction
        # (COMMIT/ROLLBACK/BEGIN) or touch the engine's savepoint: that would
        # commit or discard the other callers' work in the batch behind their backs.
        if self._guarded and (
            action == sqlite3.SQLITE_TRANSACTION
            or (action == sqlite3.SQLITE_SAVEPOINT and arg2 == self._savepoint)
        ):
            self._denied = True
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _write_batch(self, requests: list[Request]) -> None:
        """Run ``requests`` in one transaction (the writer thread)."""
        while requests:
            requests = self._attempt(requests)

    def _attempt(self, requests: list[Request]) -> list[Request]:
        """One transaction over ``requests``; returns those to run again.

        A request whose statement destroyed the transaction (an I/O error, a
        RAISE(ROLLBACK) trigger) fails on its own; the ones before it in the
        batch were rolled back with it and run again in a new transaction.
        """
        conn = self._writer
        db = self._db
        assert conn is not None
        assert db is not None
        try:
            conn.execute(self._begin)
        except sqlite3.Error as exc:
            error = StorageError(f"cannot begin a write transaction on {self.path!r}: {exc}")
            error.__cause__ = exc
            for request in requests:
                request.error = error
            return []
        savepoints = len(requests) > 1
        guarded = self._guarded_conn
        now = time.time()
        begin_call, release_call, undo_call = self._savepoint_sql
        for index, request in enumerate(requests):
            tx = Transaction(conn, guarded, db, now)
            if savepoints:
                conn.execute(begin_call)
            self._guarded = True
            self._denied = False
            try:
                result = request.fn(tx)
                if result is not None and inspect.isawaitable(result):  # an async callable
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(
                        "transact runs a plain function in the database thread; "
                        f"{request.fn!r} returned an awaitable"
                    )
                request.result = result
            except BaseException as exc:
                request.error = exc
            finally:
                self._guarded = False
            if self._denied and isinstance(request.error, sqlite3.DatabaseError):
                refused = request.error
                request.error = TransactionControlRefused(
                    "a transact function may not COMMIT, ROLLBACK or BEGIN (the engine commits "
                    "when it returns; raise to roll back): its work was rolled back"
                )
                request.error.__cause__ = refused
            self.requests += 1
            if not conn.in_transaction:
                # This request's statement ended the transaction: the work of
                # the requests before it is gone with it; they run again.
                if request.error is None:
                    request.error = TransactionEnded(
                        "the transaction ended inside the transact function (a statement "
                        "destroyed it); nothing of this call was committed"
                    )
                else:
                    cause = request.error
                    request.error = TransactionEnded(
                        f"{type(cause).__name__}: {cause} — it also ended the transaction; "
                        "nothing of this call was committed"
                    )
                    request.error.__cause__ = cause
                request.result = None
                earlier = requests[:index]
                for other in earlier:
                    other.error = None
                    other.result = None
                    other.events = []
                return earlier + requests[index + 1 :]
            if request.error is not None:
                if savepoints:
                    conn.execute(undo_call)
                    conn.execute(release_call)
                else:
                    conn.execute(self._rollback)
                    return requests[index + 1 :]  # a batch of one: nothing else to keep
                continue
            request.events = tx._events
            if savepoints:
                conn.execute(release_call)
        try:
            conn.execute(self._commit)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute(self._rollback)
            runnable = [r for r in requests if r.error is None]
            if len(requests) > 1 and isinstance(exc, sqlite3.IntegrityError):
                # A deferred constraint failed at COMMIT: find whose work broke
                # it by committing each call on its own.
                for request in runnable:
                    request.result = None
                    request.events = []
                    self._commit_alone(request)
                return []
            failure: BaseException = exc
            if not isinstance(exc, sqlite3.IntegrityError):
                failure = StorageError(f"cannot commit on {self.path!r}: {exc}")
                failure.__cause__ = exc
            for request in runnable:
                request.error = failure
                request.result = None
                request.events = []
            return []
        self.batches += 1
        return []

    def _commit_alone(self, request: Request) -> None:
        rest = self._attempt([request])
        assert not rest  # a batch of one has nothing to run again

    # ------------------------------------------------------------- reading

    async def checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits for the writer)."""
        await self.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` on the reader connection in a worker thread."""
        return await anyio.to_thread.run_sync(self._read, fn, limiter=self._read_limiter)

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._reader
        if conn is None:
            raise EngineError("the engine's database is closed")
        return fn(conn)


class OutboxRow:
    """An outbox row read back: its seq and the event, or why it cannot be decoded."""

    __slots__ = ("error", "event", "payload", "seq", "type")

    def __init__(
        self,
        seq: int,
        type_: str,
        payload: bytes,
        event: Event | None,
        error: BaseException | None,
    ) -> None:
        self.seq = seq
        self.type = type_
        self.payload = payload
        self.event = event
        self.error = error


def read_outbox(conn: sqlite3.Connection, after: int, limit: int) -> list[OutboxRow]:
    """Rows with ``seq > after`` in order, decoded (a row that fails carries its error)."""
    rows = conn.execute(
        "SELECT seq, type, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        (after, limit),
    ).fetchall()
    out: list[OutboxRow] = []
    for seq, type_, payload in rows:
        # Another tool may have stored text (or worse): it is dead-lettered, not fatal.
        if not isinstance(payload, bytes):
            payload = str(payload).encode("utf-8", "surrogateescape")
        try:
            event: Event | None = decode(payload)
            error: BaseException | None = None
        except Exception as exc:
            event, error = None, exc
        out.append(OutboxRow(seq, str(type_), payload, event, error))
    return out


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
    value = text.strip().lower()
    factor = 1.0
    if value and value[-1] in units:
        factor = units[value[-1]]
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"an age is a number with an optional unit s, m, h, d or w (like 7d), got {text!r}"
        ) from None
    seconds = number * factor
    if not math.isfinite(seconds) or number < 0:
        raise ValueError(f"an age must be a finite number >= 0, got {text!r}")
    return seconds


def prune_outbox(conn: sqlite3.Connection, cutoff: float) -> int:
    """Delete outbox rows created before ``cutoff`` (unix time) that every tracked
    subscription has passed; returns how many. Runs inside the caller's transaction.

    With no tracked subscription every old row counts as passed. Sequence
    numbers are never reused: AUTOINCREMENT keeps the highest ever given out.
    """
    passed = conn.execute("SELECT min(position) FROM tracking").fetchone()[0]
    if passed is None:
        passed = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
    cursor = conn.execute("DELETE FROM outbox WHERE seq <= ? AND created_at < ?", (passed, cutoff))
    return int(cursor.rowcount)


class SubscriberStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One tracked subscription or projection, as stored."""

    name: str
    kind: str
    partitions: int
    position: int
    """The lowest stored position over its partitions."""
    lag: int
    """Outbox events after its position."""
    dead_letters: int


class OutboxStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What ``python -m engine status`` prints: the outbox, positions and dead letters."""

    schema_version: int
    events: int
    first_seq: int | None
    head: int
    """The highest seq ever given out (pruning never lowers it)."""
    subscribers: list[SubscriberStatus]
    dead_letters: int


def read_status(conn: sqlite3.Connection) -> OutboxStatus:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    events, first = conn.execute("SELECT count(*), min(seq) FROM outbox").fetchone()
    head = last_seq(conn)
    letters = dict(
        conn.execute("SELECT subscriber, count(*) FROM dead_letters GROUP BY subscriber").fetchall()
    )
    subscribers = []
    for name, kind, partitions, position in conn.execute(
        "SELECT subscriber, max(kind), max(partitions), min(position) FROM tracking "
        "GROUP BY subscriber ORDER BY subscriber"
    ).fetchall():
        lag = conn.execute("SELECT count(*) FROM outbox WHERE seq > ?", (position,)).fetchone()[0]
        subscribers.append(
            SubscriberStatus(
                name=name,
                kind=kind,
                partitions=partitions,
                position=position,
                lag=lag,
                dead_letters=letters.get(name, 0),
            )
        )
    total = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return OutboxStatus(
        schema_version=version,
        events=events,
        first_seq=first,
        head=head,
        subscribers=subscribers,
        dead_letters=total,
    )
