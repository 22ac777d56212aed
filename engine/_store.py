"""Durable storage on SQLite: the schema, the writer with group commit, the reader.

One writer connection, used from one worker thread at a time (a capacity
limiter of 1), runs every write. Concurrent ``transact`` calls are batched
into one SQLite transaction with a SAVEPOINT per call: a failing call rolls
back only its own work, and every caller returns after the COMMIT that holds
its work. A separate reader connection serves catch-up reads (WAL lets it
read while the writer writes).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal, cast

import anyio
import msgspec
import sqlite_utils

from ._errors import EngineError
from ._events import Event, decode, encode
from ._filelock import EngineLock, EngineLockHeld, lock_path
from ._system import SystemEvent, refuse_unpublishable

__all__ = [
    "StorageError",
    "StorageMetrics",
    "Store",
    "Transaction",
    "TransactionControlRefused",
    "TransactionEnded",
]

logger = logging.getLogger("actorbus.store")

SCHEMA_VERSION: Final = 1
TABLES: Final = frozenset({"outbox", "tracking", "dead_letters"})
# How long one statement waits inside SQLite for another connection's lock.
# A lock held longer is an outage: the writer retries with backoff (and a
# shutdown or a cancelled start never waits on SQLite for more than this).
BUSY_TIMEOUT: Final = 1.0
RETRY_INITIAL: Final = 0.05
RETRY_MAX: Final = 1.0
# Primary result codes of faults in the storage, not in anyone's code: the
# database is locked, full, read-only, failing I/O or out of memory.
_FAULT_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_LOCK_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

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

# Additions within schema version 1: tables and columns with defaults that code
# which does not know them ignores; made (once) whenever an engine opens the file.
_ADDITIONS = """
CREATE TABLE IF NOT EXISTS cluster (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_positions (
    subscriber TEXT NOT NULL,
    partition INTEGER NOT NULL,
    ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (subscriber, partition)
);
CREATE TABLE IF NOT EXISTS cluster_applied (
    subscriber TEXT NOT NULL,
    partition INTEGER NOT NULL,
    producer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (subscriber, partition, producer)
);
"""
_ADDED_COLUMNS: Final = (
    ("dead_letters", "entry", "TEXT"),
    # The W3C trace context current when the event was published (engine._tracing).
    ("outbox", "trace", "TEXT"),
)

_INSERT_OUTBOX: Final = (
    "INSERT INTO outbox (id, type, tenant_id, payload, created_at, trace) VALUES (?, ?, ?, ?, ?, ?)"
)

Committed = tuple[int, Event, str | None]
"""A committed event as the relay gets it: its seq, the event, its trace context."""
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


def _code(error: BaseException) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_storage_fault(error: BaseException) -> bool:
    """A SQLite error of the storage (locked, full, read-only, I/O), not of anyone's code."""
    return isinstance(error, sqlite3.Error) and _code(error) in _FAULT_CODES


def storage_fault_in(error: BaseException) -> BaseException | None:
    """The storage fault behind ``error``: itself or an explicit cause of it."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 16:
        if is_storage_fault(current):
            return current
        current = current.__cause__
        seen += 1
    return None


def check_path(database: object) -> str | None:
    """``Engine``'s ``database`` argument: a file path (as a ``str``) or None."""
    if database is None:
        return None
    if not isinstance(database, str | os.PathLike):
        raise TypeError(f"database must be a path or None, got {type(database).__name__}")
    path = os.fspath(database)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"database must be a file path, got {path!r}")
    if path == ":memory:" or path.startswith("file:"):
        raise ValueError(
            f"database must be a file path, got {path!r}: the outbox needs a file "
            "its connections share (use Engine() for events in memory)"
        )
    return path


