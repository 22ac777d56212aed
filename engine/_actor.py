"""Actors, their refs and the cell that runs one actor: mailbox, loop, lifecycle."""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from ._cancel import as_failure
from ._errors import ActorStopped, AskTimeout, EngineError, MailboxFull
from ._types import (
    ActorState,
    ActorStatistics,
    DeadLetterReason,
    Overflow,
    Restart,
    check_timeout,
)

if TYPE_CHECKING:
    from ._supervision import Supervisor

__all__ = ["Actor", "ActorRef", "bind"]

logger = logging.getLogger("actorbus.actor")

# The cell whose task is running: tells from inside actors are still taken
# while the engine drains, tells from outside are refused.
current_cell: ContextVar[Cell | None] = ContextVar("actorbus_current_actor", default=None)

# Yield to the scheduler after this many messages handled without waiting, so
# a busy actor cannot starve the others (a raw stream would yield on each one).
_BATCH = 64

_M = TypeVar("_M")


class Actor:
    """Base class of actors. Override the hooks you need; ``receive`` is required.

    Actors are reached only through their ``ActorRef``; the runtime creates
    instances from the factory given to ``spawn`` and calls the hooks from the
    actor's own task, one message at a time.
    """

    _actorbus_cell: Cell | None = None

    async def on_start(self) -> None:
        """Called before the first message of this instance."""

    async def receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to ``ask``."""
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    async def on_stop(self) -> None:
        """Called when this instance is replaced or stopped (errors are logged)."""

    async def on_restart(self, error: BaseException) -> None:
        """Called on a fresh instance, before ``on_start``, with why it replaces the old one."""

    @property
    def ref(self) -> ActorRef[Any]:
        """This actor's own ref (available from ``on_start`` on)."""
        cell = self._actorbus_cell
        if cell is None:
            raise EngineError(f"{type(self).__name__} is not running in an engine")
        return cell.ref

    def stop(self) -> None:
        """Exit normally after the current message.

        The supervisor restarts a PERMANENT actor; TRANSIENT and TEMPORARY ones stay stopped.
        """
        cell = self._actorbus_cell
        if cell is not None:
            cell.request_self_stop()


def bind(actor: Actor, cell: Cell | None) -> None:
    """Make ``actor`` run in ``cell`` (its ``ref`` and ``stop`` then work)."""
    # The runtime fills the slot the Actor base class declares for it.
    actor._actorbus_cell = cell


def event_class() -> Callable[[], anyio.Event]:
    """The running backend's ``Event`` class, to be called directly.

    ``anyio.Event()`` looks the backend up and initialises the new event twice
    on every call; an ask needs two events, and this halves their cost (about
    1 µs each). Outside an event loop it is anyio's lazy adapter, which works too.
    """
    return type(anyio.Event())


