"""Supervisors: restart strategies, restart intensity, backoff and escalation."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import anyio
from anyio.abc import TaskGroup

from ._actor import Actor, ActorRef, Cell, Host, Outcome, OutcomeKind
from ._errors import ActorStopped, SupervisorEscalation
from ._types import (
    ActorState,
    Backoff,
    DeadLetterReason,
    Overflow,
    Restart,
    Strategy,
    check_enum,
    check_int,
    check_timeout,
)

__all__ = ["ChildSpec", "Spawner", "Supervisor", "SupervisorHost", "SupervisorRef"]

logger = logging.getLogger("actorbus.supervisor")

Child: TypeAlias = "Cell | Supervisor"


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    if not name.strip():
        raise ValueError(f"name must not be empty or blank, got {name!r}")
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to run one child actor (checked by ``spawn``, or built by the engine)."""

    factory: Callable[[], Actor]
    name: str
    capacity: int = 1000
    overflow: Overflow = Overflow.BLOCK
    restart: Restart = Restart.PERMANENT
    max_attempts: int = 3


class SupervisorHost(Host, Protocol):
    """What a supervisor needs of the runtime: its tasks, names and randomness."""

    rng: random.Random

    @property
    def task_group(self) -> TaskGroup: ...

    def check_accepting(self) -> None: ...

    def check_name_free(self, name: str, *, internal: bool = False) -> None:
        """``ValueError`` if ``name`` is taken, reserved, or (unless ``internal``) the engine's."""

    def register(self, name: str, child: Cell | Supervisor) -> None:
        """Take ``name`` (already checked free) for ``child``."""


class Supervisor:
    """Restarts its children when they fail, per its strategy, within its intensity."""

    restart = Restart.PERMANENT

    def __init__(
        self,
        host: SupervisorHost,
        name: str,
        parent: Supervisor | None,
        *,
        strategy: Strategy,
        max_restarts: int,
        within: float,
        backoff: Backoff,
    ) -> None:
        self.host = host
        self.name = name
        self.parent = parent
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.within = within
        self.backoff = backoff
        # Insertion-ordered (start order) with O(1) removal: 10,000 stops stay linear.
        self.children: dict[Child, None] = {}
        self.pending: dict[Child, Outcome] = {}
        self.wake = anyio.Event()
        self.lock = anyio.Lock()
        self.crash_times: collections.deque[float] = collections.deque()
        self.state = ActorState.RUNNING
        self.stopped = False
        self.done = anyio.Event()
        self.ref = SupervisorRef(self)
        self.crash_streak = 0
        self.last_crash_at = -math.inf
        self.restarts = 0

    # ------------------------------------------------------------- the loop

    async def run(self) -> None:
        try:
            while not self.stopped:
                await self.wake.wait()
                self.wake = anyio.Event()
                while self.pending and not self.stopped:
                    child = next(iter(self.pending))
                    outcome = self.pending.pop(child)
                    async with self.lock:
                        await self._handle(child, outcome)
        finally:
            self.done.set()

    def report(self, child: Child, outcome: Outcome) -> None:
        """A child failed or exited (called from the child's task; never waits)."""
        self.pending[child] = outcome
        self.wake.set()

    def forget(self, child: Child) -> None:
        self.children.pop(child, None)
        self.pending.pop(child, None)

    async def _handle(self, child: Child, outcome: Outcome) -> None:
        if child not in self.children:
            return
        kind = outcome.kind
        error = outcome.error
        if child.restart is Restart.TEMPORARY or (
            kind is OutcomeKind.NORMAL_EXIT and child.restart is Restart.TRANSIENT
        ):
            logger.info(
                "%r exited (%s); not restarted (%s)",
                child.name,
                kind.value,
                child.restart.value,
                extra={"actor": child.name},
            )
            self.forget(child)
            await child.terminate("stopped")
            return
        now = anyio.current_time()
        if kind is OutcomeKind.MESSAGE_FAILED:
            delay = self.backoff.delay(outcome.attempts, self.host.rng)
        else:
            if kind is OutcomeKind.NORMAL_EXIT:
                error = ActorStopped(f"{child.name!r} stopped itself; restarted as PERMANENT")
            if now - child.last_crash_at > self.within:
                child.crash_streak = 0
            child.crash_streak += 1
            child.last_crash_at = now
            self.crash_times.append(now)
            while self.crash_times and now - self.crash_times[0] > self.within:
                self.crash_times.popleft()
            if len(self.crash_times) > self.max_restarts:
                await self._give_up(child, error)
                return
            delay = self.backoff.delay(child.crash_streak, self.host.rng)
        logger.warning(
            "%r failed (%s: %r); restarting (%s) in %.3f s",
            child.name,
            kind.value,
            error,
            self.strategy.value,
            delay,
            extra={"actor": child.name, "supervisor": self.name},
        )
        group = self._group(child)
        for sibling in reversed(group):
            if sibling is child:
                continue
            if sibling.restart is Restart.TEMPORARY:
                self.forget(sibling)
                await sibling.terminate("stopped")
            else:
                await sibling.suspend()
        if delay > 0:
            await anyio.sleep(delay)
        for member in group:
            if member in self.children:
                await member.resume(error)

    def _group(self, child: Child) -> list[Child]:
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return list(self.children)
        members = list(self.children)
        return members[members.index(child) :]

    async def _give_up(self, child: Child, cause: BaseException | None) -> None:
        escalation = SupervisorEscalation(
            f"supervisor {self.name!r} gave up: more than {self.max_restarts} restarts "
            f"within {self.within} s (last: {child.name!r}: {cause!r})"
        )
        escalation.__cause__ = cause
        logger.error("%s", escalation, extra={"supervisor": self.name})
        for member in reversed(list(self.children)):
            await member.suspend()
        self.state = ActorState.RESTARTING
        if self.parent is None:
            raise escalation
        self.parent.report(self, Outcome(OutcomeKind.CRASH, escalation))

    # ------------------------------- controls used by this supervisor's parent

    @property
    def awaiting_command(self) -> bool:
        return self.state is ActorState.RESTARTING

    async def suspend(self) -> None:
        async with self.lock:
            self.pending.clear()
            for member in reversed(list(self.children)):
                await member.suspend()
            self.state = ActorState.RESTARTING

    async def resume(self, cause: BaseException | None) -> None:
        async with self.lock:
            if self.stopped:
                return
            self.crash_times.clear()
            self.restarts += 1
            for member in list(self.children):
                if member in self.children:
                    await member.resume(cause)
            self.state = ActorState.RUNNING

    async def terminate(self, reason: DeadLetterReason, *, cancel_current: bool = False) -> None:
        if self.stopped:
            return
        self.state = ActorState.STOPPING
        async with self.lock:
            for member in reversed(list(self.children)):
                await member.terminate(reason, cancel_current=cancel_current)
            self.close()

    def close(self) -> None:
        """Mark stopped, end the loop and unregister; the children are already stopped."""
        self.stopped = True
        self.state = ActorState.STOPPED
        self.wake.set()
        self.host.forget(self)
        if self.parent is not None:
            self.parent.forget(self)

    # ----------------------------------------------------------- children

    async def start_child(self, spec: ChildSpec) -> ActorRef[Any]:
        """Start a checked child; returns once its first ``on_start`` ran (its error if not)."""
        host = self.host
        host.check_accepting()
        cell, instance = self.add_cell(spec)
        error = await host.task_group.start(cell.run, instance, name=f"actor {spec.name}")
        if error is not None:
            raise error
        return cell.ref

    def add_cell(self, spec: ChildSpec, *, internal: bool = False) -> tuple[Cell, Actor]:
        """Register a child cell and make its first instance; the caller starts its task."""
        self._check_running()
        host = self.host
        host.check_name_free(spec.name, internal=internal)
        instance = spec.factory()
        cell = Cell(
            host,
            self,
            spec.factory,
            name=spec.name,
            capacity=spec.capacity,
            overflow=spec.overflow,
            restart=spec.restart,
            max_attempts=spec.max_attempts,
        )
        # Registered before the task starts so a failure during on_start is
        # reported to a supervisor that knows the child; run() unregisters it.
        host.register(spec.name, cell)
        self.children[cell] = None
        return cell, instance

    def add_supervisor(
        self,
        name: str,
        *,
        strategy: Strategy,
        max_restarts: int,
        within: float,
        backoff: Backoff,
    ) -> Supervisor:
        host = self.host
        self._check_running()
        host.check_name_free(name)
        child = Supervisor(
            host,
            name,
            self,
            strategy=strategy,
            max_restarts=max_restarts,
            within=within,
            backoff=backoff,
        )
        host.register(name, child)
        self.children[child] = None
        host.task_group.start_soon(child.run, name=f"supervisor {name}")
        return child

    def _check_running(self) -> None:
        if self.stopped:
            raise ActorStopped(f"supervisor {self.name!r} is stopped")


