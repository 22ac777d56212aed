"""Enums, configuration and statistics records shared by the runtime."""

from __future__ import annotations

import enum
import math
import random
from typing import Literal

import msgspec

__all__ = [
    "ActorState",
    "DeadLetterReason",
    "ActorStatistics",
    "Backoff",
    "Overflow",
    "Restart",
    "Strategy",
]


DeadLetterReason = Literal["failed", "dropped", "stopped", "shutdown"]
"""Why a message became a dead letter."""


class Overflow(enum.Enum):
    """What a full mailbox does with one more message."""

    BLOCK = "block"
    """The sender waits for room (backpressure); ``try_tell`` raises ``MailboxFull``."""
    REJECT = "reject"
    """The sender gets ``MailboxFull`` at once."""
    DROP_NEWEST = "drop_newest"
    """The new message is dead-lettered (reason ``dropped``); the sender carries on."""
    DROP_OLDEST = "drop_oldest"
    """The oldest queued message is dead-lettered to make room for the new one."""


class Restart(enum.Enum):
    """When a supervisor restarts a child (OTP meanings)."""

    PERMANENT = "permanent"
    """Always restarted, even after it stopped itself."""
    TRANSIENT = "transient"
    """Restarted only after a failure, not after it stopped itself."""
    TEMPORARY = "temporary"
    """Never restarted: a failure stops it for good."""


class Strategy(enum.Enum):
    """Which siblings a supervisor restarts together with a failed child."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class ActorState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ActorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one actor's mailbox and history."""

    name: str
    capacity: int
    """Mailbox capacity."""
    depth: int
    """Messages queued now (the one in progress is not counted)."""
    peak_depth: int
    """The highest ``depth`` seen since the actor was spawned."""
    processed: int
    """Messages whose ``receive`` returned."""
    failed: int
    """Calls to ``receive`` that raised (each attempt counts)."""
    restarts: int
    """Fresh instances created after the first one."""
    state: ActorState


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    """Exponential backoff with jitter between restarts.

    The n-th delay (n >= 1) is ``initial * multiplier ** (n - 1)``, capped at
    ``maximum``, then scaled by a random factor in ``[1 - jitter, 1 + jitter]``.
    """

    initial: float = 0.01
    maximum: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for field in ("initial", "maximum"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Backoff.{field} must be a finite number >= 0, got {value!r}")
        if self.maximum < self.initial:
            raise ValueError(
                f"Backoff.maximum must be >= initial ({self.initial!r}), got {self.maximum!r}"
            )
        if not isinstance(self.multiplier, int | float) or not self.multiplier >= 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier!r}")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff.jitter must be between 0 and 1, got {self.jitter!r}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before restart number ``attempt`` (1-based) of a series."""
        if attempt < 1:
            return 0.0
        # min() before the power would overflow for long series.
        exponent = min(attempt - 1, 1024)
        try:
            base = min(self.maximum, self.initial * self.multiplier**exponent)
        except OverflowError:
            base = self.maximum
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)


def check_enum(value: object, enum_type: type[enum.Enum], argument: str) -> None:
    if not isinstance(value, enum_type):
        choices = ", ".join(f"{enum_type.__name__}.{member.name}" for member in enum_type)
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


def check_int(value: object, argument: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")


def check_timeout(value: object, argument: str, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{argument} must be >= 0, got {value!r}")
