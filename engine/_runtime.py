"""The runtime: the task group every actor lives in, the name registry, the
engine's lifecycle, the shutdown drain, and the one way to start a built-in actor.

Everything above it (the event bus, the outbox, breakers, the tenant resolver)
starts its actors and tasks through a ``Runtime``; cells and supervisors see it
as their ``Host``.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, NoReturn

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ._actor import Actor, ActorRef, AskTimer, Cell, DeadLetterSink, current_cell, event_class
from ._errors import EngineError
from ._supervision import ChildSpec, Supervisor
from ._system import ActorRestarted, Emit, ignore
from ._types import ActorStatistics, Backoff, Overflow, Restart, Strategy, check_timeout

__all__ = ["RESERVED_PREFIX", "Phase", "Runtime"]

logger = logging.getLogger("actorbus.engine")

# The engine's own actors; user names may not start with it.
RESERVED_PREFIX = "actorbus."

# How long ``wait_idle`` waits for the busy count to fall to 0 before it looks
# again anyway: doubling from the first to the last.
_RECHECK_FIRST = 0.001
_RECHECK_LAST = 0.05


class Phase(enum.Enum):
    """Where an engine is in its life; every refusal reads it."""

    NEW = "new"
    """Built, not entered yet."""
    RUNNING = "running"
    """Takes work from outside."""
    DRAINING = "draining"
    """Leaving normally: work from outside is refused while the mailboxes drain."""
    STOPPING = "stopping"
    """Actors are being stopped (``on_stop`` in reverse start order)."""
    STOPPED = "stopped"
    """Left: every task joined."""


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to raise out of ``async with Engine()``.

    An interrupt (KeyboardInterrupt, SystemExit) wins over what it caused
    (asks failing with ActorStopped); one error is raised as itself; several
    unrelated ones stay a group.
    """
    leaves = _leaves(group)
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt | SystemExit):
            return leaf
    if len(leaves) == 1:
        return leaves[0]
    return group


