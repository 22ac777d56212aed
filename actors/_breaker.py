"""The breaker actor: owns a circuit breaker's transitions, open timer and log."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio

from engine._actor import Actor
from engine._breaker import CircuitBreaker, CircuitState, Generation
from engine._errors import EngineError

if TYPE_CHECKING:
    from engine._engine import Engine

__all__ = ["BreakerActor"]

logger = logging.getLogger("actorbus.breaker")


class BreakerActor(Actor):
    """Moves one breaker between CLOSED, OPEN and HALF_OPEN.

    Callers report a generation that should move on (a failure that reached
    the threshold, any half-open failure, the success that ends HALF_OPEN);
    a report about a generation that is no longer published is stale and
    ignored. The open timer is a task in the engine's task group, cancelled
    when the state moves first.
    """

    def __init__(self, engine: Engine, breaker: CircuitBreaker) -> None:
        self.engine = engine
        self.breaker = breaker
        self.timer: anyio.CancelScope | None = None

    async def receive(self, message: Any) -> None:
        breaker = self.breaker
        current = breaker.generation
        match message:
            case ("open", Generation() as generation) if generation is current:
                self._open()
            case ("close", Generation() as generation) if (
                generation is current and current.state is CircuitState.HALF_OPEN
            ):
                self._publish(CircuitState.CLOSED)
            case ("half_open", Generation() as generation) if (
                generation is current and current.state is CircuitState.OPEN
            ):
                self._publish(CircuitState.HALF_OPEN)
            case "reset":
                self._publish(CircuitState.CLOSED)
            case "force_open":
                self._open()
            case _:
                pass  # a stale report: the state already moved on

    async def on_start(self) -> None:
        # Failures counted before the engine ran (no actor to tell) still open it.
        breaker = self.breaker
        current = breaker.generation
        if (
            current.state is CircuitState.CLOSED
            and current.failures >= breaker.config.failure_threshold
        ):
            self._open()

    async def on_stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _open(self) -> None:
        generation = self._publish(CircuitState.OPEN)
        scope = anyio.CancelScope()
        self.timer = scope
        self.engine._task_group.start_soon(
            self._half_open_after, scope, generation, name=f"breaker {self.breaker.name} timer"
        )

    async def _half_open_after(self, scope: anyio.CancelScope, generation: Generation) -> None:
        with scope:
            await anyio.sleep(self.breaker.config.timeout)
            cell = self._actorbus_cell
            if cell is not None and not cell.closed:
                with contextlib.suppress(EngineError):  # stopping: the state no longer matters
                    cell.ref.try_tell(("half_open", generation))

    def _publish(self, state: CircuitState) -> Generation:
        breaker = self.breaker
        old = breaker.generation
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        generation = Generation(state, old.number + 1, anyio.current_time())
        breaker.generation = generation
        if state is not old.state:
            breaker.transitions += 1
            logger.log(
                logging.WARNING if state is CircuitState.OPEN else logging.INFO,
                "breaker %r: %s -> %s",
                breaker.name,
                old.state.value,
                state.value,
                extra={"breaker": breaker.name, "state": state.value},
            )
        return generation
