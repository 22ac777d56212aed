"""Operator commands on an actorbus database: ``python -m engine ...``.

Usage::

    python -m engine status PATH [--json]
    python -m engine dead-letters PATH [list] [--limit N] [--subscriber NAME] [--json]
    python -m engine dead-letters PATH show ID [--json]
    python -m engine dead-letters PATH replay ID
    python -m engine dead-letters PATH purge [--subscriber NAME]
    python -m engine prune PATH --older-than AGE
    python -m engine forget PATH NAME
    python -m engine tail PATH [--type T ...] [--from-seq N] [--follow] [--json]
    python -m engine cluster status URL --namespace NS [--json] [--timeout SECONDS]

``status``, ``list``, ``show`` and ``tail`` open the database read-only. ``replay``, ``purge``
and ``prune`` write in one ``BEGIN IMMEDIATE`` transaction, safe next to a running
engine. No command creates or migrates a database. ``replay`` only flags the row:
a running engine on the database redelivers it within about a second (or the next
one to start). ``prune`` deletes events older than AGE (``7d``, ``12h``, ``30m``,
``45s``, ``0``) that every tracked subscription has passed; with no tracked
subscription every old event counts as passed. ``forget`` deletes the stored
positions of a subscription (or projection) that is no longer run, so it stops
holding back ``prune``; were it registered again, it would start over from the
oldest retained event.

``tail`` prints outbox events oldest first (seq order is commit order), one line
each: seq, committed time (UTC), type tag, event id, tenant id (``-`` for none) and the
payload JSON. ``--json`` prints one JSON object per line instead: ``seq``, ``type``,
``id``, ``tenant_id``, ``committed_at``, ``payload`` (the payload decoded) and
``undecodable`` (true when the payload is not JSON: ``payload`` is then its raw text).
``--type T`` (repeatable) keeps only events tagged T. ``--from-seq N`` starts at seq
N. Without ``--follow`` it prints every retained event (from the oldest, or N) up to
the head as it was when it started, and exits. With ``--follow`` it starts at the
head, so only events committed from then on print (unless ``--from-seq`` is given),
says on stderr from which seq it follows, and polls every 0.2 s, read-only, next to a
running engine; a locked database is waited out (a note on stderr when it begins and
ends), events pruned between two polls are not printed, and Ctrl-C or SIGTERM end it
with status 0. Rows are read 500 at a time.

``cluster status`` reads the Redis of a cluster (never a database): the nodes and
when their heartbeats expire, the partition count, who holds each partition of each
cluster-scope subscription, each partition's lag and pending entries, the stream
lengths and how far each producer has forwarded. It needs coredis
(``pip install 'actorbus[redis]'``); without it, it fails with that one-line error.

Errors are one line on stderr (``error: ...``) with exit status 1; bad arguments
exit with status 2. Text from the database, Redis or the filesystem (names, paths,
errors, tracebacks) is printed with control characters escaped (``\\x1b``, ``\\r``, ``\\n``...): a
handler's error cannot move the cursor, recolour or clear the operator's terminal, nor
split one line into two. Only ``show`` keeps the line breaks of an error and traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, NamedTuple, NoReturn

import anyio
import msgspec

from ._cache import check_url, closing_connection_class, is_redis_outage, redact
from ._deadletters import DeadLetter, read_rows
from ._extras import MissingExtra, needs_redis
from ._store import (
    BUSY_TIMEOUT,
    SCHEMA_VERSION,
    connect,
    forget_positions,
    is_storage_fault,
    parse_age,
    prune_outbox,
    read_status,
)
from .cluster import MAX_PARTITIONS, RedisStreams

__all__ = ["main"]

_TABLES = frozenset({"outbox", "tracking", "dead_letters"})
_MAX_INTEGER = 2**63 - 1


class CliError(Exception):
    """A failure reported as one ``error: ...`` line and exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "unrecognized arguments" echoes the command line as it came.
        super().error(_safe(message))


# ---------------------------------------------------------------- database


def _open(path: str, *, write: bool = False) -> sqlite3.Connection:
    """A connection to the actorbus database at ``path``: read-only unless ``write``.

    The database is checked on a read-only connection first, so nothing is ever
    created or changed in a file that is not an actorbus database.
    """
    if not os.path.isfile(path):
        raise CliError(f"no database at {path}")
    conn = _read_only(path)
    try:
        _check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    if not write:
        return conn
    conn.close()
    return connect(path)