class Runtime:
    """Hosts the engine's actors and tasks; implements the ``Host`` of cells and supervisors."""

    def __init__(self, dead_letters: DeadLetterSink, *, shutdown_timeout: float) -> None:
        self.dead_letters = dead_letters
        self.shutdown_timeout = shutdown_timeout
        self._ask_timer: AskTimer | None = None
        self.phase = Phase.NEW
        # phase is RUNNING, kept as a plain attribute: every tell reads it.
        self.accepting = False
        self.names: dict[str, Cell | Supervisor] = {}
        # Names a registered but not yet started part will take (a subscription's actors).
        self._reserved: dict[str, str] = {}
        self.rng = random.Random()
        self.root: Supervisor | None = None
        self._tg: TaskGroup | None = None
        self._outer: TaskGroup | None = None
        # Made when entering: an anyio Event needs the running event loop.
        self._host_done: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        # Cells not waiting idle for messages, and other work in flight: the drain ends at 0.
        self._busy = 0
        # Set (and dropped) each time the busy count falls to 0: ``engine.idle`` waits on it.
        self._quiet: anyio.Event | None = None
        # Each restart of an actor goes out as an ActorRestarted (engine._system).
        self.emit: Emit = ignore

    # ------------------------------------------------------------ lifecycle

    def _move(self, phase: Phase) -> None:
        self.phase = phase
        self.accepting = phase is Phase.RUNNING

    @property
    def closing(self) -> bool:
        """Leaving: no more work from outside."""
        return self.phase in (Phase.DRAINING, Phase.STOPPING, Phase.STOPPED)

    @property
    def stopping(self) -> bool:
        """Actors are being stopped, or are: the relay and catch-up readers stop too."""
        return self.phase in (Phase.STOPPING, Phase.STOPPED)

    @property
    def running(self) -> bool:
        """The task group is up (from entering until every task is joined)."""
        return self.phase in (Phase.RUNNING, Phase.DRAINING, Phase.STOPPING)

    async def enter(self) -> None:
        """Start the task group and the root supervisor (ONE_FOR_ONE, 3 within 5 s)."""
        if self.phase is not Phase.NEW:
            raise EngineError("an Engine can be entered only once")
        self._host_done = anyio.Event()
        self._drained = anyio.Event()
        outer = anyio.create_task_group()
        await outer.__aenter__()
        self._outer = outer
        self._tg = await outer.start(self._host, name="actorbus engine")
        self.root = Supervisor(
            self,
            "root",
            None,
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=3,
            within=5.0,
            backoff=Backoff(),
        )
        self._tg.start_soon(self.root.run, name="actorbus root supervisor")
        self._move(Phase.RUNNING)

    async def _host(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        # Actors live in a task group shielded from the caller's cancel scopes:
        # when the caller is cancelled, leaving the engine stops them in order
        # (on_stop in reverse start order) instead of each dying where it stood.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as inner:
                task_status.started(inner)
                assert self._host_done is not None
                await self._host_done.wait()
                inner.cancel_scope.cancel()

    async def stop(self, *, drain: bool) -> None:
        """Refuse work from outside, drain (``drain``: within ``shutdown_timeout``), then
        stop every actor in reverse start order; what could not finish is dead-lettered."""
        self._move(Phase.DRAINING)
        root = self.root
        assert root is not None
        for target in self.names.values():
            if isinstance(target, Cell):
                target.open = False
        cut_short = not drain
        try:
            if drain and self._busy:
                cut_short = True  # until the drain ends on its own
                assert self._drained is not None
                with anyio.move_on_after(self.shutdown_timeout):
                    await self._drained.wait()
                cut_short = self._busy > 0
                if cut_short:
                    logger.warning(
                        "shutdown: %d messages still in flight after %.1f s; dead-lettering them",
                        self.in_flight(),
                        self.shutdown_timeout,
                    )
        finally:
            self._move(Phase.STOPPING)
            # Shielded and bounded: even a cancelled caller gets its actors'
            # on_stop, in reverse start order, within shutdown_timeout.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.shutdown_timeout):
                await root.terminate("shutdown", cancel_current=cut_short)

    async def exit(self, error: BaseException | None, original: BaseException | None) -> bool:
        """Join every task; raise what the task group raised (one error, not a group,
        where one explains it), or ``error`` when it replaced ``original``."""
        self._move(Phase.STOPPED)
        outer = self._outer
        assert outer is not None
        assert self._host_done is not None
        self._host_done.set()
        try:
            suppressed = await outer.__aexit__(
                type(error) if error else None, error, error.__traceback__ if error else None
            )
        except BaseExceptionGroup as group:
            single = _single(group)
            if single is group:
                raise
            raise single from single.__cause__
        if error is not None and error is not original and not suppressed:
            raise error
        return bool(suppressed)

    def refuse(self) -> NoReturn:
        if not self.running:
            raise EngineError("the engine is not running: use `async with Engine() as engine:`")
        raise EngineError("the engine is shutting down and takes no new work from outside")

    def check_accepting(self) -> None:
        if not self.accepting:
            self.refuse()

    def check_publishing(self) -> None:
        """Work from outside is taken while running; an actor's own work also while draining."""
        if not self.accepting and (not self.running or current_cell.get() is None):
            self.refuse()

    # -------------------------------------------------------------- tasks

    @property
    def task_group(self) -> TaskGroup:
        if self._tg is None or not self.running:
            raise EngineError("the engine is not running: use `async with Engine() as engine:`")
        return self._tg

    def start_task(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        """Run ``fn(*args)`` in the engine's task group."""
        self.task_group.start_soon(fn, *args, name=name)

    def ask_timer(self) -> AskTimer | None:
        """The engine's ask timer (one task for every ask with a timeout), started on
        first use and again if its task ended; None when no task can be started."""
        timer = self._ask_timer
        if timer is None or not timer.alive:
            timer = AskTimer()
            try:
                self.start_task(timer.run, event_class(), name="actorbus ask timer")
            except EngineError:
                return None
            self._ask_timer = timer
        return timer

    def start_builtin_soon(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        capacity: int,
        overflow: Overflow = Overflow.REJECT,
    ) -> Cell:
        """Start one of the engine's own actors under the root: PERMANENT, one attempt
        per message, a name under the reserved prefix. Its task starts at the next
        scheduling point (``engine.breaker`` is synchronous and cannot wait)."""
        root = self.root
        if root is None:
            self.refuse()
        cell, instance = root.add_cell(
            ChildSpec(factory, name, capacity, overflow, Restart.PERMANENT, 1), internal=True
        )
        self.start_task(cell.run, instance, name=name)
        return cell

    async def start_builtin(self, factory: Callable[[], Actor], **options: Any) -> Cell:
        """``start_builtin_soon``, returning once the actor's first start is over."""
        cell = self.start_builtin_soon(factory, **options)
        await cell.started.wait()
        return cell

    # -------------------------------------------------------------- names

    def check_name_free(self, name: str, *, internal: bool = False) -> None:
        if not internal and name.startswith(RESERVED_PREFIX):
            raise ValueError(f"names starting with {RESERVED_PREFIX!r} are reserved, got {name!r}")
        if name in self.names:
            raise ValueError(f"name {name!r} is already taken by a running actor or supervisor")
        owner = self._reserved.get(name)
        if owner is not None:
            raise ValueError(f"name {name!r} is already taken by {owner}")

    def register(self, name: str, child: Cell | Supervisor) -> None:
        self.names[name] = child

    def reserve(self, names: Iterable[str], owner: str) -> None:
        """Hold ``names`` for ``owner`` until ``release`` (it starts later)."""
        for name in names:
            self._reserved[name] = owner

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            self._reserved.pop(name, None)

    def forget(self, child: Cell | Supervisor) -> None:
        if self.names.get(child.name) is child:
            del self.names[child.name]

    def restarted(self, cell: Cell, cause: BaseException | None) -> None:
        if not cell.silent:
            reason = "restarted" if cause is None else f"{type(cause).__name__}: {cause}"
            self.emit(ActorRestarted(actor=cell.name, reason=reason))

    def actor(self, name: str) -> ActorRef[Any]:
        """The ref of the running actor called ``name`` (``KeyError`` if there is none)."""
        target = self.names.get(name)
        if not isinstance(target, Cell):
            raise KeyError(f"no running actor named {name!r}")
        return target.ref

    def cell(self, name: str) -> Cell | None:
        target = self.names.get(name)
        return target if isinstance(target, Cell) else None

    # --------------------------------------------------------------- drain

    def busy(self) -> None:
        self._busy += 1

    def idle(self) -> None:
        self._busy -= 1
        if not self._busy:
            if self.phase is Phase.DRAINING:
                assert self._drained is not None
                self._drained.set()
            quiet = self._quiet
            if quiet is not None:
                self._quiet = None
                quiet.set()

    def unsettled(self) -> str | None:
        """What keeps the runtime from idle (``engine.idle``), or None."""
        if self._busy:
            return f"{self._busy} actors, writes or readers at work"
        return None

    async def _quieter(self, within: float) -> None:
        """Return when the busy count next falls to 0, or after ``within`` seconds."""
        quiet = self._quiet
        if quiet is None:
            quiet = self._quiet = anyio.Event()
        with anyio.move_on_after(within):
            await quiet.wait()

    async def wait_idle(
        self,
        parts: Sequence[Callable[[], str | None]],
        timeout: float | None,  # noqa: ASYNC109
    ) -> None:
        """``engine.idle``: return once the busy count is 0 and every part answers None;
        ``TimeoutError`` naming what is still in flight after ``timeout`` seconds.

        The busy count is the shutdown drain's: the actors, the writes waiting for a
        commit, the relay and the catch-up readers. Woken when it falls to 0, and
        looking again on a doubling bound anyway (a slot given back after a dead
        letter commits moves no actor).
        """
        check_timeout(timeout, "timeout")
        if not self.running:
            self.refuse()
        if current_cell.get() is not None:
            raise EngineError(
                "engine.idle() waits for every actor to finish: called from an actor's own "
                "handler it would wait for itself"
            )
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        recheck = _RECHECK_FIRST
        while True:
            unsettled = [found for part in (self.unsettled, *parts) if (found := part())]
            if not unsettled:
                return
            left = deadline - anyio.current_time()
            if left <= 0:
                raise TimeoutError(
                    f"the engine was not idle within {timeout} s: " + "; ".join(unsettled)
                )
            await self._quieter(min(recheck, left))
            recheck = min(recheck * 2, _RECHECK_LAST)

    def in_flight(self) -> int:
        return sum(t.in_flight() for t in self.names.values() if isinstance(t, Cell))

    def statistics(self) -> dict[str, ActorStatistics]:
        return {name: t.statistics() for name, t in self.names.items() if isinstance(t, Cell)}