class Spawner:
    """``spawn`` and ``supervisor``: one signature, one set of checks, for
    ``SupervisorRef`` and the ``Engine`` (which spawns under its root)."""

    __slots__ = ()

    def _parent(self) -> Supervisor:
        raise NotImplementedError

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
        """Start an actor under this supervisor; returns once its first ``on_start`` ran.

        ``factory`` is a zero-argument callable returning an ``Actor`` (an
        Actor subclass itself works); restarts call it again for a fresh
        instance. If the first ``on_start`` raises, that error is raised here
        and nothing is registered.
        """
        parent = self._parent()
        if not callable(factory):
            raise TypeError(
                f"factory must be callable (an Actor subclass or a function), "
                f"got {type(factory).__name__} {factory!r}"
            )
        check_name(name)
        check_int(capacity, "capacity", 1)
        check_enum(overflow, Overflow, "overflow")
        check_enum(restart, Restart, "restart")
        check_int(max_attempts, "max_attempts", 1)
        return await parent.start_child(
            ChildSpec(factory, name, capacity, overflow, restart, max_attempts)
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
        """Start a supervisor under this one; children are spawned with ``sup.spawn``.

        When it gives up, this one handles it as a failed child.
        """
        parent = self._parent()
        check_name(name)
        check_enum(strategy, Strategy, "strategy")
        check_int(max_restarts, "max_restarts", 0)
        check_timeout(within, "within", allow_none=False)
        if backoff is None:
            backoff = Backoff()
        elif not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a Backoff, got {type(backoff).__name__}")
        parent.host.check_accepting()
        return parent.add_supervisor(
            name, strategy=strategy, max_restarts=max_restarts, within=within, backoff=backoff
        ).ref


class SupervisorRef(Spawner):
    """Handle to a supervisor: spawn children under it, nest supervisors, stop it."""

    __slots__ = ("_supervisor",)

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def _parent(self) -> Supervisor:
        return self._supervisor

    @property
    def name(self) -> str:
        return self._supervisor.name

    @property
    def children(self) -> list[str]:
        """Names of the children, in start order."""
        return [child.name for child in self._supervisor.children]

    def __repr__(self) -> str:
        return f"<SupervisorRef {self.name!r} {self._supervisor.strategy.value}>"

    async def stop(self) -> None:
        """Stop every child (reverse start order), then the supervisor."""
        await self._supervisor.terminate("stopped")
