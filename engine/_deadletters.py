"""Dead letters: what could not be delivered, kept with its error."""

from __future__ import annotations

import collections
import itertools
import logging
import sqlite3
import traceback as tb_module
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["DeadLetter", "DeadLetters"]

logger = logging.getLogger("actorbus.deadletters")

DeadLetterReason = Literal["failed", "dropped", "stopped", "shutdown"]


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
    survives restarts); ``count()`` is exact and ``list()`` shows the oldest
    ``max_entries`` of them, kept in memory so neither blocks on SQLite.
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
        self.evicted = 0
        """Dead letters pushed out of the in-memory store by newer ones."""
        self.total = 0
        """Dead letters recorded since the engine started."""

    # -------------------------------------------------------------- durable

    def attach(self, store: Store, loaded: list[DeadLetter], count: int, last_id: int) -> None:
        """Use ``store``: ``loaded`` are the oldest stored rows, ``count`` all of them."""
        self._store = store
        self._entries.clear()
        for letter in loaded[: self._max_entries]:
            self._entries[letter.id] = letter
        self._count = count
        self._ids = itertools.count(max(last_id, 0) + 1)

    def detach(self) -> None:
        self._store = None

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
    ) -> DeadLetter:
        """Write a dead letter in the caller's transaction (the writer thread)."""
        letter = self._letter(actor, message, reason, error, attempts, seq)
        write_row(conn, letter)
        return letter

    def restored(self, letter: DeadLetter) -> None:
        """Count a dead letter whose row ``insert_row`` wrote (after its commit)."""
        self._remember(letter)
        self._log(letter)

    # --------------------------------------------------------------- record

    def _letter(
        self,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
        seq: int | None,
    ) -> DeadLetter:
        return DeadLetter(
            id=next(self._ids),
            actor=actor,
            message=message,
            reason=reason,
            error=describe(error),
            traceback=format_traceback(error),
            attempts=attempts,
            seq=seq,
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
    ) -> DeadLetter:
        letter = self._letter(actor, message, reason, error, attempts, seq)
        store = self._store
        if store is not None:
            from ._store import Request

            store.submit(Request(lambda tx: write_row(tx.conn, letter, event_type)), bounded=False)
        self._remember(letter)
        self._log(letter)
        return letter

    def _remember(self, letter: DeadLetter) -> None:
        self.total += 1
        if self._store is not None:
            self._count += 1
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
        """
        store = self._store
        letter = self._entries.get(dead_letter_id)
        if letter is None and store is not None and type(dead_letter_id) is int:
            rows = await store.read(lambda conn: read_rows(conn, "WHERE id = ?", (dead_letter_id,)))
            letter = rows[0] if rows else None
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
        await store.call(
            lambda tx: tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
        )
        self._count = max(0, self._count - 1)
        if self._count > len(self._entries) < self._max_entries:
            # Stored letters beyond the mirror move up into it (list() shows the oldest).
            rows = await store.read(lambda conn: read_rows(conn, limit=self._max_entries))
            newest = rows[-1].id if rows else 0
            merged = {letter.id: letter for letter in rows}
            for letter in self._entries.values():
                if letter.id > newest:
                    merged[letter.id] = letter  # recorded, its row not yet committed
            self._entries = collections.OrderedDict(
                itertools.islice(sorted(merged.items()), self._max_entries)
            )

    def purge(self) -> int:
        """Delete every stored dead letter; returns how many there were."""
        store = self._store
        if store is not None:
            from ._store import Request

            n = self._count
            last = next(self._ids) - 1
            self._ids = itertools.count(last + 1)
            store.submit(
                Request(
                    lambda tx: tx.conn.execute("DELETE FROM dead_letters WHERE id <= ?", (last,))
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
    "INSERT INTO dead_letters (id, subscriber, seq, event_id, type, payload, encoding, reason, "
    "error, traceback, attempts, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def write_row(conn: sqlite3.Connection, letter: DeadLetter, event_type: str | None = None) -> None:
    from ._events import Event, encode
    from ._store import event_tag

    message = letter.message
    event_id = None
    if isinstance(message, Event):
        encoding, payload = "event", encode(message)
        event_type, event_id = event_tag(message), str(message.id)
    elif isinstance(message, bytes) and letter.seq is not None:
        encoding, payload = "raw", message  # an outbox row that could not be decoded
    else:
        try:
            encoding, payload = "msgpack", msgspec.msgpack.encode(message)
        except (TypeError, ValueError, OverflowError):
            encoding, payload = "repr", repr(message).encode("utf-8", "backslashreplace")
    conn.execute(
        _INSERT,
        (
            letter.id,
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
        ),
    )


def read_rows(
    conn: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = (), limit: int = -1
) -> list[DeadLetter]:
    rows = conn.execute(
        "SELECT id, subscriber, seq, payload, encoding, reason, error, traceback, attempts, at "
        f"FROM dead_letters {where} ORDER BY id LIMIT ?",
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
) -> DeadLetter:
    from ._events import decode

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
    )