class _Ask:
    """One ``ask`` in a mailbox: the message and the asker's side of the reply.

    A ``tell`` queues the bare message, so the common case allocates nothing.
    """

    __slots__ = ("done", "error", "event", "expired", "message", "value")

    def __init__(self, message: Any, event: anyio.Event) -> None:
        self.message = message
        self.event = event
        self.done = False
        self.expired = False
        self.value: Any = None
        self.error: BaseException | None = None

    def expire(self) -> None:
        """The asker's deadline passed: wake it to raise ``AskTimeout``; a later
        reply finds the ask done and is dropped."""
        if not self.done:
            self.done = True
            self.expired = True
            self.event.set()

    def set_result(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self.value = value
            self.event.set()

    def set_error(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.event.set()


_Deadline = tuple[float, int, _Ask]


class AskTimer:
    """Times out the asks made to one engine's actors from one task it owns.

    A cancel scope with a deadline costs 6-9 µs to enter and leave, a third of
    an ask's round trip. Instead an ask pushes its deadline here and takes it off
    when answered (sequential asks keep one entry); the task sleeps until the
    earliest deadline it knows of and expires what is still unanswered then.
    """

    __slots__ = ("alive", "heap", "limit", "order", "sleeping_until", "wakeup")

    def __init__(self) -> None:
        self.heap: list[_Deadline] = []
        self.order = itertools.count()
        self.wakeup: anyio.Event | None = None
        # The deadline the task sleeps until; an earlier one wakes it to re-arm.
        self.sleeping_until = -math.inf
        # Answered asks deep in the heap are dropped in one pass past this size.
        self.limit = 64
        self.alive = True

    def add(self, deadline: float, ask: _Ask) -> None:
        heap = self.heap
        heapq.heappush(heap, (deadline, next(self.order), ask))
        if deadline < self.sleeping_until:
            self.sleeping_until = deadline
            wakeup, self.wakeup = self.wakeup, None
            if wakeup is not None:
                wakeup.set()
        if len(heap) > self.limit:
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self.limit = max(64, 2 * len(heap))

    def settle(self) -> None:
        """Drop answered asks from the top of the heap."""
        heap = self.heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)

    async def run(self, new_event: Callable[[], anyio.Event]) -> None:
        heap = self.heap
        try:
            while True:
                now = anyio.current_time()
                answered = -math.inf
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    deadline, _, ask = heapq.heappop(heap)
                    if deadline > now:
                        answered = deadline
                    else:
                        ask.expire()
                wakeup = self.wakeup = new_event()
                # With nothing pending it still sleeps until the deadline of the ask
                # just answered: the next ask's is later and need not wake it (one
                # wake-up per timeout under a steady stream of asks, not one per ask).
                if heap:
                    self.sleeping_until = heap[0][0]
                else:
                    self.sleeping_until = answered if answered > now else math.inf
                with anyio.CancelScope(deadline=self.sleeping_until):
                    await wakeup.wait()
        finally:
            self.alive = False
            self.wakeup = None


class DeadLetterSink(Protocol):
    """Where a cell records what it could not deliver."""

    def add(
        self,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        *,
        error: BaseException | None = ...,
        attempts: int = ...,
    ) -> None: ...


class Track(Protocol):
    """The owner's bookkeeping of what a cell was handed (a durable subscription's
    position per partition); the cell only carries it."""

    def sent(self, seq: int) -> None: ...

    def finish(self, seq: int) -> None: ...


class Owner(Protocol):
    """Answers for the messages of a cell that carry nothing of their own.

    A subscription's partition holds bare events (each holding a backpressure
    slot, see ``engine._routing``): what the cell cannot deliver goes back to
    the subscription, which records it under its own name and gives back the slot.
    """

    def dead_letter(
        self,
        cell: Cell,
        message: Any,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
    ) -> None: ...


class Host(Protocol):
    """What a cell needs of the runtime that hosts it (``engine._runtime.Runtime``)."""

    accepting: bool
    """True while work from outside the engine is taken."""
    dead_letters: DeadLetterSink

    @property
    def closing(self) -> bool:
        """The engine is shutting down."""
        ...

    def busy(self) -> None:
        """One more cell has work (the shutdown drain waits for it)."""

    def idle(self) -> None:
        """One cell has no more work."""

    def refuse(self) -> NoReturn:
        """Raise the error for work from outside while the engine does not take it."""
        ...

    def ask_timer(self) -> AskTimer | None:
        """The engine's ask timer, its task started on first use; None when the
        engine runs no tasks (a cancel scope per ask does its work then)."""

    def forget(self, child: Cell | Supervisor) -> None:
        """Unregister a stopped cell's (or supervisor's) name."""

    def restarted(self, cell: Cell, cause: BaseException | None) -> None:
        """``cell`` starts a fresh instance (``cause``: what ended the last one)."""


class Tracked:
    """A message that must learn when it cannot be delivered (an event's delivery).

    The cell hands it to ``dead_letter`` instead of storing it, so the owner can
    record it under its own name and release what it holds (a backpressure slot).
    """

    __slots__ = ()

    def dead_letter(
        self, cell: Cell, reason: DeadLetterReason, error: BaseException | None, attempts: int
    ) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """To a cell waiting for its supervisor: start a fresh instance (``cause``: why)."""

    cause: BaseException | None


@dataclasses.dataclass(frozen=True, slots=True)
class Terminate:
    """To a cell waiting for its supervisor: stop for good."""


Command = Resume | Terminate


class OutcomeKind(enum.Enum):
    STOP = "stop"  # stopped from outside or by the engine: never restarted
    SUSPEND = "suspend"  # paused by the supervisor for a sibling's restart
    NORMAL_EXIT = "normal_exit"  # the actor stopped itself
    MESSAGE_FAILED = "message_failed"  # receive raised
    CRASH = "crash"  # a failure outside receive


class Outcome:
    __slots__ = ("attempts", "error", "kind")

    def __init__(
        self, kind: OutcomeKind, error: BaseException | None = None, attempts: int = 0
    ) -> None:
        self.kind = kind
        self.error = error
        self.attempts = attempts


class ActorRef(Generic[_M]):
    """The only handle to an actor. It survives the actor's restarts."""

    __slots__ = ("_cell",)

    def __init__(self, cell: Cell) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        return self._cell.name

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.name!r} {self._cell.state.value}>"

    def try_tell(self, message: _M) -> None:
        """Queue ``message`` without waiting.

        Raises ``MailboxFull`` when the mailbox is full under BLOCK or REJECT;
        under the DROP policies a message is dead-lettered instead.
        """
        cell = self._cell
        queue = cell.queue
        # Fast path inlined: this is the engine's hottest line.
        if cell.open and len(queue) < cell.capacity:
            queue.append(message)
            if len(queue) > cell.peak:
                cell.peak = len(queue)
            if cell.wakeup is not None:
                cell.wake()
        elif not cell.offer(message):
            raise MailboxFull(f"mailbox of {cell.name!r} is full ({cell.capacity} messages)")

    async def tell(self, message: _M) -> None:
        """Queue ``message``, waiting for room while the mailbox is full (BLOCK).

        Returns without yielding when there is room, so a burst of tells fills
        the mailbox and the actor drains it in one batch.
        """
        cell = self._cell
        if not cell.offer(message):
            await cell.put(message)

    async def ask(self, message: _M, *, timeout: float | None = 5.0) -> Any:  # noqa: ASYNC109
        """Send ``message`` and wait for ``receive``'s return value.

        If ``receive`` raised on the final attempt, that exception is raised
        here; a dead-lettered message raises ``MailboxFull`` (dropped) or
        ``ActorStopped``. After ``timeout`` seconds raises ``AskTimeout``.
        The actor is not affected when the asker gives up.
        """
        cell = self._cell
        ask = _Ask(message, cell.new_event())
        if timeout is None:
            if not cell.offer(ask):
                await cell.put(ask)
            await ask.event.wait()
        else:
            check_timeout(timeout, "timeout")
            deadline = anyio.current_time() + timeout
            queued = cell.offer(ask)
            if not queued:
                with anyio.CancelScope(deadline=deadline):
                    await cell.put(ask)
                    queued = True
            if queued:  # else no room came within the deadline: AskTimeout below
                timer = cell.timer
                if timer is None or not timer.alive:
                    timer = cell.timer = cell.host.ask_timer()
                if timer is not None:
                    timer.add(deadline, ask)
                    try:
                        await ask.event.wait()
                    finally:
                        # A cancelled asker abandons the ask: its reply is dropped.
                        ask.done = True
                        timer.settle()
                else:  # the engine runs no tasks now: a cancel scope does the timer's work
                    with anyio.CancelScope(deadline=deadline):
                        await ask.event.wait()
            if ask.expired or not ask.done:
                raise AskTimeout(
                    f"{cell.name!r} did not answer {type(message).__name__} within {timeout} s"
                )
        if ask.error is not None:
            raise ask.error
        return ask.value

    def statistics(self) -> ActorStatistics:
        return self._cell.statistics()

    async def stop(self) -> None:
        """Stop the actor for good after its current message.

        Queued messages are dead-lettered (reason ``stopped``) and their asks
        fail with ``ActorStopped``. Returns once ``on_stop`` has run (at once
        when an actor stops itself through its own ref).
        """
        await self._cell.stop()