def check_database(path: str) -> None:
    """Refuse a file that is not an actorbus database, before anything changes in it.

    A missing or empty file, or a SQLite database without a schema version
    (an application's own, which the engine then joins), is accepted. A
    locked file raises the SQLite error (a fault to wait out).
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        if _code(exc) in _LOCK_CODES:
            raise
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    finally:
        conn.close()
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database schema version {version} is newer than this actorbus knows "
            f"({SCHEMA_VERSION}); upgrade actorbus to open it"
        )
    if version == 0:
        clash = sorted(TABLES & tables)
        if clash:
            raise StorageError(
                f"cannot open database {path!r}: it has tables named {', '.join(clash)} but "
                "no actorbus schema version; it belongs to another application"
            )
        return
    missing = sorted(TABLES - tables)
    if missing:
        raise StorageError(
            f"cannot open database {path!r}: it is not an actorbus database (schema version "
            f"{version}, no table {', '.join(missing)}); it was left unchanged"
        )


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
        add_to_schema(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute(commit)
    except BaseException:
        if conn.in_transaction:
            conn.execute(rollback)
        raise


def add_to_schema(conn: sqlite3.Connection) -> None:
    """Make the additions to schema version 1 that are missing (in the caller's transaction)."""
    for statement in _ADDITIONS.split(";"):
        if statement.strip():
            conn.execute(statement)
    for table, column, kind in _ADDED_COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class _Guard:
    """The writer thread's view of a running transact function: what it may not do."""

    __slots__ = ("active", "denied", "token")

    def __init__(self, token: str) -> None:
        self.token = token
        # A user's function runs: the authorizer and the guarded connection refuse.
        self.active = False
        # The authorizer refused one of its statements.
        self.denied = False


class Transaction:
    """What a ``transact`` function gets: ``tx.db``, ``tx.conn``, ``tx.publish(event)``
    and ``tx.savepoint()``.

    ``tx.db`` is a ``sqlite_utils.Database`` on the engine's transaction; its
    writes commit (or roll back) together with the events published here.
    Committing or rolling back from inside is refused.
    """

    __slots__ = ("_depth", "_events", "_now", "_raw", "_trace", "conn", "db")

    def __init__(
        self,
        raw: sqlite3.Connection,
        conn: Any,
        db: sqlite_utils.Database,
        now: float,
        trace: str | None = None,
    ) -> None:
        self._raw = raw
        # The trace context of the call that runs in it, stored with its events.
        self._trace = trace
        self._now = now  # one clock read per batch: the outbox's created_at
        self.conn: sqlite3.Connection = conn
        """The connection (guarded: it refuses statements once the transaction ended)."""
        self.db = db
        self._events: list[tuple[int, Event]] = []
        self._depth = 0

    @property
    def published(self) -> list[tuple[int, Event]]:
        """``(seq, event)`` of every event published in this transaction so far."""
        return list(self._events)

    def publish(self, event: Event) -> int:
        """Validate ``event`` and append it to the outbox in this transaction; returns its seq."""
        if not isinstance(event, Event) or isinstance(event, SystemEvent):
            refuse_unpublishable(event, "tx.publish")
        event.validate()
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
                self._trace,
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None
        self._events.append((seq, event))
        return seq

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested part of the transaction: if the block raises, what it wrote and
        published rolls back (the rest of the transaction stays) and the error goes on."""
        raw = self._raw
        name = f"actorbus_nested_{self._depth}"
        raw.execute(f"SAVEPOINT {name}")
        published = len(self._events)
        self._depth += 1
        try:
            yield
        except BaseException:
            del self._events[published:]
            if raw.in_transaction:  # a statement may have destroyed the transaction
                raw.execute(f"ROLLBACK TO {name}")
                raw.execute(f"RELEASE {name}")
            raise
        else:
            raw.execute(f"RELEASE {name}")
        finally:
            self._depth -= 1


_ASYNC_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_NOT_ASYNC: Final = (
    "transact runs a plain function `def fn(tx)` in the database thread, not a coroutine "
    "function: got {fn!r}"
)


def check_transact_function(fn: object) -> None:
    """``transact``'s argument: a plain function of the transaction, not a coroutine function."""
    code = getattr(fn, "__code__", None)
    if code is not None:  # a plain function: the cheap check
        if code.co_flags & _ASYNC_FLAGS:
            raise TypeError(_NOT_ASYNC.format(fn=fn))
    elif not callable(fn):
        raise TypeError(f"transact takes a function of the transaction, got {fn!r}")
    elif inspect.iscoroutinefunction(fn):
        raise TypeError(_NOT_ASYNC.format(fn=fn))


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

    __slots__ = ("guard", "raw")

    def __init__(self, raw: sqlite3.Connection, guard: _Guard) -> None:
        self.raw = raw
        self.guard = guard

    def check_statement(self, sql: str) -> None:
        guard = self.guard
        if guard.active:
            if not self.raw.in_transaction:
                raise _ended()
            if isinstance(sql, str) and guard.token in sql:
                # The authorizer cannot catch a cached copy of the engine's own statement.
                raise TransactionControlRefused(
                    "a transact function may not use the engine's own savepoint or transaction"
                )

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.check_statement(sql)
        return self.raw.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self.check_statement(sql)
        return self.raw.executemany(sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        if self.guard.active:
            raise TransactionControlRefused(
                "executescript commits first, so a transact function may not use it; "
                "run the statements one by one with execute"
            )
        return self.raw.executescript(script)

    def cursor(self) -> _GuardedCursor:
        return _GuardedCursor(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _GuardedCursor:
    __slots__ = ("connection", "cursor")

    def __init__(self, connection: _GuardedConnection) -> None:
        self.connection = connection
        self.cursor = connection.raw.cursor()

    def execute(self, sql: str, parameters: Any = (), /) -> _GuardedCursor:
        self.connection.check_statement(sql)
        self.cursor.execute(sql, parameters)
        return self

    def executemany(self, sql: str, parameters: Any, /) -> _GuardedCursor:
        self.connection.check_statement(sql)
        self.cursor.executemany(sql, parameters)
        return self

    def __iter__(self) -> Any:
        return iter(self.cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cursor, name)


class Request:
    """One unit of work for the writer: a function of the transaction.

    A request the engine runs in the background (no ``deadline``) is retried
    through storage faults until it commits or the engine stops; one a caller
    awaits has a deadline and fails with ``StorageError`` after it.
    """

    __slots__ = (
        "cancelled",
        "deadline",
        "error",
        "events",
        "finished",
        "fn",
        "kind",
        "on_done",
        "result",
        "taken",
        "trace",
        "waiter",
    )

    def __init__(
        self,
        fn: Callable[[Transaction], Any],
        on_done: Callable[[Request], None] | None = None,
        *,
        kind: str = "write",
        trace: str | None = None,
    ) -> None:
        self.fn = fn
        self.on_done = on_done
        # What it writes, for the log when a shutdown leaves it uncommitted.
        self.kind = kind
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: list[tuple[int, Event]] = []
        self.cancelled = False
        self.taken = False
        # Its outcome is final: committed, or failed by its own function.
        self.finished = False
        self.deadline: float | None = None
        self.waiter: anyio.Event | None = None
        # The caller's trace context (engine._tracing), kept with the events it publishes.
        self.trace = trace


class StorageMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """The database's health (``engine.metrics().storage``)."""

    available: bool
    """False while the database refuses writes (locked, full, read-only, failing I/O)."""
    outages: int
    """Times the database became unwritable since the engine started."""
    retries: int
    """Write or read attempts that failed on a storage fault and were tried again."""
    outage_seconds: float
    """How long the current outage has lasted (0.0 when available)."""
    last_error: str | None
    """The last storage fault (``"OperationalError: database is locked"``)."""
    pending_writes: int
    """Writes waiting for a commit (background writes wait out an outage here)."""


class _Health:
    """Outage bookkeeping: logged once when an outage begins and once when it ends.

    An outage ends when the side that saw it first (the writer or the reader)
    succeeds again: under another process's write lock reads still work, and
    they must not end the outage the writer is waiting out.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.failing_since: float | None = None
        self.side = "write"
        self.outages = 0
        self.retries = 0
        self.last_error: str | None = None

    def fault(self, error: BaseException, waiting: int, side: str = "write") -> None:
        self.retries += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if self.failing_since is None:
            self.failing_since = anyio.current_time()
            self.side = side
            self.outages += 1
            logger.warning(
                "database %r cannot be %s (%s); %d writes wait; retrying until it can",
                self.path,
                "read" if side == "read" else "written",
                self.last_error,
                waiting,
                extra={"reason": self.last_error},
            )

    def recovered(self, side: str = "write") -> None:
        since = self.failing_since
        if since is not None and side == self.side:
            self.failing_since = None
            logger.warning(
                "database %r works again after %.1f s", self.path, anyio.current_time() - since
            )

    def metrics(self, pending: int) -> StorageMetrics:
        since = self.failing_since
        return StorageMetrics(
            available=since is None,
            outages=self.outages,
            retries=self.retries,
            outage_seconds=0.0 if since is None else anyio.current_time() - since,
            last_error=self.last_error,
            pending_writes=pending,
        )


class _Fault(Exception):
    """A storage fault stopped a transaction: what it held runs again later."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class Store:
    """The database: one writer (group commit) and one reader connection."""

    def __init__(
        self,
        path: str,
        *,
        durability: Durability,
        max_pending: int,
        on_commit: Callable[[list[Committed]], None],
        on_busy: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
        timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.durability = durability
        self.max_pending = max_pending
        self.on_commit = on_commit
        # Pending work keeps the engine's shutdown drain waiting for the commit.
        self.on_busy = on_busy
        self.on_idle = on_idle
        self.timeout = timeout
        """How long a write or read a caller awaits waits out a storage fault."""
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock: EngineLock | None = None
        self._db: sqlite_utils.Database | None = None
        self._guarded_conn: _GuardedConnection | None = None
        token = secrets.token_hex(8)
        self._guard = _Guard(token)
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
        self._queue: list[Request] = []
        self._wakeup = anyio.Event()
        self._space: anyio.Event | None = None
        self._pending = 0
        # The writer task waits for work with nothing held back: a caller may
        # then run its own request in the writer's thread (see ``call``).
        self._parked = False
        self._writer_gone = False
        self._closing = False
        self._close_deadline = math.inf
        self._health = _Health(path)
        self.batches = 0
        """Transactions committed by the writer (each holds one or more requests)."""
        self.requests = 0
        """Requests run by the writer."""

    # ----------------------------------------------------------------- life

    async def open(self, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Open both connections, create or check the schema; returns the last seq.

        A database another process holds locked (a backup, a migration, the
        CLI) is waited for, up to ``timeout`` seconds (None: as long as it
        takes); then, or for a database that cannot be used at all, this
        raises one ``StorageError``.
        """
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        delay = RETRY_INITIAL
        try:
            while True:
                try:
                    head: int = await anyio.to_thread.run_sync(
                        self._open, limiter=self._write_limiter
                    )
                except _Fault as fault:
                    error = fault.error
                    self._health.fault(error, 0)
                    if anyio.current_time() + delay > deadline:
                        raise StorageError(
                            f"cannot open database {self.path!r}: it stayed unusable for "
                            f"{timeout} s ({type(error).__name__}: {error})"
                        ) from error
                    await anyio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                self._health.recovered()
                return head
        except BaseException:
            self._release_lock()
            raise

    def _open(self) -> int:
        path = self.path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot open database {path!r}: no directory {directory!r}")
        writer = reader = None
        try:
            # A look first (read-only): another application's file is refused
            # before anything, the lock file beside it included, is created.
            check_database(path)
            if self._lock is None:
                # Before anything changes: one engine per database file.
                try:
                    self._lock = EngineLock.acquire(path)
                except EngineLockHeld as held:
                    raise StorageError(
                        f"database {path!r} is in use by another engine ({held.holder}); "
                        "one engine runs on a database file at a time"
                    ) from None
                except OSError as exc:
                    raise StorageError(
                        f"cannot open database {path!r}: cannot create its lock file "
                        f"{lock_path(path)!r} ({exc})"
                    ) from exc
            writer = connect(path, durability=self.durability, timeout=BUSY_TIMEOUT)
            ensure_schema(writer, begin=self._begin, commit=self._commit, rollback=self._rollback)
            # A write now, not at the first commit: a read-only file is refused
            # here, and a lock held by another process is waited out here.
            writer.execute(self._begin)
            writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            add_to_schema(writer)
            writer.execute(self._commit)
            reader = connect(path, durability=self.durability, timeout=BUSY_TIMEOUT)
            # Foreign keys are enforced (SQLite's default is off); a deferred one
            # is checked at COMMIT, where a violation fails only the call behind it.
            writer.execute("PRAGMA foreign_keys=ON")
            # WAL checkpoints run from the housekeeping (checkpoint()), off the commit
            # path: an automatic one inside a COMMIT is what made commit latency spike.
            writer.execute("PRAGMA wal_autocheckpoint=0")
            head = last_seq(writer)
        except BaseException as exc:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            if isinstance(exc, sqlite3.Error):
                if _code(exc) in _LOCK_CODES:
                    raise _Fault(exc) from exc
                self._release_lock()
                raise StorageError(f"cannot open database {path!r}: {exc}") from exc
            if not isinstance(exc, _Fault):
                self._release_lock()
            raise
        writer.set_authorizer(self._authorize)
        self._writer = writer
        self._reader = reader
        guarded = _GuardedConnection(writer, self._guard)
        self._guarded_conn = guarded
        self._db = sqlite_utils.Database(cast(sqlite3.Connection, guarded))
        return head

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def close(self, *, within: float = math.inf) -> None:
        """Commit what is pending, then close the connections (``run`` returns).

        Through a storage outage pending writes are retried for up to
        ``within`` seconds; what is still uncommitted then is logged and
        dropped (durable events' positions never passed it: they come again).
        """
        self._closing = True
        self._close_deadline = anyio.current_time() + within
        self._wakeup.set()

    def _close_connections(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None
        self._release_lock()

    def metrics(self) -> StorageMetrics:
        return self._health.metrics(self._pending)

    async def run(self) -> None:
        """The writer loop: one transaction per batch of pending requests.

        A storage fault sends the batch back: the writer tries again with
        backoff, taking in what arrived meanwhile, so order is kept. Requests
        a caller awaits fail once their deadline passes.
        """
        waiting: list[Request] = []
        delay = RETRY_INITIAL
        # After a fault the next attempts take fewer requests (halved each
        # time): a batch too big for what is left of a full disk never stops
        # the ones that fit.
        limit = math.inf
        try:
            while True:
                if not waiting and not self._closing:
                    self._parked = True
                    try:
                        await self._wakeup.wait()
                    finally:
                        self._parked = False
                self._wakeup = anyio.Event()
                if self._queue:
                    waiting.extend(self._queue)
                    self._queue = []
                withdrawn = [r for r in waiting if r.cancelled]
                if withdrawn:
                    waiting = [r for r in waiting if not r.cancelled]
                    self._finish(withdrawn)
                if not waiting:
                    if self._closing:
                        return
                    continue
                batch = waiting if len(waiting) <= limit else waiting[: int(limit)]
                for request in batch:
                    request.taken = True
                # Not cancellable: the thread runs to the end of its COMMIT.
                with anyio.CancelScope(shield=True):
                    fault = await anyio.to_thread.run_sync(
                        self._write_batch, batch, limiter=self._write_limiter
                    )
                self._finish([r for r in batch if r.finished])
                waiting = [r for r in waiting if not r.finished]
                if fault is None:
                    self._health.recovered()
                    delay = RETRY_INITIAL
                    limit = math.inf
                    continue
                limit = max(1, len(batch) // 2)
                self._health.fault(fault, len(waiting) + len(self._queue))
                now = anyio.current_time()
                for request in batch:
                    request.taken = False  # rolled back: a caller may still withdraw it
                expired = [r for r in waiting if r.deadline is not None and r.deadline <= now]
                if expired:
                    for request in expired:
                        request.error = StorageError(
                            f"the database {self.path!r} stayed unwritable for "
                            f"{self.timeout} s ({type(fault).__name__}: {fault}); "
                            "nothing of this call was committed"
                        )
                        request.error.__cause__ = fault
                    waiting = [r for r in waiting if r.deadline is None or r.deadline > now]
                    self._finish(expired)
                if self._closing and now + delay > self._close_deadline:
                    self._abandon(waiting + self._queue, fault)
                    waiting, self._queue = [], []
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            self._closing = True  # later submits are refused, never left waiting
            with anyio.CancelScope(shield=True):
                # Anything still pending when the loop ends (cancelled) fails clearly.
                self._abandon(waiting + self._queue, None)
                self._queue = []
                self._writer_gone = True  # nothing queued from now on would ever run
                # A read still running in its thread finishes before its connection closes.
                async with self._read_limiter:
                    await anyio.to_thread.run_sync(
                        self._close_connections, limiter=self._write_limiter
                    )

    def _abandon(self, requests: list[Request], fault: BaseException | None) -> None:
        """The engine stops with ``requests`` uncommitted: their callers learn it; logged."""
        if not requests:
            return
        why = "" if fault is None else f" ({type(fault).__name__}: {fault})"
        kinds = collections.Counter(r.kind for r in requests if not r.cancelled)
        if kinds and fault is not None:
            logger.error(
                "the engine stops with %d writes not committed%s: %s",
                sum(kinds.values()),
                why,
                ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())),
            )
        for request in requests:
            request.error = EngineError(f"the engine stopped before this write committed{why}")
            # No completion callback: nothing of it happened, and a durable
            # delivery's position stays before its event.
            request.on_done = None
        self._finish(requests)

    def _done(self, request: Request) -> None:
        self._pending -= 1
        if request.waiter is not None:
            request.waiter.set()

    def _finish(self, requests: list[Request]) -> None:
        if not requests:
            return
        committed: list[Committed] = []
        for request in requests:
            if request.error is None:
                trace = request.trace
                committed.extend((seq, event, trace) for seq, event in request.events)
        if committed:
            self.on_commit(committed)
        for request in requests:
            if request.on_done is not None:
                try:
                    request.on_done(request)
                except Exception:  # pragma: no cover - the engine's own callbacks
                    logger.exception("write completion callback failed")
            self._done(request)
        if not self._pending:
            self.on_idle()
        if self._space is not None:
            self._space.set()
            self._space = None

    # ------------------------------------------------------------ submitting

    def _check_open(self) -> None:
        if self._closing:
            raise EngineError("the engine's database is closed")

    def submit(self, request: Request, *, bounded: bool = True) -> bool:
        """Queue ``request`` for the next batch; False if the writer is full."""
        self._check_open()
        if bounded and self._pending >= self.max_pending:
            return False
        self._queue.append(request)
        if not self._pending:
            self.on_busy()
        self._pending += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    async def call(
        self,
        fn: Callable[[Transaction], Any],
        *,
        kind: str = "write",
        background: bool = False,
        trace: str | None = None,
    ) -> Any:
        """Run ``fn(tx)`` in the next group commit; return its result after the COMMIT.

        Through a storage fault it waits up to ``timeout`` seconds, then raises
        ``StorageError`` (``background``: until it commits or the engine stops).
        Cancelled before the writer took it (or while a fault holds it back),
        it never runs. Once taken it cannot be undone: the cancellation waits
        for the COMMIT and is raised after it.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        request = Request(fn, kind=kind, trace=trace)
        handed = False
        if (
            self._parked
            and not self._pending
            and not self._closing
            and self._health.failing_since is None  # an outage is the writer's to wait out
        ):
            # Nothing else to commit: this caller runs its request in the writer's
            # thread itself, one thread round trip and no hand-off to the writer
            # task and back. Whoever comes meanwhile queues for the writer, whose
            # batch waits for the thread (the limiter): commit order is kept.
            self._pending = 1
            self.on_busy()
            request.taken = True
            # Not cancellable: the thread runs to the end of its COMMIT; a
            # cancellation meanwhile is raised after it (below).
            with anyio.CancelScope(shield=True):
                fault = await anyio.to_thread.run_sync(
                    self._write_batch, [request], limiter=self._write_limiter
                )
            if fault is None:
                self._finish([request])
                await anyio.lowlevel.checkpoint_if_cancelled()
                if request.error is not None:
                    raise request.error
                return request.result
            # Rolled back by a storage fault: the outage begins now (logged, in the
            # metrics), and the writer retries it with backoff, as any other (it is
            # counted as pending already).
            self._health.fault(fault, self._pending)
            request.taken = False
            handed = True
        if handed and self._writer_gone:
            # The engine stopped while this caller's thread ran: nobody retries it.
            self._abandon([request], fault)
            assert request.error is not None
            raise request.error
        request.waiter = waiter = anyio.Event()
        deadline = math.inf if background else anyio.current_time() + self.timeout
        request.deadline = None if background else deadline
        if handed:
            self._queue.append(request)
            self._wakeup.set()
        elif not self.submit(request):
            # max_pending writes wait (an outage holds them back): room, or the deadline.
            submitted = False
            with anyio.move_on_at(deadline):
                while not submitted:
                    if self._space is None:
                        self._space = anyio.Event()
                    await self._space.wait()
                    submitted = self.submit(request)
            if not submitted:
                raise StorageError(
                    f"the database {self.path!r} did not take this write within {self.timeout} s: "
                    f"{self._pending} writes wait for it ({self._health.last_error or 'busy'})"
                )
        try:
            await waiter.wait()
        except BaseException:
            # Withdrawn: never taken again. If the writer holds it now, its
            # COMMIT (or the fault that rolls it back) is waited for.
            request.cancelled = True
            if not request.taken:
                self._wakeup.set()
            else:
                with anyio.CancelScope(shield=True):
                    await waiter.wait()
            raise
        if request.error is not None:
            raise request.error
        return request.result

    # ------------------------------------------------------- in the thread

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
        # While a user's function runs, it may not end the engine's transaction
        # (COMMIT/ROLLBACK/BEGIN) or touch the engine's savepoint: that would
        # commit or discard the other callers' work in the batch behind their backs.
        guard = self._guard
        if guard.active and (
            action == sqlite3.SQLITE_TRANSACTION
            or (action == sqlite3.SQLITE_SAVEPOINT and arg2 == self._savepoint)
        ):
            guard.denied = True
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _write_batch(self, requests: list[Request]) -> BaseException | None:
        """Run ``requests`` in one transaction (the writer thread).

        Returns the storage fault that rolled them back, if one did: the
        requests not ``finished`` then run again later.
        """
        for request in requests:
            request.finished = False
            request.error = request.result = None
            request.events = []
        pending = requests
        try:
            while pending:
                pending = self._attempt(pending)
        except _Fault as fault:
            conn = self._writer
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(self._rollback)
            for request in requests:
                if not request.finished:
                    request.error = request.result = None
                    request.events = []
            return fault.error
        return None

    def _attempt(self, requests: list[Request]) -> list[Request]:
        """One transaction over ``requests``; returns those to run again.

        A request whose statement destroyed the transaction (a RAISE(ROLLBACK)
        trigger) fails on its own; the ones before it in the batch were rolled
        back with it and run again in a new transaction. A storage fault
        (locked, full, read-only, I/O) raises ``_Fault``: nobody's code failed.
        """
        conn = self._writer
        db = self._db
        assert conn is not None
        assert db is not None
        try:
            conn.execute(self._begin)
        except sqlite3.Error as exc:
            raise _Fault(exc) from exc
        savepoints = len(requests) > 1
        guarded = self._guarded_conn
        guard = self._guard
        now = time.time()
        begin_call, release_call, undo_call = self._savepoint_sql
        for index, request in enumerate(requests):
            tx = Transaction(conn, guarded, db, now, request.trace)
            if savepoints:
                _execute(conn, begin_call)
            guard.active = True
            guard.denied = False
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
                guard.active = False
            self.requests += 1
            error = request.error
            if error is not None:
                fault = storage_fault_in(error)
                if fault is not None:
                    raise _Fault(fault)
            if guard.denied and isinstance(error, sqlite3.DatabaseError):
                request.error = TransactionControlRefused(
                    "a transact function may not COMMIT, ROLLBACK or BEGIN (the engine commits "
                    "when it returns; raise to roll back): its work was rolled back"
                )
                request.error.__cause__ = error
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
                request.finished = True
                earlier = requests[:index]
                for other in earlier:
                    other.error = None
                    other.result = None
                    other.events = []
                    other.finished = False
                return earlier + requests[index + 1 :]
            if request.error is not None:
                request.finished = True
                if savepoints:
                    _execute(conn, undo_call)
                    _execute(conn, release_call)
                else:
                    _execute(conn, self._rollback)
                    return requests[index + 1 :]  # a batch of one: nothing else to keep
                continue
            request.events = tx.published
            if savepoints:
                _execute(conn, release_call)
        try:
            conn.execute(self._commit)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                _execute(conn, self._rollback)
            runnable = [r for r in requests if r.error is None]
            for request in runnable:
                request.result = None
                request.events = []
            if not isinstance(exc, sqlite3.IntegrityError):
                raise _Fault(exc) from exc
            if len(requests) > 1:
                # A deferred constraint failed at COMMIT: find whose work broke
                # it by committing each call on its own.
                for request in runnable:
                    self._commit_alone(request)
                return []
            for request in runnable:
                request.error = exc
                request.finished = True
            return []
        for request in requests:
            request.finished = True
        self.batches += 1
        return []

    def _commit_alone(self, request: Request) -> None:
        rest = self._attempt([request])
        assert not rest  # a batch of one has nothing to run again

    # ------------------------------------------------------------- reading

    async def checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits for the writer).

        Housekeeping: a storage fault skips this round.
        """
        try:
            await anyio.to_thread.run_sync(
                self._read,
                lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(),
                limiter=self._read_limiter,
            )
        except sqlite3.Error as exc:
            if not is_storage_fault(exc):
                raise
            logger.debug("WAL checkpoint skipped: %s", exc)

    async def read(
        self, fn: Callable[[sqlite3.Connection], Any], *, background: bool = True
    ) -> Any:
        """Run ``fn(conn)`` on the reader connection in a worker thread.

        A storage fault is retried with backoff until the read succeeds or
        the engine stops (``background=False``: for up to ``timeout``
        seconds, then ``StorageError``).
        """
        try:
            return await anyio.to_thread.run_sync(self._read, fn, limiter=self._read_limiter)
        except sqlite3.Error as exc:
            if not is_storage_fault(exc):
                raise
            error: sqlite3.Error = exc
        deadline = math.inf if background else anyio.current_time() + self.timeout
        delay = RETRY_INITIAL
        while True:
            self._health.fault(error, self._pending, "read")
            if self._closing or anyio.current_time() + delay > deadline:
                raise StorageError(f"cannot read database {self.path!r}: {error}") from error
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            try:
                result = await anyio.to_thread.run_sync(self._read, fn, limiter=self._read_limiter)
            except sqlite3.Error as exc:
                if not is_storage_fault(exc):
                    raise
                error = exc
                continue
            self._health.recovered("read")
            return result

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._reader
        if conn is None:
            raise EngineError("the engine's database is closed")
        return fn(conn)


def _execute(conn: sqlite3.Connection, sql: str) -> None:
    """The engine's own statement inside a batch: a failure there is a storage fault."""
    try:
        conn.execute(sql)
    except sqlite3.Error as exc:
        raise _Fault(exc) from exc


class OutboxRow:
    """An outbox row read back: its seq and the event, or why it cannot be decoded."""

    __slots__ = ("error", "event", "payload", "seq", "trace", "type")

    def __init__(
        self,
        seq: int,
        type_: str,
        payload: bytes,
        event: Event | None,
        error: BaseException | None,
        trace: str | None = None,
    ) -> None:
        self.trace = trace
        self.seq = seq
        self.type = type_
        self.payload = payload
        self.event = event
        self.error = error


def read_outbox(conn: sqlite3.Connection, after: int, limit: int) -> list[OutboxRow]:
    """Rows with ``seq > after`` in order, decoded (a row that fails carries its error)."""
    rows = conn.execute(
        "SELECT seq, type, payload, trace FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        (after, limit),
    ).fetchall()
    out: list[OutboxRow] = []
    for seq, type_, payload, trace in rows:
        # Another tool may have stored text (or worse): it is dead-lettered, not fatal.
        if not isinstance(payload, bytes):
            payload = str(payload).encode("utf-8", "surrogateescape")
        try:
            event: Event | None = decode(payload)
            error: BaseException | None = None
        except Exception as exc:
            event, error = None, exc
        if not isinstance(trace, str):  # absent, or another tool's value
            trace = None
        out.append(OutboxRow(seq, str(type_), payload, event, error, trace))
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


def forget_positions(conn: sqlite3.Connection, name: str) -> int:
    """Delete the stored positions of subscription (or projection) ``name``: in the
    outbox, and of a cluster node in its streams (with what its projections applied);
    returns how many partition positions there were. Runs in the caller's transaction."""
    forgotten = int(conn.execute("DELETE FROM tracking WHERE subscriber = ?", (name,)).rowcount)
    tables = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('cluster_positions', 'cluster_applied')"
        )
    }
    if "cluster_positions" in tables:  # a file an engine of this version opened
        forgotten += int(
            conn.execute("DELETE FROM cluster_positions WHERE subscriber = ?", (name,)).rowcount
        )
    if "cluster_applied" in tables:
        conn.execute("DELETE FROM cluster_applied WHERE subscriber = ?", (name,))
    return forgotten


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
