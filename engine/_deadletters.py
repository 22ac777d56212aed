"""Dead letters: what could not be delivered, kept with its error."""

from __future__ import annotations

import collections
import itertools
import logging
import sqlite3
import traceback as tb_module
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from ._errors import EngineError
from ._events import Event, decode, encode
from ._store import Request, Store, event_tag
from ._system import DeadLettered, Emit, SystemEvent, ignore
from ._types import DeadLetterReason

__all__ = ["DeadLetter", "DeadLetters"]

logger = logging.getLogger("actorbus.deadletters")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message (or event) that could not be delivered, with why."""

    id: int
    actor: str
    """The actor (or subscription) it was meant for."""
    message: Any
    reason: DeadLetterReason
    error: str | None = None
    """``"ValueError: cannot digest"`` for a failed message."""
    traceback: str | None = None
    attempts: int = 0
    at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    seq: int | None = None
    """The event's outbox position, for a durable event."""
    entry: str | None = None
    """The stream entry id, for an event a cluster subscription read from Redis."""


def describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


def format_traceback(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return "".join(tb_module.format_exception(error))


class DeadLetters:
    """The engine's dead-letter store (``engine.dead_letters``).

    In memory it keeps the newest ``max_entries``; older ones are evicted with
    a warning in the log and counted in ``evicted``, so even an eviction is
    never silent. With a database every dead letter is a row in SQLite (it
    survives restarts) and SQLite numbers it: a dead letter is counted, listed
    and logged once its row committed (a storage outage delays that; it never
    loses the row). ``count()`` is exact and ``list()`` shows the oldest
    ``max_entries`` stored, kept in memory so neither blocks on SQLite;
    changes made beside the engine (``python -m engine dead-letters purge``)
    show within the engine's poll interval.
    """

    def __init__(
        self,
        redeliver: Callable[[DeadLetter], Awaitable[None]],
        *,
        max_entries: int = 10_000,
    ) -> None:
        self._redeliver = redeliver
        self._entries: collections.OrderedDict[int, DeadLetter] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._max_entries = max_entries
        self._store: Store | None = None
        self._count = 0
        # The highest id of a stored row this engine knows of.
        self._newest = 0
        # Ids whose rows committed while a refresh read the table (None: no refresh runs).
        self._recent: list[int] | None = None
        self.evicted = 0
        """Dead letters pushed out of the in-memory store by newer ones."""
        self.total = 0
        """Dead letters recorded since the engine started."""
        # Each recorded dead letter goes out as a DeadLettered (engine._system).
        self.emit: Emit = ignore

    @property
    def max_entries(self) -> int:
        return self._max_entries

    # -------------------------------------------------------------- durable

    def attach(self, store: Store, loaded: list[DeadLetter], count: int, newest: int) -> None:
        """Use ``store``: ``loaded`` are the oldest stored rows, ``count`` all of them."""
        self._store = store
        self._mirror(loaded)
        self._count = count
        self._newest = newest

    def detach(self) -> None:
        self._store = None

    def _mirror(self, letters: Iterable[DeadLetter]) -> None:
        self._entries = collections.OrderedDict(
            itertools.islice(((letter.id, letter) for letter in letters), self._max_entries)
        )

    def insert_row(
        self,
        conn: sqlite3.Connection,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
        *,
        seq: int | None = None,
        entry: str | None = None,
    ) -> DeadLetter:
        """Write a dead letter in the caller's transaction (the writer thread)."""
        letter = self._letter(0, actor, message, reason, error, attempts, seq, entry)
        return msgspec.structs.replace(letter, id=write_row(conn, letter))

    def restored(self, letter: DeadLetter) -> None:
        """Count a dead letter whose row ``insert_row`` wrote (after its commit)."""
        self._remember(letter)
        self._log(letter)

    async def refresh(self) -> None:
        """Follow changes made beside the engine (the CLI's purge) in count and list."""
        store = self._store
        if store is None:
            return
        limit = self._max_entries
        known = (self._count, self._newest)
        recent: list[int] = []
        self._recent = recent
        try:
            found = await store.read(lambda conn: _summary(conn, limit, known))
        finally:
            self._recent = None
        if found is None:
            return
        count, newest, rows = found
        later = [i for i in recent if i > newest]
        self._count = count + len(later)
        self._newest = max([newest, *later])
        mirrored = {letter.id: letter for letter in rows}
        for letter_id in later:
            letter = self._entries.get(letter_id)
            if letter is not None:
                mirrored[letter_id] = letter
        self._mirror(mirrored[i] for i in sorted(mirrored))

    # --------------------------------------------------------------- record

    def _letter(
        self,
        id_: int,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
        seq: int | None,
        entry: str | None = None,
    ) -> DeadLetter:
        return DeadLetter(
            id=id_,
            actor=actor,
            message=message,
            reason=reason,
            error=describe(error),
            traceback=format_traceback(error),
            attempts=attempts,
            seq=seq,
            entry=entry,
        )

    def add(
        self,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        *,
        error: BaseException | None = None,
        attempts: int = 0,
        seq: int | None = None,
        event_type: str | None = None,
        entry: str | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Record a dead letter; ``then()`` runs once it is recorded.

        With a database that is after its row committed: a storage outage
        holds it back (retried until the database is writable again), and if
        the engine stops first ``then`` never runs — so what ``then`` does (a
        durable subscription's position moving past the event) never happens
        for a dead letter that was not stored.
        """
        store = self._store
        if store is None:
            letter = self._letter(
                next(self._ids), actor, message, reason, error, attempts, seq, entry
            )
            self._remember(letter)
            self._log(letter)
            self._announce(letter)
            if then is not None:
                then()
            return
        pending = self._letter(0, actor, message, reason, error, attempts, seq, entry)

        def written(request: Request) -> None:
            if request.error is not None:  # pragma: no cover - write_row stores any message
                logger.error(
                    "dead letter for %r could not be stored: %s",
                    actor,
                    describe(request.error),
                    extra={"actor": actor, "reason": reason},
                )
                return
            letter = msgspec.structs.replace(pending, id=request.result)
            self.restored(letter)
            self._announce(letter)
            if then is not None:
                then()

        try:
            store.submit(
                Request(
                    lambda tx: write_row(tx.conn, pending, event_type),
                    written,
                    kind="dead letters",
                ),
                bounded=False,
            )
        except EngineError as exc:  # an actor stopping after the database closed
            logger.error(
                "dead letter for %r (%s%s) could not be stored: %s",
                actor,
                reason,
                f", {pending.error}" if pending.error else "",
                exc,
                extra={"actor": actor, "reason": reason},
            )

    def _announce(self, letter: DeadLetter) -> None:
        """A DeadLettered, unless the letter is a system event's (a system subscriber
        that fails must not feed itself)."""
        if not isinstance(letter.message, SystemEvent):
            self.emit(
                DeadLettered(actor=letter.actor, reason=letter.reason, dead_letter_id=letter.id)
            )

    def _remember(self, letter: DeadLetter) -> None:
        self.total += 1
        if self._store is not None:
            self._count += 1
            self._newest = max(self._newest, letter.id)
            if self._recent is not None:
                self._recent.append(letter.id)
            if len(self._entries) < self._max_entries:
                self._entries[letter.id] = letter
            return
        self._entries[letter.id] = letter
        if len(self._entries) > self._max_entries:
            _, oldest = self._entries.popitem(last=False)
            self.evicted += 1
            logger.warning(
                "dead-letter store full (%d): evicted dead letter %d for %r (%s)",
                self._max_entries,
                oldest.id,
                oldest.actor,
                oldest.reason,
                extra={"actor": oldest.actor, "reason": oldest.reason},
            )

    def _log(self, letter: DeadLetter) -> None:
        log = logger.warning if letter.reason == "failed" else logger.info
        log(
            "dead letter %d for %r: %s%s",
            letter.id,
            letter.actor,
            letter.reason,
            f" ({letter.error})" if letter.error else "",
            extra={"actor": letter.actor, "reason": letter.reason},
        )

    # --------------------------------------------------------------- query

    def count(self) -> int:
        """How many dead letters are stored."""
        if self._store is not None:
            return self._count
        return len(self._entries)

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` stored dead letters."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        return list(itertools.islice(self._entries.values(), limit))

    def get(self, dead_letter_id: int) -> DeadLetter:
        try:
            return self._entries[dead_letter_id]
        except KeyError:
            raise KeyError(f"no dead letter with id {dead_letter_id!r}") from None

    async def replay(self, dead_letter_id: int) -> None:
        """Deliver a dead letter again to the actor or subscription it was meant for.

        It leaves the store once the actor's mailbox accepted it; if it cannot
        be delivered (the actor is gone) it stays and the error is raised.
        With a database the stored row is what is replayed (one purged beside
        the engine is gone: ``KeyError``).
        """
        store = self._store
        letter = None
        if store is None:
            letter = self._entries.get(dead_letter_id)
        elif type(dead_letter_id) is int:
            rows = await store.read(
                lambda conn: read_rows(conn, "WHERE id = ?", (dead_letter_id,)), background=False
            )
            letter = rows[0] if rows else None
            if letter is None and self._entries.pop(dead_letter_id, None) is not None:
                await self.refresh()  # deleted beside the engine
        if letter is None:
            raise KeyError(f"no dead letter with id {dead_letter_id!r}")
        await self._redeliver(letter)
        await self.forget(letter.id)

    async def forget(self, dead_letter_id: int) -> None:
        """Delete one stored dead letter (after its replay)."""
        store = self._store
        self._entries.pop(dead_letter_id, None)
        if store is None:
            return
        # The row may be gone already (a projection's replay deletes it in its
        # own transaction): it was stored when the replay began, so it counts.
        await store.call(
            lambda tx: tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,)),
            kind="dead letters",
        )
        self._count = max(0, self._count - 1)
        if self._count > len(self._entries) < self._max_entries:
            # Stored letters beyond the mirror move up into it (list() shows the oldest).
            rows = await store.read(lambda conn: read_rows(conn, limit=self._max_entries))
            newest = rows[-1].id if rows else 0
            merged = {letter.id: letter for letter in rows}
            for letter in self._entries.values():
                if letter.id > newest:
                    merged[letter.id] = letter  # recorded, its row not yet read back
            self._mirror(merged[i] for i in sorted(merged))

    def purge(self) -> int:
        """Delete every stored dead letter; returns how many there were."""
        store = self._store
        if store is not None:
            n = self._count
            newest = self._newest
            # Rows that commit after this are newer: they stay, and are counted.
            store.submit(
                Request(
                    lambda tx: tx.conn.execute("DELETE FROM dead_letters WHERE id <= ?", (newest,)),
                    kind="dead letters",
                ),
                bounded=False,
            )
            self._count = 0
            self._entries.clear()
            return n
        n = len(self._entries)
        self._entries.clear()
        return n


# ------------------------------------------------------------- rows in SQLite

_INSERT = (
    "INSERT INTO dead_letters (subscriber, seq, event_id, type, payload, encoding, reason, "
    "error, traceback, attempts, at, entry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def write_row(conn: sqlite3.Connection, letter: DeadLetter, event_type: str | None = None) -> int:
    """Insert ``letter`` (its ``id`` is ignored); returns the id SQLite gave it."""
    message = letter.message
    event_id = None
    if isinstance(message, Event):
        encoding, payload = "event", encode(message)
        event_type, event_id = event_tag(message), str(message.id)
    elif isinstance(message, bytes) and (letter.seq is not None or letter.entry is not None):
        encoding, payload = "raw", message  # an outbox row or stream entry that did not decode
    else:
        try:
            encoding, payload = "msgpack", msgspec.msgpack.encode(message)
        except (TypeError, ValueError, OverflowError):
            encoding, payload = "repr", repr(message).encode("utf-8", "backslashreplace")
    cursor = conn.execute(
        _INSERT,
        (
            letter.actor,
            letter.seq,
            event_id,
            event_type,
            payload,
            encoding,
            letter.reason,
            letter.error,
            letter.traceback,
            letter.attempts,
            letter.at.timestamp(),
            letter.entry,
        ),
    )
    row_id = cursor.lastrowid
    assert row_id is not None
    return row_id


def _summary(
    conn: sqlite3.Connection, limit: int, known: tuple[int, int]
) -> tuple[int, int, list[DeadLetter]] | None:
    """How many rows, the newest id and the oldest ``limit`` rows, in one snapshot;
    None when the count and the newest id are still ``known``."""
    conn.execute("BEGIN")
    try:
        count, newest = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM dead_letters"
        ).fetchone()
        if (count, newest) == known:
            return None
        return count, newest, read_rows(conn, limit=limit)
    finally:
        conn.execute("COMMIT")


def read_rows(
    conn: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = (), limit: int = -1
) -> list[DeadLetter]:
    # A database no engine of this version opened yet has no entry column.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
    entry = "entry" if "entry" in columns else "NULL"
    rows = conn.execute(
        "SELECT id, subscriber, seq, payload, encoding, reason, error, traceback, attempts, at, "
        f"{entry} FROM dead_letters {where} ORDER BY id LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [from_row(*row) for row in rows]


def from_row(
    id_: int,
    actor: str,
    seq: int | None,
    payload: bytes | None,
    encoding: str,
    reason: str,
    error: str | None,
    traceback: str | None,
    attempts: int,
    at: float,
    entry: str | None = None,
) -> DeadLetter:
    message: Any = payload
    if payload is not None:
        try:
            if encoding == "event":
                message = decode(payload)
            elif encoding == "msgpack":
                message = msgspec.msgpack.decode(payload)
            elif encoding == "repr":
                message = bytes(payload).decode("utf-8", "replace")
        except Exception:
            message = bytes(payload)  # its type is no longer registered: kept as stored
    return DeadLetter(
        id=id_,
        actor=actor,
        message=message,
        reason=reason,  # type: ignore[arg-type]
        error=error,
        traceback=traceback,
        attempts=attempts,
        at=datetime.fromtimestamp(at, UTC),
        seq=seq,
        entry=entry,
    )