class Cell:
    """Runs one actor: its mailbox survives restarts, instances come and go."""

    def __init__(
        self,
        host: Host,
        supervisor: Supervisor,
        factory: Callable[[], Actor],
        *,
        name: str,
        capacity: int,
        overflow: Overflow,
        restart: Restart,
        max_attempts: int,
    ) -> None:
        self.host = host
        self.supervisor = supervisor
        self.factory = factory
        self.name = name
        self.capacity = capacity
        self.overflow = overflow
        self.restart = restart
        self.max_attempts = max_attempts
        self.ref: ActorRef[Any] = ActorRef(self)
        # Whose name a dead letter carries: a subscription's partitions use the subscription's.
        self.dead_letter_name = name
        # A durable subscription partition's position tracker (None otherwise).
        self.track: Track | None = None
        # Who answers for its untracked messages (a subscription: bare events).
        self.owner: Owner | None = None
        # Its restarts raise no ActorRestarted (a system events subscription's own).
        self.silent = False

        self.queue: collections.deque[Any] = collections.deque()
        self.senders: collections.deque[anyio.Event] = collections.deque()
        self.wakeup: anyio.Event | None = None
        # A cell lives in one event loop: its events come from that backend's class.
        self.new_event = event_class()
        # The engine's ask timer, found on the first ask with a timeout.
        self.timer: AskTimer | None = None
        self.state = ActorState.STARTING
        self.closed = False
        # True while anyone may queue without further checks: not closed and
        # the engine takes work from outside (the fast path of try_tell).
        self.open = host.accepting
        # Waiting for messages with an empty mailbox: the engine's drain ends
        # when no cell is busy.
        self.idle = False
        # Set when the loop next waits with an empty mailbox (``drained``).
        self.emptied: anyio.Event | None = None
        host.busy()
        self.instance: Actor | None = None
        self.current: Any = None
        self.retry: tuple[Any, int, BaseException] | None = None
        # Attempts the message in hand failed before this one (set on retries only).
        self.retried = 0
        self.loop_scope: anyio.CancelScope | None = None

        self.self_stop = False
        self.suspend_requested = False
        self.stop_requested = False
        # Any of the three above: checked once per message instead of three times.
        self.interrupt = False
        self.stop_reason: DeadLetterReason = "stopped"
        self.awaiting_command = False
        self.command: Command | None = None
        self.command_event = anyio.Event()
        self.paused = anyio.Event()
        self.started = anyio.Event()
        self.done = anyio.Event()

        self.processed = 0
        self.failed = 0
        self.restarts = 0
        self.peak = 0
        # Crash streak for backoff: reset once the actor ran `within` seconds without one.
        self.crash_streak = 0
        self.last_crash_at = float("-inf")

    # ------------------------------------------------------------------ mailbox

    def offer(self, item: Any) -> bool:
        """Queue ``item`` if the mailbox allows it; False means "would block"."""
        if self.closed:
            raise ActorStopped(f"actor {self.name!r} is stopped")
        if not self.host.accepting and current_cell.get() is None:
            self.host.refuse()
        queue = self.queue
        if len(queue) >= self.capacity:
            overflow = self.overflow
            if overflow is Overflow.BLOCK:
                return False
            if overflow is Overflow.REJECT:
                raise MailboxFull(f"mailbox of {self.name!r} is full ({self.capacity} messages)")
            if overflow is Overflow.DROP_NEWEST:
                self.dead_letter(item, "dropped")
                return True
            self.dead_letter(queue.popleft(), "dropped")
        self.enqueue(item)
        return True

    def has_room(self) -> bool:
        """Whether anyone may queue here now without a check or a wait: open and not full."""
        return self.open and len(self.queue) < self.capacity

    def enqueue(self, item: Any) -> None:
        """Queue ``item`` (the mailbox has room for it) and wake the idle loop."""
        queue = self.queue
        queue.append(item)
        if len(queue) > self.peak:
            self.peak = len(queue)
        if self.wakeup is not None:
            self.wake()

    async def put(self, item: Any) -> None:
        """Wait for room, then queue ``item`` (the slow path of ``tell``)."""
        while True:
            event = anyio.Event()
            self.senders.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():
                    # Woken for a slot we no longer take: hand it to the next sender.
                    self.wake_sender()
                else:
                    self.senders.remove(event)
                raise
            if self.offer(item):
                return

    def wake_sender(self) -> None:
        if self.senders:
            self.senders.popleft().set()

    def wake(self) -> None:
        """Wake the idle loop. It counts as busy from now on, not from when its task
        runs again, so a shutdown right after a tell still drains that message."""
        wakeup = self.wakeup
        if wakeup is not None:
            self.wakeup = None
            self.idle = False
            self.host.busy()
            wakeup.set()

    def dead_letter(
        self,
        item: Any,
        reason: DeadLetterReason,
        error: BaseException | None = None,
        attempts: int = 0,
    ) -> None:
        ask = item if type(item) is _Ask else None
        message = item.message if ask is not None else item
        if isinstance(message, Tracked):
            message.dead_letter(self, reason, error, attempts)
        elif self.owner is not None:
            self.owner.dead_letter(self, message, reason, error, attempts)
        else:
            self.host.dead_letters.add(self.name, message, reason, error=error, attempts=attempts)
        if ask is not None:
            if reason == "failed" and error is not None:
                ask.set_error(error)
            elif reason == "dropped":
                ask.set_error(
                    MailboxFull(f"mailbox of {self.name!r} is full: the message was dropped")
                )
            else:
                ask.set_error(ActorStopped(f"actor {self.name!r} stopped ({reason})"))

    async def drained(self) -> None:
        """Return once the mailbox is empty and no message is in hand (or it stopped)."""
        while not self.closed and not (self.idle and not self.queue):
            if self.emptied is None:
                self.emptied = self.new_event()
            await self.emptied.wait()

    def in_flight(self) -> int:
        return len(self.queue) + (self.current is not None) + (self.retry is not None)

    # ------------------------------------------------------------- statistics

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            name=self.name,
            capacity=self.capacity,
            depth=len(self.queue),
            peak_depth=self.peak,
            processed=self.processed,
            failed=self.failed,
            restarts=self.restarts,
            state=self.state,
        )

    # -------------------------------------------------------------- lifecycle

    async def run(
        self,
        instance: Actor,
        *,
        task_status: TaskStatus[Exception | None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The cell's task. With a task status (``spawn``) a failing first
        ``on_start`` is handed back to the spawner; without one (cells started
        without waiting, as subscriptions do) it is a crash for the supervisor.
        """
        current_cell.set(self)
        outcome: Outcome | None = None
        try:
            try:
                await self._start_instance(instance, None)
            except BaseException as caught:
                exc = as_failure(caught)
                if exc is None:
                    raise
                if task_status is not anyio.TASK_STATUS_IGNORED:
                    task_status.started(exc)
                    return
                outcome = Outcome(OutcomeKind.CRASH, exc)
                logger.error(
                    "actor %r failed to start: %r", self.name, exc, extra={"actor": self.name}
                )
            else:
                task_status.started(None)
            finally:
                self.started.set()  # the first start is over, however it went
            while True:
                if self.instance is not None:
                    outcome = await self._message_loop()
                    await self._stop_instance()
                assert outcome is not None
                if self.stop_requested or outcome.kind is OutcomeKind.STOP:
                    break
                self.state = ActorState.RESTARTING
                self.command_event = anyio.Event()
                self.awaiting_command = True
                if self.suspend_requested:
                    self.suspend_requested = False
                else:
                    self.supervisor.report(self, outcome)
                self.paused.set()
                await self.command_event.wait()
                self.awaiting_command = False
                self.paused = anyio.Event()
                command = self.command
                self.command = None
                if not isinstance(command, Resume):
                    break
                self.restarts += 1
                self.host.restarted(self, command.cause)
                try:
                    await self._start_instance(self.factory(), command.cause)
                except BaseException as caught:
                    exc = as_failure(caught)
                    if exc is None:
                        raise
                    outcome = Outcome(OutcomeKind.CRASH, exc)
                    logger.warning(
                        "actor %r failed to restart: %r", self.name, exc, extra={"actor": self.name}
                    )
                finally:
                    self.started.set()
        finally:
            self.finalise()

    async def _start_instance(self, instance: Actor, cause: BaseException | None) -> None:
        if not isinstance(instance, Actor):
            raise TypeError(
                f"actor factory for {self.name!r} must return an Actor, "
                f"got {type(instance).__name__}"
            )
        bind(instance, self)
        self.self_stop = False
        self.interrupt = self.stop_requested
        if cause is not None:
            await instance.on_restart(cause)
        await instance.on_start()
        self.instance = instance
        if not self.stop_requested:
            self.state = ActorState.RUNNING

    async def _stop_instance(self) -> None:
        instance, self.instance = self.instance, None
        if instance is None:
            return
        try:
            await instance.on_stop()
        except BaseException as caught:
            if as_failure(caught) is None:
                raise
            logger.exception("on_stop of actor %r raised", self.name, extra={"actor": self.name})

    async def _message_loop(self) -> Outcome:
        instance = self.instance
        assert instance is not None
        receive = instance.receive
        queue = self.queue
        senders = self.senders
        host = self.host
        batch = 0
        with anyio.CancelScope() as scope:
            self.loop_scope = scope
            retry = self.retry
            if retry is not None:
                item, attempts, _ = retry
                outcome = await self._retry(receive, item, attempts)
                if outcome is not None:
                    return outcome
            while True:
                if self.interrupt:
                    return self._interruption()
                if queue:
                    item = queue.popleft()
                    if senders:
                        senders.popleft().set()
                else:
                    batch = 0
                    self.idle = True
                    host.idle()
                    if self.emptied is not None:
                        self.emptied.set()
                        self.emptied = None
                    wakeup = self.wakeup = self.new_event()
                    await wakeup.wait()
                    continue
                self.current = item
                # BaseException: a stray CancelledError is this message's failure
                # (as_failure tells it from a real cancellation, which goes on up).
                if type(item) is _Ask:
                    try:
                        result = await receive(item.message)
                    except BaseException as exc:
                        error = as_failure(exc)
                        if error is None:
                            raise
                        self.current = None
                        return self._failed(item, 0, error)
                    item.set_result(result)
                else:
                    try:
                        await receive(item)
                    except BaseException as exc:
                        error = as_failure(exc)
                        if error is None:
                            raise
                        self.current = None
                        return self._failed(item, 0, error)
                self.current = None
                self.processed += 1
                batch += 1
                if batch >= _BATCH:
                    batch = 0
                    await anyio.lowlevel.checkpoint()
        # Only the engine cancels this scope: the shutdown deadline passed.
        self.loop_scope = None
        return Outcome(OutcomeKind.STOP)

    async def _retry(
        self, receive: Callable[[Any], Any], item: Any, attempts: int
    ) -> Outcome | None:
        """Hand a failed message to the fresh instance; None when it succeeded."""
        ask = item if type(item) is _Ask else None
        self.current, self.retry = item, None
        self.retried = attempts
        try:
            result = await receive(ask.message if ask is not None else item)
        except BaseException as exc:
            error = as_failure(exc)
            if error is None:
                raise
            self.current = None
            return self._failed(item, attempts, error)
        finally:
            self.retried = 0
        self.current = None
        self.processed += 1
        if ask is not None:
            ask.set_result(result)
        return None

    def attempt(self) -> tuple[int, bool]:
        """The attempt under way at the message in hand (1 the first time), and whether
        it is the last: failing now dead-letters the message."""
        attempt = self.retried + 1
        return attempt, self._last(attempt)

    def _last(self, attempts: int) -> bool:
        """A message that failed ``attempts`` times is dead-lettered, not retried."""
        return attempts >= self.max_attempts or self.restart is Restart.TEMPORARY

    def _failed(self, item: Any, attempts: int, error: Exception) -> Outcome:
        attempts += 1
        self.failed += 1
        if self._last(attempts):
            self.retry = None
            self.dead_letter(item, "failed", error, attempts)
        else:
            self.retry = (item, attempts, error)
        return Outcome(OutcomeKind.MESSAGE_FAILED, error, attempts)

    def _interruption(self) -> Outcome:
        if self.stop_requested:
            return Outcome(OutcomeKind.STOP)
        if self.suspend_requested:
            return Outcome(OutcomeKind.SUSPEND)
        return Outcome(OutcomeKind.NORMAL_EXIT)

    def _interrupt(self) -> None:
        """Make the loop leave after the current message."""
        self.interrupt = True
        self.wake()

    def request_self_stop(self) -> None:
        self.self_stop = True
        self._interrupt()

    def request_suspend(self) -> None:
        self.suspend_requested = True
        self._interrupt()

    def request_stop(self) -> None:
        self.stop_requested = True
        self._interrupt()

    def finalise(self) -> None:
        """Stop for good without waiting: dead-letter what is left, unregister, wake waiters."""
        self.closed = True
        self.open = False
        self.state = ActorState.STOPPED
        if not self.idle:
            self.idle = True
            self.host.idle()
        reason = self.stop_reason
        if self.host.closing:
            reason = "shutdown"
        if self.current is not None:
            item, self.current = self.current, None
            self.dead_letter(item, reason)
        if self.retry is not None:
            item, attempts, error = self.retry
            self.retry = None
            self.dead_letter(item, reason, error, attempts)
        while self.queue:
            self.dead_letter(self.queue.popleft(), reason)
        while self.senders:
            self.senders.popleft().set()
        self.host.forget(self)
        self.supervisor.forget(self)
        self.paused.set()
        self.started.set()
        self.done.set()
        if self.emptied is not None:
            self.emptied.set()

    # ------------------------------------------------- supervisor's controls

    async def suspend(self) -> None:
        """Stop the instance for a sibling's restart; the mailbox keeps filling."""
        if self.closed or self.awaiting_command:
            self.supervisor.pending.pop(self, None)
            return
        self.request_suspend()
        await self.paused.wait()

    async def resume(self, cause: BaseException | None) -> None:
        """Start a fresh instance after a suspension or a failure."""
        if self.closed or not self.awaiting_command:
            return
        self.started = anyio.Event()
        self.command = Resume(cause)
        self.command_event.set()
        await self.started.wait()

    async def terminate(self, reason: DeadLetterReason, *, cancel_current: bool = False) -> None:
        """Stop for good; queued messages are dead-lettered with ``reason``."""
        if self.state is ActorState.STOPPED:
            return
        self.closed = True
        self.open = False
        self.stop_reason = reason
        self.state = ActorState.STOPPING
        if self.awaiting_command:
            self.stop_requested = True
            self.command = Terminate()
            self.command_event.set()
        else:
            self.request_stop()
            if cancel_current and self.loop_scope is not None:
                self.loop_scope.cancel()
        while self.senders:
            self.senders.popleft().set()
        if current_cell.get() is not self:
            await self.done.wait()

    async def stop(self) -> None:
        await self.terminate("stopped")