def _read_only(path: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to ``path``: SQLite never creates or changes the file."""
    return sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=timeout)


def _check_schema(conn: sqlite3.Connection, path: str) -> None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise CliError(f"cannot read {path} as an SQLite database: {exc}") from None
    if version > SCHEMA_VERSION:
        raise CliError(
            f"{path} has schema version {version}, newer than this actorbus knows "
            f"({SCHEMA_VERSION}); upgrade actorbus"
        )
    if version == 0 or not _TABLES.issubset(tables):
        raise CliError(f"{path} is not an actorbus database")
    if version < SCHEMA_VERSION:  # pragma: no cover - only one schema version exists yet
        raise CliError(
            f"{path} has schema version {version}, older than {SCHEMA_VERSION}; "
            "start an engine on it once to upgrade it"
        )


@contextmanager
def _transaction(path: str) -> Iterator[sqlite3.Connection]:
    """A write transaction (``BEGIN IMMEDIATE``), committed when the block ends."""
    with closing(_open(path, write=True)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


# ----------------------------------------------------------------- output

# What a terminal acts on rather than shows: C0 and C1 controls (ESC starts colour and
# cursor sequences, \r returns to the start of the line), DEL, the bidirectional
# overrides and isolates (they make text read otherwise than it is) and the Unicode line
# and paragraph separators.
_UNSAFE: Final = (
    *range(0x20),
    *range(0x7F, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    0x2028,
    0x2029,
)
_NAMED: Final = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES: Final = {
    code: _NAMED.get(code, f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
    for code in _UNSAFE
}
_ESCAPES_BUT_NEWLINES: Final = {code: text for code, text in _ESCAPES.items() if code != 0x0A}
# msgspec writes C0 controls in JSON strings as \u00XX but the rest as they are; they can
# occur only inside strings, where an escape means the same character.
_JSON_ESCAPES: Final = {code: f"\\u{code:04x}" for code in _UNSAFE if code >= 0x7F}


def _safe(value: object) -> str:
    """``value`` as one line of text, every control character escaped."""
    return str(value).translate(_ESCAPES)


def _safe_lines(text: str) -> str:
    """``text`` with its line breaks kept and every other control character escaped."""
    return text.translate(_ESCAPES_BUT_NEWLINES)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers), *([_safe(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip())


def _json(value: Any) -> None:
    # A dead letter's message may hold what JSON cannot: shown as its repr.
    print(msgspec.json.encode(value, enc_hook=repr).decode().translate(_JSON_ESCAPES))


def _first_line(text: str | None) -> str:
    return "" if text is None else text.strip().partition("\n")[0]


def _when(letter: DeadLetter) -> str:
    return letter.at.isoformat(timespec="seconds")


# --------------------------------------------------------------- commands


def _status(args: argparse.Namespace) -> None:
    with closing(_open(args.path)) as conn:
        status = read_status(conn)
    if args.json:
        _json(status)
        return
    first = "-" if status.first_seq is None else status.first_seq
    print(f"database        {_safe(args.path)}")
    print(f"schema version  {status.schema_version}")
    print(f"outbox          {status.events} events, first seq {first}, head {status.head}")
    print()
    if status.subscribers:
        _table(
            ["NAME", "KIND", "PARTITIONS", "POSITION", "LAG", "DEAD LETTERS"],
            [
                [s.name, s.kind, s.partitions, s.position, s.lag, s.dead_letters]
                for s in status.subscribers
            ],
        )
    else:
        print("no subscriptions or projections tracked")
    print()
    print(f"dead letters    {status.dead_letters}")


def _by_subscriber(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause and its arguments for ``--subscriber`` (all rows without it)."""
    if args.subscriber is None:
        return "", ()
    return "WHERE subscriber = ?", (args.subscriber,)


def _list(args: argparse.Namespace) -> None:
    where, params = _by_subscriber(args)
    limit = 20 if args.limit is None else args.limit
    with closing(_open(args.path)) as conn:
        letters = read_rows(conn, where, params, limit=limit or -1)
    if args.json:
        _json(letters)
        return
    if not letters:
        print("no dead letters")
        return
    _table(
        ["ID", "SUBSCRIBER", "REASON", "ATTEMPTS", "AT", "SEQ", "ERROR"],
        [
            [
                letter.id,
                letter.actor,
                letter.reason,
                letter.attempts,
                _when(letter),
                "-" if letter.seq is None else letter.seq,
                _first_line(letter.error),
            ]
            for letter in letters
        ],
    )


def _get(conn: sqlite3.Connection, letter_id: int) -> DeadLetter:
    rows = read_rows(conn, "WHERE id = ?", (letter_id,))
    if not rows:
        raise CliError(f"no dead letter with id {letter_id}")
    return rows[0]


def _show(args: argparse.Namespace) -> None:
    with closing(_open(args.path)) as conn:
        letter = _get(conn, args.id)
    if args.json:
        _json(letter)
        return
    print(f"id          {letter.id}")
    print(f"subscriber  {_safe(letter.actor)}")
    print(f"reason      {_safe(letter.reason)}")
    print(f"attempts    {letter.attempts}")
    print(f"at          {_when(letter)}")
    print(f"seq         {'-' if letter.seq is None else letter.seq}")
    error = _safe_lines(letter.error or "-").replace("\n", "\n            ")
    print(f"error       {error}")
    print(f"message     {_safe(repr(letter.message))}")
    if letter.traceback:
        print()
        print(_safe_lines(letter.traceback.rstrip()))


def _replay(args: argparse.Namespace) -> None:
    with _transaction(args.path) as conn:
        letter = _get(conn, args.id)
        conn.execute("UPDATE dead_letters SET replay_requested = 1 WHERE id = ?", (args.id,))
    print(
        f"dead letter {letter.id} for {_safe(repr(letter.actor))} marked for replay: a running "
        "engine on this database redelivers it within about a second (or the next one to start)"
    )


def _purge(args: argparse.Namespace) -> None:
    where, params = _by_subscriber(args)
    with _transaction(args.path) as conn:
        deleted = conn.execute(f"DELETE FROM dead_letters {where}", params).rowcount
    print(f"purged {deleted} dead letters")


def _prune(args: argparse.Namespace) -> None:
    with _transaction(args.path) as conn:
        deleted = prune_outbox(conn, time.time() - args.older_than)
    print(f"pruned {deleted} events")


def _forget(args: argparse.Namespace) -> None:
    with _transaction(args.path) as conn:
        deleted = forget_positions(conn, args.name)
        if not deleted:
            raise CliError(f"no subscription named {args.name!r} is tracked in {args.path}")
    print(
        f"forgot subscription {_safe(repr(args.name))} ({deleted} partition positions); if an "
        "engine still runs it, its next checkpoint stores them again"
    )


def _dead_letters(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    action = args.action
    if action in ("show", "replay") and args.id is None:
        parser.error(f"{action} needs a dead letter ID")
    if action in ("list", "purge") and args.id is not None:
        parser.error(f"{action} takes no ID")
    if args.limit is not None and action != "list":
        parser.error("--limit goes with list")
    if args.subscriber is not None and action not in ("list", "purge"):
        parser.error("--subscriber goes with list or purge")
    if args.json and action not in ("list", "show"):
        parser.error("--json goes with list or show")
    {"list": _list, "show": _show, "replay": _replay, "purge": _purge}[action](args)


# ------------------------------------------------------------------- tail

TAIL_PAGE: Final = 500
"""Rows read per query: a backlog of millions is printed page by page."""
TAIL_POLL: Final = 0.2
"""Seconds between two looks at the outbox with ``--follow``."""
MAX_TAG: Final = 255
"""The longest ``--type`` taken: the tag rule (``engine._events``) sets no length, and a
tag is a dotted name; a longer argument is refused rather than searched for."""


class TailEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``tail --json``."""

    seq: int
    type: str
    id: str
    tenant_id: str | None
    committed_at: datetime | None
    """When its transaction committed (the writer's clock, UTC); None if unreadable."""
    payload: Any
    """The encoded event decoded as JSON; its raw text when ``undecodable``."""
    undecodable: bool = False


def _committed(created_at: object) -> datetime | None:
    """An outbox row's ``created_at`` (unix time) as a UTC datetime; None if it is not one."""
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        return None
    try:
        return datetime.fromtimestamp(created_at, UTC)
    except (ValueError, OverflowError, OSError):  # out of range, NaN
        return None


def _head(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])


class _Tail:
    """Prints the outbox rows after ``position``, page by page, moving it as it goes."""

    def __init__(self, position: int, args: argparse.Namespace) -> None:
        self.position = position
        self.types = sorted(set(args.type or ()))
        self.json: bool = args.json

    def catch_up(self, conn: sqlite3.Connection) -> None:
        """Print every event after the position up to the head as it is now.

        Seq order is commit order (writers take the lock with ``BEGIN IMMEDIATE``), so a
        row below the head that is not there now never will be: the position can move
        to the head even when a page held no row of the types asked for.
        """
        upto = _head(conn)
        where = "seq > ? AND seq <= ?"
        if self.types:
            where += f" AND type IN ({', '.join('?' * len(self.types))})"
        sql = (
            "SELECT seq, id, type, tenant_id, payload, created_at FROM outbox "
            f"WHERE {where} ORDER BY seq LIMIT {TAIL_PAGE}"
        )
        while self.position < upto:
            rows = conn.execute(sql, (self.position, upto, *self.types)).fetchall()
            for row in rows:
                self.show(row)
            sys.stdout.flush()
            self.position = rows[-1][0] if len(rows) == TAIL_PAGE else upto

    def show(self, row: tuple[Any, ...]) -> None:
        seq, event_id, tag, tenant, payload, created_at = row
        text = _text(payload)
        committed = _committed(created_at)
        if self.json:
            try:
                decoded, undecodable = msgspec.json.decode(text), False
            except msgspec.DecodeError:
                decoded, undecodable = text, True
            _json(
                TailEvent(
                    seq=seq,
                    type=_text(tag),
                    id=_text(event_id),
                    tenant_id=None if tenant is None else _text(tenant),
                    committed_at=committed,
                    payload=decoded,
                    undecodable=undecodable,
                )
            )
            return
        when = "?" if committed is None else committed.isoformat(timespec="milliseconds")
        # C1 and bidi characters (raw in msgspec's JSON) as JSON escapes: the payload
        # stays valid JSON; _safe then escapes what JSON would not (another tool's text).
        payload = text.translate(_JSON_ESCAPES)
        fields = (seq, when.replace("+00:00", "Z"), tag, event_id, tenant or "-", payload)
        print(" ".join(_safe(_text(field)) for field in fields))


def _stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _follow(tail: _Tail, path: str) -> None:
    """Print new events as they commit until interrupted; a locked database is waited out.

    Each look opens its own read-only connection: an open WAL connection keeps a shared
    lock on the file between reads, so a tail left running would keep anyone from
    taking the file's exclusive lock (a tool in exclusive locking mode, a change of
    journal mode) and the last engine to close from removing the WAL.
    """
    # On stderr, so that stdout holds events only: where it starts, and that it runs.
    print(
        f"tail: following {_safe(path)} from seq {tail.position + 1} (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    waiting = False
    while True:
        try:
            # The engine's own bound on another's lock; held longer, looked at again later.
            with closing(_read_only(path, timeout=BUSY_TIMEOUT)) as conn:
                tail.catch_up(conn)
        except sqlite3.Error as exc:
            if not is_storage_fault(exc):
                raise
            if not waiting:
                print(f"tail: {_safe(path)}: {_safe(exc)}; retrying", file=sys.stderr, flush=True)
                waiting = True
        else:
            if waiting:
                print(f"tail: {_safe(path)} readable again", file=sys.stderr, flush=True)
                waiting = False
        time.sleep(TAIL_POLL)


def _tail(args: argparse.Namespace) -> None:
    try:
        with closing(_open(args.path)) as conn:  # the usual checks and errors, once
            tail = _Tail(0, args)
            if args.from_seq is not None:
                tail.position = args.from_seq - 1
            elif args.follow:
                tail.position = _head(conn)
            if not args.follow:
                tail.catch_up(conn)
                return
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C even when started with SIGINT ignored (a background job), and SIGTERM.
            handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _follow(tail, args.path)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    except KeyboardInterrupt:
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``tail ... | head``): nothing more to print.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------- cluster


class ClusterNode(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    live: bool
    """Its heartbeat has not expired (the engines' own rule)."""
    expires_in: float
    """Seconds until its heartbeat expires by Redis' clock (negative: expired)."""


class ClusterStream(msgspec.Struct, frozen=True, kw_only=True):
    partition: int
    key: str
    length: int


class ClusterPartition(msgspec.Struct, frozen=True, kw_only=True):
    partition: int
    holder: str | None
    """The node holding the lease, None when nobody does."""
    fence: int | None
    """The lease's fencing token."""
    lease_ttl: float | None
    """Seconds the lease has left unless renewed."""
    lag: int | None
    """Entries the subscription's group has not been given yet (None: Redis cannot tell)."""
    pending: int | None
    """Entries given to the holder and not acknowledged (None: no group on the stream)."""


class ClusterSubscription(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    partitions: list[ClusterPartition]


class ClusterProducer(msgspec.Struct, frozen=True, kw_only=True):
    producer: str
    """The producer id stored in a node's database."""
    forwarded: int
    """The highest outbox seq of that database in the streams."""


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    """The Redis URL, its password replaced by ``***``."""
    namespace: str
    partitions: int
    nodes: list[ClusterNode]
    streams: list[ClusterStream]
    subscriptions: list[ClusterSubscription]
    producers: list[ClusterProducer]


def _text(value: object) -> str:
    # Redis holds bytes; what is not UTF-8 is shown as escapes rather than refused.
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _number(value: object) -> int | None:
    try:
        return int(_text(value))
    except ValueError:
        return None


def _first(error: BaseException) -> BaseException:
    """The first error that is not a group inside ``error``."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _read_cluster(config: RedisStreams, seconds: float) -> ClusterStatus:
    """Everything ``cluster status`` shows; TimeoutError after ``seconds``."""
    try:
        with anyio.fail_after(seconds):
            return await _read_redis(config, seconds)
    except BaseExceptionGroup as group:
        # coredis runs the connection in a task group, which wraps what fails in it.
        raise _first(group) from None


async def _read_redis(config: RedisStreams, seconds: float) -> ClusterStatus:
    """What ``cluster status`` shows, in three round trips (pipelines)."""
    with needs_redis("python -m engine cluster status"):
        import coredis
        from coredis.retry import NoRetryPolicy

    # The keys the engines write (engine/_cluster.py).
    ns = config.namespace
    client = coredis.Redis.from_url(
        config.url,
        connect_timeout=seconds,
        stream_timeout=seconds,
        retry_policy=NoRetryPolicy(),
    )
    pool = client.connection_pool
    pool.connection_class = closing_connection_class(pool.connection_class)
    async with client:
        async with client.pipeline(transaction=False) as pipe:
            # TIME itself (coredis' time() drops the part below a second).
            now_reply = pipe.eval("return redis.call('TIME')")
            count_reply = pipe.get(f"{ns}:partitions")
            nodes_reply = pipe.zrange(f"{ns}:nodes", 0, -1, withscores=True)
            marks_reply = pipe.hgetall(f"{ns}:marks")
        stored = await count_reply
        if stored is None:
            raise CliError(
                f"no cluster namespace {ns!r} on {redact(config.url)} "
                f"({ns}:partitions is not set: no engine has joined it)"
            )
        count = _number(stored)
        if count is None or not 1 <= count <= MAX_PARTITIONS:
            raise CliError(
                f"{ns}:partitions on {redact(config.url)} holds {_text(stored)!r}, "
                f"not a partition count (1 to {MAX_PARTITIONS})"
            )
        clock: Any = await now_reply
        now_ms = int(clock[0]) * 1000 + int(clock[1]) / 1000
        nodes = [
            ClusterNode(
                node=_text(member),
                live=score >= now_ms,  # the engines count a node live until its expiry
                expires_in=round((score - now_ms) / 1000, 3),
            )
            for member, score in await nodes_reply
        ]
        producers = sorted(
            (
                ClusterProducer(producer=_text(producer), forwarded=_number(mark) or 0)
                for producer, mark in (await marks_reply).items()
            ),
            key=lambda p: p.producer,
        )

        # A missing stream makes XINFO GROUPS an error: read with raise_on_error=False.
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            per_stream = [
                (pipe.xlen(config.stream(p)), pipe.xinfo_groups(config.stream(p)))
                for p in range(count)
            ]
        streams: list[ClusterStream] = []
        groups: dict[str, dict[int, tuple[int | None, int | None]]] = {}
        for partition, (length_reply, groups_reply) in enumerate(per_stream):
            streams.append(
                ClusterStream(
                    partition=partition, key=config.stream(partition), length=await length_reply
                )
            )
            try:
                infos = await groups_reply
            except coredis.exceptions.ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                infos = ()
            for info in infos:
                fields = {_text(key): value for key, value in info.items()}
                lag = fields.get("lag")
                pending = fields.get("pending")
                groups.setdefault(_text(fields.get("name")), {})[partition] = (
                    None if lag is None else _number(lag),
                    None if pending is None else _number(pending),
                )

        names = sorted(groups)
        async with client.pipeline(transaction=False) as pipe:
            leases = {
                (name, p): (pipe.get(key), pipe.pttl(key))
                for name in names
                for p in range(count)
                for key in [f"{ns}:lease:{name}:{p}"]
            }
        subscriptions = []
        for name in names:
            rows = []
            for partition in range(count):
                value_reply, ttl_reply = leases[(name, partition)]
                value, ttl = await value_reply, await ttl_reply
                holder = fence = None
                if value is not None:
                    # "node/fence"; a value of another shape is shown whole.
                    node, slash, token = _text(value).rpartition("/")
                    fence = _number(token) if slash else None
                    holder = node if fence is not None else _text(value)
                lag, pending = groups[name].get(partition, (None, None))
                rows.append(
                    ClusterPartition(
                        partition=partition,
                        holder=holder,
                        fence=fence,
                        lease_ttl=ttl / 1000 if value is not None and ttl >= 0 else None,
                        lag=lag,
                        pending=pending,
                    )
                )
            subscriptions.append(ClusterSubscription(name=name, partitions=rows))
    return ClusterStatus(
        url=redact(config.url),
        namespace=ns,
        partitions=count,
        nodes=nodes,
        streams=streams,
        subscriptions=subscriptions,
        producers=producers,
    )


def _cluster_status(args: argparse.Namespace, config: RedisStreams) -> None:
    url = redact(config.url)
    try:
        status = anyio.run(_read_cluster, config, args.timeout)
    except TimeoutError:
        raise CliError(f"Redis at {url} did not answer within {args.timeout:g} s") from None
    except Exception as exc:
        if isinstance(exc, CliError | MissingExtra) or not is_redis_outage(exc):
            raise
        raise CliError(f"Redis at {url}: {type(exc).__name__}: {exc}") from None
    if args.json:
        _json(status)
        return
    live = sum(node.live for node in status.nodes)
    total = sum(stream.length for stream in status.streams)
    print(f"redis       {_safe(status.url)}")
    print(f"namespace   {_safe(status.namespace)}")
    print(f"partitions  {status.partitions}")
    print(f"nodes       {live} live of {len(status.nodes)}")
    print(f"streams     {total} entries")
    print()
    if status.nodes:
        _table(
            ["NODE", "LIVE", "HEARTBEAT EXPIRES"],
            [
                [
                    node.node,
                    "yes" if node.live else "no",
                    f"in {node.expires_in:.1f} s"
                    if node.expires_in >= 0
                    else f"{-node.expires_in:.1f} s ago",
                ]
                for node in status.nodes
            ],
        )
    else:
        print("no nodes")
    print()
    _table(
        ["PARTITION", "STREAM", "LENGTH"],
        [[s.partition, s.key, s.length] for s in status.streams],
    )
    print()
    if status.subscriptions:

        def shown(value: object | None, unit: str = "") -> str:
            return "-" if value is None else f"{value}{unit}"

        _table(
            ["SUBSCRIPTION", "PARTITION", "HOLDER", "FENCE", "LEASE TTL", "LAG", "PENDING"],
            [
                [
                    subscription.name,
                    p.partition,
                    shown(p.holder),
                    shown(p.fence),
                    "-" if p.lease_ttl is None else f"{p.lease_ttl:.1f} s",
                    "?" if p.lag is None and p.pending is not None else shown(p.lag),
                    shown(p.pending),
                ]
                for subscription in status.subscriptions
                for p in subscription.partitions
            ],
        )
    else:
        print("no cluster-scope subscriptions")
    print()
    if status.producers:
        _table(
            ["PRODUCER", "FORWARDED"],
            [[p.producer, p.forwarded] for p in status.producers],
        )
    else:
        print("no producers")


# ---------------------------------------------------------------- parsing


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= _MAX_INTEGER:  # SQLite integers are 64-bit
        raise argparse.ArgumentTypeError(f"{what} is an integer >= {low}, got {text!r}")
    return value


def _id(text: str) -> int:
    return _integer(text, 1, "an ID")


def _limit(text: str) -> int:
    return _integer(text, 0, "a limit")


def _seq(text: str) -> int:
    return _integer(text, 1, "a seq")


def _tag(text: str) -> str:
    shown = repr(text if len(text) <= 40 else f"{text[:40]}...")
    if not text.strip():
        raise argparse.ArgumentTypeError(f"a type tag is not empty or blank, got {shown}")
    if len(text) > MAX_TAG:
        raise argparse.ArgumentTypeError(
            f"a type tag is at most {MAX_TAG} characters, got {len(text)}: {shown}"
        )
    if text != text.strip():
        raise argparse.ArgumentTypeError(
            f"a type tag has no white space at either end, got {shown}"
        )
    if text != _safe(text):
        raise argparse.ArgumentTypeError(
            f"a type tag has no control or bidirectional characters, got {shown}"
        )
    return text


def _url(text: str) -> str:
    try:
        return check_url(text)
    except ValueError as exc:
        # The message shows the URL redacted; argparse's own would echo it whole.
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a timeout is a number of seconds > 0, got {text!r}")
    return value


class _Parsers(NamedTuple):
    main: argparse.ArgumentParser
    dead_letters: argparse.ArgumentParser
    cluster_status: argparse.ArgumentParser


def _parser() -> _Parsers:
    parser = _Parser(
        prog="python -m engine",
        description="Inspect and maintain an actorbus database, or inspect a cluster's Redis.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="the outbox, subscriptions and dead letters")
    status.add_argument("path", metavar="PATH")
    status.add_argument("--json", action="store_true", help="print JSON")

    letters = commands.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    letters.add_argument("path", metavar="PATH")
    letters.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "replay", "purge"]
    )
    letters.add_argument("id", nargs="?", type=_id, metavar="ID", help="for show and replay")
    letters.add_argument("--limit", type=_limit, metavar="N", help="list at most N (20; 0: all)")
    letters.add_argument("--subscriber", metavar="NAME", help="only those for NAME")
    letters.add_argument("--json", action="store_true", help="print JSON (list, show)")

    prune = commands.add_parser("prune", help="delete old events every subscription passed")
    prune.add_argument("path", metavar="PATH")
    prune.add_argument(
        "--older-than", type=_age, required=True, metavar="AGE", help="like 7d, 12h, 30m, 45s"
    )

    forget = commands.add_parser(
        "forget", help="delete a retired subscription's positions (it no longer holds prune)"
    )
    forget.add_argument("path", metavar="PATH")
    forget.add_argument("name", metavar="NAME", help="the subscription or projection")

    tail = commands.add_parser("tail", help="print outbox events as they commit")
    tail.add_argument("path", metavar="PATH")
    tail.add_argument(
        "--type", action="append", type=_tag, metavar="T", help="only events tagged T (repeatable)"
    )
    tail.add_argument(
        "--from-seq",
        type=_seq,
        metavar="N",
        help="start at seq N (default: the oldest event, or the head with --follow)",
    )
    tail.add_argument("--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--json", action="store_true", help="print one JSON object per line")

    cluster = commands.add_parser("cluster", help="inspect a cluster's Redis (no database)")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    cluster_status = actions.add_parser(
        "status", help="nodes, leases, lag and pending entries per subscription and partition"
    )
    cluster_status.add_argument("url", type=_url, metavar="URL", help="redis://host:port/db")
    cluster_status.add_argument("--namespace", required=True, metavar="NS")
    cluster_status.add_argument("--json", action="store_true", help="print JSON")
    cluster_status.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up when Redis has not answered by then (10)",
    )
    return _Parsers(parser, letters, cluster_status)


def _cluster(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        # The engines' own rules for the URL and the namespace.
        config = RedisStreams(args.url, namespace=args.namespace, node="cli")
    except ValueError as exc:
        parser.error(str(exc))
    _cluster_status(args, config)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (argument errors exit with 2)."""
    parsers = _parser()
    args = parsers.main.parse_args(argv)
    try:
        if args.command == "status":
            _status(args)
        elif args.command == "dead-letters":
            _dead_letters(args, parsers.dead_letters)
        elif args.command == "forget":
            _forget(args)
        elif args.command == "tail":
            _tail(args)
        elif args.command == "cluster":
            _cluster(args, parsers.cluster_status)
        else:
            _prune(args)
    except (CliError, MissingExtra) as exc:
        print(f"error: {_safe(exc)}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"error: {_safe(args.path)}: {_safe(exc)}", file=sys.stderr)
        return 1
    return 0
