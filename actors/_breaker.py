"""The breaker actor: owns a circuit breaker's open timer, its controls and its log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import anyio

from engine._actor import Actor
from engine._breaker import CircuitBreaker, CircuitState, ForceOpen, Generation, Moved, Reset
from engine._errors import EngineError

StartTask = Callable[..., None]
"""``runtime.start_task``: runs ``fn(*args)`` in the engine's task group (``name=``)."""

__all__ = ["BreakerActor"]

logger = logging.getLogger("actorbus.breaker")


class BreakerActor(Actor):
    """Times, controls and logs one breaker's moves between CLOSED, OPEN and HALF_OPEN.

    Callers publish the transitions their outcomes make (``breaker.publish``)
    and then tell this actor (``Moved``); it logs each generation once and arms
    the open timer of an OPEN one that is still published. The timer is a task
    in the engine's task group; when it runs out it moves the breaker to
    HALF_OPEN unless the state moved first. ``Reset`` and ``ForceOpen`` are the
    user's controls.
    """

    def __init__(self, breaker: CircuitBreaker, start_task: StartTask) -> None:
        self.breaker = breaker
        self.start_task = start_task
        self.timer: anyio.CancelScope | None = None
        # The OPEN generation the timer runs for.
        self.timed: Generation | None = None

    async def receive(self, message: Any) -> None:
        breaker = self.breaker
        match message:
            case Moved(generation=generation):
                self._announce(generation)
            case Reset():
                self._announce(breaker.publish(CircuitState.CLOSED))
            case ForceOpen():
                self._announce(breaker.publish(CircuitState.OPEN))
            case _:
                raise TypeError(f"the breaker actor got an unknown message {message!r}")
        # A caller's Moved can be refused by a full mailbox (user controls fill it): the
        # published generation still gets its log line and its timer on the next turn.
        self._announce(breaker.generation)

    async def on_start(self) -> None:
        # Caught up on what was published while no instance ran: before the engine
        # started (failures can open a breaker then) or while this actor restarted.
        self._announce(self.breaker.generation)

    async def on_stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _announce(self, generation: Generation) -> None:
        """Log ``generation`` once; arm its timer while it is the published OPEN one."""
        breaker = self.breaker
        if not generation.announced:
            generation.announced = True
            if generation.state is not generation.previous:
                state = generation.state
                logger.log(
                    logging.WARNING if state is CircuitState.OPEN else logging.INFO,
                    "breaker %r: %s -> %s",
                    breaker.name,
                    generation.previous.value,
                    state.value,
                    extra={"breaker": breaker.name, "state": state.value},
                )
        if generation is not breaker.generation or generation is self.timed:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timed = None
        if generation.state is CircuitState.OPEN:
            scope = anyio.CancelScope()
            self.timer = scope
            self.timed = generation
            self.start_task(
                self._half_open_after, scope, generation, name=f"breaker {breaker.name} timer"
            )

    async def _half_open_after(self, scope: anyio.CancelScope, generation: Generation) -> None:
        with scope:
            # From the opening, not from now: a breaker opened before its actor
            # started keeps the retry_after its callers were told.
            await anyio.sleep_until(generation.opened_at + self.breaker.config.timeout)
            breaker = self.breaker
            if generation is breaker.generation:
                moved = breaker.publish(CircuitState.HALF_OPEN)
                with contextlib.suppress(EngineError):  # stopping: the log no longer matters
                    self.ref.try_tell(Moved(moved))
