"""Backpressure: one in-flight budget governs what every publisher sees."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable

import anyio
import msgspec

from ._errors import EngineError
from ._system import BackpressureStateChanged, Emit, ignore

__all__ = [
    "BackpressureConfig",
    "BackpressureController",
    "BackpressureError",
    "BackpressureMetrics",
    "BackpressureState",
]

logger = logging.getLogger("actorbus.backpressure")


class BackpressureError(EngineError):
    """The engine is CRITICAL: ``try_publish`` refused, or ``publish`` timed out waiting."""


class BackpressureState(enum.Enum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


# Module constants: an enum member lookup on the class costs ~10x a global read,
# and try_acquire/release run once per event.
_NORMAL = BackpressureState.NORMAL
_WARNING = BackpressureState.WARNING
_CRITICAL = BackpressureState.CRITICAL


class BackpressureConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The in-flight budget and its thresholds.

    WARNING from ``depth >= int(max_depth * warning)``, CRITICAL from
    ``depth >= int(max_depth * critical)``; a state is left only once the
    depth falls ``int(max_depth * hysteresis)`` below its threshold, so the
    state does not flap around a threshold.
    """

    max_depth: int = 10_000
    warning: float = 0.7
    critical: float = 0.9
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int):
            raise TypeError(f"max_depth must be an int, got {self.max_depth!r}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        for field in ("warning", "critical", "hysteresis"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{field} must be a fraction, got {value!r}")
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise ValueError(f"{field} must be between 0 and 1, got {value!r}")
        if not 0 < self.warning <= self.critical:
            raise ValueError(
                f"need 0 < warning <= critical, got warning={self.warning!r}, "
                f"critical={self.critical!r}"
            )
        if self.critical_depth < 1:
            raise ValueError(
                f"the critical threshold int(max_depth * critical) must be >= 1, got "
                f"int({self.max_depth} * {self.critical}) = 0"
            )
        if self.warning_depth < 1:
            raise ValueError(
                f"the warning threshold int(max_depth * warning) must be >= 1, got "
                f"int({self.max_depth} * {self.warning}) = 0"
            )
        if self.margin > self.warning_depth:
            # Leaving a state needs depth <= threshold - margin; below 0 it never could.
            raise ValueError(
                f"the hysteresis margin int(max_depth * hysteresis) = {self.margin} must not "
                f"exceed the warning threshold {self.warning_depth}"
            )

    @classmethod
    def checked(cls, config: object) -> BackpressureConfig:
        """``Engine``'s ``backpressure`` argument: a config, or None for the defaults."""
        if config is None:
            return cls()
        if not isinstance(config, BackpressureConfig):
            raise TypeError(
                f"backpressure must be a BackpressureConfig, got {type(config).__name__}"
            )
        return config

    @property
    def warning_depth(self) -> int:
        return int(self.max_depth * self.warning)

    @property
    def critical_depth(self) -> int:
        return int(self.max_depth * self.critical)

    @property
    def margin(self) -> int:
        return int(self.max_depth * self.hysteresis)


class BackpressureMetrics(msgspec.Struct, frozen=True, kw_only=True):
    depth: int
    """Events accepted and not yet finished by every matching subscription."""
    peak_depth: int
    state: BackpressureState
    accepted: int
    rejected: int
    """``try_publish`` refusals and ``publish`` timeouts."""
    transitions: int


class BackpressureController:
    """Counts in-flight events and moves NORMAL / WARNING / CRITICAL with hysteresis."""

    def __init__(self, config: BackpressureConfig) -> None:
        self.config = config
        self._warning_at = config.warning_depth
        self._critical_at = config.critical_depth
        self._margin = config.margin
        self.depth = 0
        self.peak_depth = 0
        self.state: BackpressureState = _NORMAL
        self.accepted = 0
        self.rejected = 0
        self.transitions = 0
        self._relieved: anyio.Event | None = None
        self._critical_entries = 0
        # Each change of state goes out as a BackpressureStateChanged (engine._system).
        self.emit: Emit = ignore

    def try_acquire(self) -> bool:
        """Take a slot unless CRITICAL."""
        if self.state is _CRITICAL:
            return False
        depth = self.depth = self.depth + 1
        self.accepted += 1
        if depth > self.peak_depth:
            self.peak_depth = depth
        if depth >= self._warning_at:
            self._rise(depth)
        return True

    async def acquire(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Take a slot, waiting while CRITICAL; ``BackpressureError`` after ``timeout``."""
        if not self.try_acquire():
            await self._wait_for_relief(timeout, self.try_acquire)

    async def admit(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Wait while CRITICAL without taking a slot; ``BackpressureError`` after ``timeout``.

        For durable publishers: the relay takes the event's slot when it dispatches.
        """
        if self.state is _CRITICAL:
            await self._wait_for_relief(timeout, lambda: self.state is not _CRITICAL)

    async def _wait_for_relief(
        self,
        timeout: float | None,  # noqa: ASYNC109
        ready: Callable[[], bool],
    ) -> None:
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                if self._relieved is None:
                    self._relieved = anyio.Event()
                await self._relieved.wait()
                if ready():
                    return
        self.rejected += 1
        raise BackpressureError(
            f"engine stayed CRITICAL ({self.depth} of {self.config.max_depth} in flight) "
            f"for {timeout} s"
        )

    def reject(self) -> None:
        self.rejected += 1

    def give_back(self) -> None:
        """Undo a ``try_acquire`` whose event was then refused: neither accepted nor in flight."""
        self.accepted -= 1
        self.release()

    def release(self) -> None:
        depth = self.depth = self.depth - 1
        if self.state is not _NORMAL:
            self._fall(depth)

    def _rise(self, depth: int) -> None:
        target = _CRITICAL if depth >= self._critical_at else _WARNING
        if target is not self.state and (target is _CRITICAL or self.state is _NORMAL):
            self._move(target)

    def _fall(self, depth: int) -> None:
        state = self.state
        if state is _CRITICAL and depth <= self._critical_at - self._margin:
            state = _WARNING
        if state is _WARNING and depth <= self._warning_at - self._margin:
            state = _NORMAL
        if state is not self.state:
            self._move(state)

    def _move(self, state: BackpressureState) -> None:
        old, self.state = self.state, state
        self.transitions += 1
        self.emit(BackpressureStateChanged(old=old.value, new=state.value, depth=self.depth))
        level = logging.INFO
        if state is _CRITICAL:
            # Under sustained load CRITICAL is entered once per hysteresis margin
            # of events: warn on the first entry and then every 100th, so the
            # log shows the pressure without flooding (the rest go to DEBUG).
            self._critical_entries += 1
            level = logging.WARNING if self._critical_entries % 100 == 1 else logging.DEBUG
        elif old is _CRITICAL:
            level = logging.DEBUG if self._critical_entries % 100 != 1 else logging.INFO
        logger.log(
            level,
            "backpressure %s -> %s at depth %d of %d (CRITICAL entered %d times)",
            old.value,
            state.value,
            self.depth,
            self.config.max_depth,
            self._critical_entries,
            extra={"state": state.value, "depth": self.depth},
        )
        if old is _CRITICAL and self._relieved is not None:
            self._relieved.set()
            self._relieved = None

    def metrics(self) -> BackpressureMetrics:
        return BackpressureMetrics(
            depth=self.depth,
            peak_depth=self.peak_depth,
            state=self.state,
            accepted=self.accepted,
            rejected=self.rejected,
            transitions=self.transitions,
        )
