"""Dead letters: what could not be delivered, kept with its error."""

from __future__ import annotations

import collections
import itertools
import logging
import traceback as tb_module
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

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
    never silent.
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
        self.evicted = 0
        """Dead letters pushed out of the in-memory store by newer ones."""
        self.total = 0
        """Dead letters recorded since the engine started."""

    def add(
        self,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        *,
        error: BaseException | None = None,
        attempts: int = 0,
    ) -> DeadLetter:
        letter = DeadLetter(
            id=next(self._ids),
            actor=actor,
            message=message,
            reason=reason,
            error=describe(error),
            traceback=format_traceback(error),
            attempts=attempts,
        )
        self._entries[letter.id] = letter
        self.total += 1
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
        log = logger.warning if reason == "failed" else logger.info
        log(
            "dead letter %d for %r: %s%s",
            letter.id,
            actor,
            reason,
            f" ({letter.error})" if letter.error else "",
            extra={"actor": actor, "reason": reason},
        )
        return letter

    def count(self) -> int:
        """How many dead letters are stored."""
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
        """Deliver a dead letter again to the actor it was meant for.

        It leaves the store once the actor's mailbox accepted it; if it cannot
        be delivered (the actor is gone) it stays and the error is raised.
        """
        letter = self.get(dead_letter_id)
        await self._redeliver(letter)
        self._entries.pop(dead_letter_id, None)

    def purge(self) -> int:
        """Delete every stored dead letter; returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        return n
