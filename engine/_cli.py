"""Operator commands on an actorbus database: ``python -m engine ...``.

Usage::

    python -m engine status PATH [--json]
    python -m engine dead-letters PATH [list] [--limit N] [--subscriber NAME] [--json]
    python -m engine dead-letters PATH show ID [--json]
    python -m engine dead-letters PATH replay ID
    python -m engine dead-letters PATH purge [--subscriber NAME]
    python -m engine prune PATH --older-than AGE
    python -m engine forget PATH NAME
    python -m engine cluster status URL --namespace NS [--json] [--timeout SECONDS]

``status``, ``list`` and ``show`` open the database read-only. ``replay``, ``purge``
and ``prune`` write in one ``BEGIN IMMEDIATE`` transaction, safe next to a running
engine. No command creates or migrates a database. ``replay`` only flags the row:
a running engine on the database redelivers it within about a second (or the next
one to start). ``prune`` deletes events older than AGE (``7d``, ``12h``, ``30m``,
``45s``, ``0``) that every tracked subscription has passed; with no tracked
subscription every old event counts as passed. ``forget`` deletes the stored
positions of a subscription (or projection) that is no longer run, so it stops
holding back ``prune``; were it registered again, it would start over from the
oldest retained event.

``cluster status`` reads the Redis of a cluster (never a database): the nodes and
when their heartbeats expire, the partition count, who holds each partition of each
cluster-scope subscription, each partition's lag and pending entries, the stream
lengths and how far each producer has forwarded.

Errors are one line on stderr (``error: ...``) with exit status 1; bad arguments
exit with status 2. Text from the database or the filesystem (names, paths, errors,
tracebacks) is printed with control characters escaped (``\\x1b``, ``\\r``, ``\\n``...): a
handler's error cannot move the cursor, recolour or clear the operator's terminal, nor
split one line into two. Only ``show`` keeps the line breaks of an error and traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn

import anyio
import msgspec

from ._cache import check_url, closing_connection_class, is_redis_outage, redact
from ._deadletters import DeadLetter, read_rows
from ._store import SCHEMA_VERSION, connect, parse_age, prune_outbox, read_status
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
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    try:
        _check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    if not write:
        return conn
    conn.close()
    return connect(path)


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
        deleted = conn.execute("DELETE FROM tracking WHERE subscriber = ?", (args.name,)).rowcount
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


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = _Parser(
        prog="python -m engine", description="Inspect and maintain an actorbus database."
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
    return parser, letters


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (argument errors exit with 2)."""
    parser, letters = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            _status(args)
        elif args.command == "dead-letters":
            _dead_letters(args, letters)
        elif args.command == "forget":
            _forget(args)
        else:
            _prune(args)
    except CliError as exc:
        print(f"error: {_safe(exc)}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"error: {_safe(args.path)}: {_safe(exc)}", file=sys.stderr)
        return 1
    return 0
