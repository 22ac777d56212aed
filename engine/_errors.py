"""The error hierarchy: one root, leaves named for what happened."""

from __future__ import annotations

__all__ = [
    "ActorStopped",
    "AskTimeout",
    "EngineError",
    "MailboxFull",
    "SupervisorEscalation",
]


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class MailboxFull(EngineError):
    """A mailbox had no room and its overflow policy refused or dropped the message."""


class ActorStopped(EngineError):
    """The actor is stopped (or stopping) and takes no more messages."""


class AskTimeout(EngineError, TimeoutError):
    """No reply arrived within the ``ask`` timeout."""


class SupervisorEscalation(EngineError):
    """A supervisor exceeded its restart intensity and gave up; the cause is chained."""
