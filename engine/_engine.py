"""The Engine: owns the task group, the root supervisor, the registry and shutdown."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, NoReturn

import anyio
import msgspec
from anyio.abc import TaskGroup

from . import catalog, events, tenancy
from ._actor import Actor, ActorRef, Cell
from ._deadletters import DeadLetter, DeadLetters
from ._errors import ActorStopped, EngineError
from ._supervision import Supervisor, SupervisorRef
from ._types import ActorStatistics, Backoff, Overflow, Restart, Strategy, check_int, check_timeout

__all__ = ["Engine", "EngineMetrics"]

logger = logging.getLogger("actorbus.engine")


class EngineMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the engine (``engine.metrics()``)."""

    actors: dict[str, ActorStatistics]
    """Every running actor's mailbox statistics, by name."""
    in_flight: int
    """Messages accepted by some mailbox and not yet handled or dead-lettered."""
    dead_letters: int
    """Dead letters stored now."""
    dead_letters_total: int
    """Dead letters recorded since the engine started (including evicted ones)."""


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


class Engine:
    """An actor engine embedded in any anyio, trio or asyncio program.

    ``async with Engine() as engine:`` starts it; leaving the block drains what
    mailboxes accepted (within ``shutdown_timeout``), stops every actor in
    reverse start order and joins every task. An error nobody handled — a root
    supervisor that gave up — is raised from the ``async with``.
    """

    events = events
    """The event codec and registry (``engine.events.encode``/``decode``)."""
    catalog = catalog
    """The domain event catalog (CMS and shop)."""
    tenancy = tenancy
    """Tenant identifier validation."""

    def __init__(
        self,
        database: str | os.PathLike[str] | None = None,
        *,
        shutdown_timeout: float = 10.0,
        durability: Literal["full", "normal"] = "full",
        dead_letter_limit: int = 10_000,
    ) -> None:
        if database is not None and not isinstance(database, str | os.PathLike):
            raise TypeError(f"database must be a path or None, got {type(database).__name__}")
        if database is not None:
            raise EngineError(
                "durable storage (Engine(database)) is not available in this version; "
                "use Engine() for in-memory operation"
            )
        check_timeout(shutdown_timeout, "shutdown_timeout", allow_none=False)
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        check_int(dead_letter_limit, "dead_letter_limit", 1)
        self.database = database
        self.shutdown_timeout = float(shutdown_timeout)
        self.durability = durability
        self.dead_letters = DeadLetters(self._redeliver, max_entries=dead_letter_limit)
        self._names: dict[str, Cell | Supervisor] = {}
        self._rng = random.Random()
        self._root: Supervisor | None = None
        self._tg: TaskGroup | None = None
        self._running = False
        self._accepting = False
        self._closing = False
        self._draining = False
        self._drained = anyio.Event()
        # Cells not waiting idle for messages: the drain ends when this is 0.
        self._busy = 0

    # ---------------------------------------------------------- context manager

    async def __aenter__(self) -> Engine:
        if self._running or self._closing:
            raise EngineError("an Engine can be entered only once")
        self._drained = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._root = Supervisor(
            self,
            "root",
            None,
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=3,
            within=5.0,
            backoff=Backoff(),
        )
        tg.start_soon(self._root.run, name="actorbus root supervisor")
        self._running = True
        self._accepting = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        error = exc
        try:
            # With an error in flight the drain is skipped, but actors still get
            # on_stop; the shield keeps a pending cancellation from cutting that short.
            with anyio.CancelScope(shield=exc is not None):
                await self._shutdown(drain=exc is None)
        except BaseException as shutdown_error:  # handed to the task group below
            error = shutdown_error
        finally:
            self._running = False
            tg.cancel_scope.cancel()
        try:
            suppressed = await tg.__aexit__(
                type(error) if error else None, error, error.__traceback__ if error else None
            )
        except BaseExceptionGroup as group:
            # One failure is raised as itself (a SupervisorEscalation, the
            # body's own error), not wrapped in a group of one.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from leaves[0].__cause__
            raise
        if error is not None and error is not exc and not suppressed:
            raise error
        return suppressed

    async def _shutdown(self, *, drain: bool) -> None:
        self._accepting = False
        self._closing = True
        root = self._root
        assert root is not None
        for target in self._names.values():
            if isinstance(target, Cell):
                target.open = False
        timed_out = False
        if drain and self._busy:
            self._draining = True
            with anyio.move_on_after(self.shutdown_timeout):
                await self._drained.wait()
            self._draining = False
            timed_out = self._busy > 0
            if timed_out:
                logger.warning(
                    "shutdown: %d messages still in flight after %.1f s; dead-lettering them",
                    self._in_flight(),
                    self.shutdown_timeout,
                )
        with anyio.move_on_after(self.shutdown_timeout):
            await root.terminate("shutdown", cancel_current=timed_out or not drain)

    # ------------------------------------------------------------- internals

    @property
    def _task_group(self) -> TaskGroup:
        if self._tg is None or not self._running:
            raise EngineError("the engine is not running: use `async with Engine() as engine:`")
        return self._tg

    def _refuse(self) -> NoReturn:
        if not self._running:
            raise EngineError("the engine is not running: use `async with Engine() as engine:`")
        raise EngineError("the engine is shutting down and takes no new work from outside")

    def _check_accepting(self) -> None:
        if not self._accepting:
            self._refuse()

    def _check_name_free(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"name {name!r} is already taken by a running actor or supervisor")

    def _forget(self, child: Cell | Supervisor) -> None:
        if self._names.get(child.name) is child:
            del self._names[child.name]

    def _cell_idle(self) -> None:
        self._busy -= 1
        if self._draining and not self._busy:
            self._drained.set()

    def _in_flight(self) -> int:
        return sum(t.in_flight() for t in self._names.values() if isinstance(t, Cell))

    async def _redeliver(self, letter: DeadLetter) -> None:
        target = self._names.get(letter.actor)
        if not isinstance(target, Cell):
            raise ActorStopped(f"cannot replay dead letter {letter.id}: no actor {letter.actor!r}")
        await target.ref.tell(letter.message)

    # ------------------------------------------------------------ public API

    @property
    def root(self) -> SupervisorRef:
        """The engine's root supervisor (ONE_FOR_ONE, 3 restarts within 5 s)."""
        if self._root is None:
            self._refuse()
        return self._root.ref

    async def spawn(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        capacity: int = 1000,
        overflow: Overflow = Overflow.BLOCK,
        restart: Restart = Restart.PERMANENT,
        max_attempts: int = 3,
    ) -> ActorRef[Any]:
        """Start an actor under the root supervisor; returns once its first ``on_start`` ran.

        ``factory`` is a zero-argument callable returning an ``Actor`` (an
        Actor subclass itself works); restarts call it again for a fresh
        instance. If the first ``on_start`` raises, that error is raised here
        and nothing is registered.
        """
        if self._root is None:
            self._refuse()
        return await self._root.spawn(
            factory,
            name=name,
            capacity=capacity,
            overflow=overflow,
            restart=restart,
            max_attempts=max_attempts,
        )

    async def supervisor(
        self,
        name: str,
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        within: float = 5.0,
        backoff: Backoff | None = None,
    ) -> SupervisorRef:
        """Start a supervisor under the root; children are spawned with ``sup.spawn``."""
        if self._root is None:
            self._refuse()
        return await self._root.supervisor(
            name, strategy=strategy, max_restarts=max_restarts, within=within, backoff=backoff
        )

    def actor(self, name: str) -> ActorRef[Any]:
        """The ref of the running actor called ``name`` (``KeyError`` if there is none)."""
        target = self._names.get(name)
        if not isinstance(target, Cell):
            raise KeyError(f"no running actor named {name!r}")
        return target.ref

    def metrics(self) -> EngineMetrics:
        """A snapshot of every actor's statistics and the engine's counters."""
        return EngineMetrics(
            actors={
                name: target.statistics()
                for name, target in self._names.items()
                if isinstance(target, Cell)
            },
            in_flight=self._in_flight(),
            dead_letters=self.dead_letters.count(),
            dead_letters_total=self.dead_letters.total,
        )
