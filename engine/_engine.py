"""The Engine: owns the task group, the root supervisor, the registry and shutdown."""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from . import _counters as counters
from . import asgi, cache, catalog, events, tenancy
from ._actor import Actor, ActorRef, Cell, current_cell
from ._backpressure import (
    BackpressureConfig,
    BackpressureController,
    BackpressureError,
    BackpressureMetrics,
    BackpressureState,
)
from ._breaker import BreakerMetrics, CircuitBreaker, CircuitBreakerConfig
from ._deadletters import DeadLetter, DeadLetters, read_rows
from ._errors import ActorStopped, EngineError
from ._events import Event, decode
from ._store import (
    Request,
    StorageError,
    StorageMetrics,
    Store,
    Transaction,
    last_seq,
    prune_outbox,
)
from ._supervision import Supervisor, SupervisorRef, check_name
from ._types import (
    ActorStatistics,
    Backoff,
    Overflow,
    Restart,
    Strategy,
    check_enum,
    check_int,
    check_timeout,
)

if TYPE_CHECKING:
    from actors._dispatcher import Router, Subscription, SubscriptionRef
    from actors._relay import RelayState, Tracker
    from actors._resolver import TenantResolver

_T = TypeVar("_T")

__all__ = ["Engine", "EngineMetrics"]

# The engine's own actors; user names may not start with it.
RESERVED_PREFIX = "actorbus."
DISPATCHER = RESERVED_PREFIX + "dispatcher"
RELAY = RESERVED_PREFIX + "relay"
TENANT_RESOLVER = RESERVED_PREFIX + "tenant_resolver"
_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_NOT_ASYNC = (
    "transact runs a plain function `def fn(tx)` in the database thread, not a coroutine "
    "function: got {fn!r}"
)
# How often positions are checkpointed, and the outbox is polled as a safety net.
# 0.13 s, not 0.1 s: anyio's wait_all_tasks_blocked on asyncio polls every 0.1 s
# and, in step with a 0.1 s timer, would find this task runnable every time.
CHECKPOINT_INTERVAL = 0.13
POLL_INTERVAL = 1.0

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
    backpressure: BackpressureMetrics
    """The in-flight event budget: depth, peak, state, accepted, rejected, transitions."""
    outbox_head: int = 0
    """The last committed outbox seq (0 without a database)."""
    lag: dict[str, int] = msgspec.field(default_factory=dict)
    """Per durable subscription or projection: outbox events after its position."""
    breakers: dict[str, BreakerMetrics] = msgspec.field(default_factory=dict)
    """Every circuit breaker's state and counters, by dependency name."""
    validation_failures: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    """Events refused by validation in this process: event type -> kind -> count."""
    tenant_rejections: dict[str, int] = msgspec.field(default_factory=dict)
    """Tenant identifiers refused in this process, by reason."""
    storage: StorageMetrics | None = None
    """The database's health: outages, retries, writes waiting (None without a database)."""


class _NoSlot:
    """The controller of deliveries that hold no backpressure slot (catch-up reads)."""

    def release(self) -> None:
        pass


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
    cache = cache
    """Cache backends: ``CacheBackend``, ``InMemoryCache``, ``RedisCache``."""
    asgi = asgi
    """``TenantMiddleware`` for ASGI applications."""

    def __init__(
        self,
        database: str | os.PathLike[str] | None = None,
        *,
        backpressure: BackpressureConfig | None = None,
        shutdown_timeout: float = 10.0,
        durability: Literal["full", "normal"] = "full",
        dead_letter_limit: int = 10_000,
        storage_timeout: float = 5.0,
        start_timeout: float | None = None,
    ) -> None:
        if database is not None and not isinstance(database, str | os.PathLike):
            raise TypeError(f"database must be a path or None, got {type(database).__name__}")
        if database is not None:
            database = os.fspath(database)
            if not database or "\x00" in database:
                raise ValueError(f"database must be a file path, got {database!r}")
            if database == ":memory:" or database.startswith("file:"):
                raise ValueError(
                    f"database must be a file path, got {database!r}: the outbox needs a file "
                    "its connections share (use Engine() for events in memory)"
                )
        check_timeout(shutdown_timeout, "shutdown_timeout", allow_none=False)
        check_timeout(storage_timeout, "storage_timeout", allow_none=False)
        check_timeout(start_timeout, "start_timeout")
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        check_int(dead_letter_limit, "dead_letter_limit", 1)
        if backpressure is None:
            backpressure = BackpressureConfig()
        elif not isinstance(backpressure, BackpressureConfig):
            raise TypeError(
                f"backpressure must be a BackpressureConfig, got {type(backpressure).__name__}"
            )
        self.backpressure = backpressure
        self._controller = BackpressureController(backpressure)
        # The engine wires the built-in actors here only (actors imports engine).
        from actors._dispatcher import Delivery, Router

        self._router: Router = Router()
        self._delivery = Delivery
        self._pending_subscriptions: list[Subscription] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._dispatcher: Cell | None = None
        self.database: str | None = database
        self._store: Store | None = None
        self._relay_state: RelayState | None = None
        self._relay: Cell | None = None
        self._no_slot = _NoSlot()
        # The highest outbox seq the dispatcher has routed to every live subscription.
        self._dispatched = 0
        # Outbox deliveries handed to the dispatcher and not yet routed.
        self._routing = 0
        # Set when the engine stops its actors: the relay and catch-up readers stop.
        self._terminating = False
        self._housekeeping: anyio.CancelScope | None = None
        self._store_done = anyio.Event()
        self.shutdown_timeout = float(shutdown_timeout)
        self.storage_timeout = float(storage_timeout)
        self.start_timeout = start_timeout
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
        self._host_done = anyio.Event()
        outer = anyio.create_task_group()
        await outer.__aenter__()
        self._outer = outer
        tg: TaskGroup = await outer.start(self._host, name="actorbus engine")
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
        try:
            if self.database is not None:
                await self._open_store(tg)
            await self._start_dispatcher()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _host(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        # Actors live in a task group shielded from the caller's cancel scopes:
        # when the caller is cancelled, leaving the engine stops them in order
        # (on_stop in reverse start order) instead of each dying where it stood.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as inner:
                task_status.started(inner)
                await self._host_done.wait()
                inner.cancel_scope.cancel()

    async def _start_dispatcher(self) -> None:
        from actors._dispatcher import Dispatcher

        assert self._root is not None
        router = self._router
        cell, instance = self._root.add_cell(
            lambda: Dispatcher(router),
            name=DISPATCHER,
            capacity=self.backpressure.max_depth,
            overflow=Overflow.BLOCK,
            restart=Restart.PERMANENT,
            max_attempts=1,
            internal=True,
        )
        await self._task_group.start(cell.run, instance, name="actorbus dispatcher")
        self._dispatcher = cell
        if self._relay_state is not None:
            await self._start_relay()
        for breaker in self._breakers.values():
            self._start_breaker(breaker)
        pending = list(self._pending_subscriptions)
        for subscription in pending:
            self._pending_subscriptions.remove(subscription)
            self._start_subscription(subscription)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        error = exc
        try:
            await self._shutdown(drain=exc is None)
        except BaseException as shutdown_error:  # handed to the task group below
            error = shutdown_error
        finally:
            self._running = False
            self._host_done.set()
        try:
            suppressed = await self._outer.__aexit__(
                type(error) if error else None, error, error.__traceback__ if error else None
            )
        except BaseExceptionGroup as group:
            single = _single(group)
            if single is group:
                raise
            raise single from single.__cause__
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
        cut_short = not drain
        try:
            if drain and self._busy:
                self._draining = True
                cut_short = True  # until the drain ends on its own
                with anyio.move_on_after(self.shutdown_timeout):
                    await self._drained.wait()
                cut_short = self._busy > 0
                if cut_short:
                    logger.warning(
                        "shutdown: %d messages still in flight after %.1f s; dead-lettering them",
                        self._in_flight(),
                        self.shutdown_timeout,
                    )
        finally:
            self._draining = False
            self._terminating = True
            # Shielded and bounded: even a cancelled caller gets its actors'
            # on_stop, in reverse start order, within shutdown_timeout.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.shutdown_timeout):
                await root.terminate("shutdown", cancel_current=cut_short)
            if self._store is not None:
                with anyio.CancelScope(shield=True):
                    await self._close_store()

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

    def _check_name_free(self, name: str, *, internal: bool = False) -> None:
        if not internal and name.startswith(RESERVED_PREFIX):
            raise ValueError(f"names starting with {RESERVED_PREFIX!r} are reserved, got {name!r}")
        if name in self._names:
            raise ValueError(f"name {name!r} is already taken by a running actor or supervisor")
        for pending in self._pending_subscriptions:
            if name == _supervisor_name(pending.name) or name in pending.partition_names():
                raise ValueError(f"name {name!r} is already taken by subscription {pending.name!r}")

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
        subscription = self._router.subscriptions.get(letter.actor)
        relayed = letter.actor == RELAY
        message = letter.message
        if (
            (subscription is not None or relayed)
            and isinstance(message, bytes)
            and letter.seq is not None
        ):
            try:  # an outbox row whose type was not registered then may be now
                message = decode(message)
            except Exception as exc:
                raise EngineError(
                    f"cannot replay dead letter {letter.id}: its event does not decode ({exc})"
                ) from exc
        if isinstance(message, Event) and (subscription is not None or relayed):
            self._check_publishing()
            if subscription is not None and subscription.projector is not None:
                await self._replay_projection(subscription, message, letter)
                return
            # The relay's: to every live subscription; a subscription's: to it alone.
            await self._controller.acquire(None)
            self._dispatch(self._delivery(message, self._controller, subscription))
            return
        target = self._names.get(letter.actor)
        if not isinstance(target, Cell):
            raise ActorStopped(f"cannot replay dead letter {letter.id}: no actor {letter.actor!r}")
        await target.ref.tell(letter.message)

    # ------------------------------------------------------------ durability

    async def _open_store(self, tg: TaskGroup) -> None:
        from actors._relay import RelayState

        assert self.database is not None
        store = Store(
            self.database,
            durability=self.durability,
            max_pending=self.backpressure.max_depth,
            on_commit=self._committed,
            on_busy=self._store_busy,
            on_idle=self._cell_idle,
            timeout=self.storage_timeout,
        )
        head = await store.open(timeout=self.start_timeout)
        self._store = store
        self._store_done = anyio.Event()
        tg.start_soon(self._run_store, store, name="actorbus writer")
        loaded, count, newest = await store.read(
            _load_dead_letters(self.dead_letters.max_entries), background=False
        )
        self.dead_letters.attach(store, loaded, count, newest)
        self._relay_state = RelayState(head)
        self._dispatched = head

    async def _run_store(self, store: Store) -> None:
        try:
            await store.run()
        finally:
            self._store_done.set()

    def _store_busy(self) -> None:
        self._busy += 1

    async def _start_relay(self) -> None:
        from actors._relay import Relay

        assert self._root is not None
        assert self._relay_state is not None
        state = self._relay_state
        cell, instance = self._root.add_cell(
            lambda: Relay(self, state),
            name=RELAY,
            capacity=1,
            overflow=Overflow.REJECT,
            restart=Restart.PERMANENT,
            max_attempts=1,
            internal=True,
        )
        await self._task_group.start(cell.run, instance, name="actorbus relay")
        self._relay = cell
        scope = anyio.CancelScope()
        self._housekeeping = scope
        self._task_group.start_soon(self._housekeep, scope, name="actorbus housekeeping")

    def _committed(self, events: list[tuple[int, Event]]) -> None:
        state = self._relay_state
        assert state is not None
        state.committed(events)
        self._wake_relay()

    def _wake_relay(self) -> None:
        relay = self._relay
        if relay is not None and not relay.closed and not relay.queue:
            # The engine's own tasks count as inside: during the drain the
            # relay still takes wake-ups, as actors still take each other's tells.
            token = current_cell.set(relay)
            try:
                relay.offer("committed")
            finally:
                current_cell.reset(token)

    async def _housekeep(self, scope: anyio.CancelScope) -> None:
        """Checkpoint positions often; poll the outbox and replay requests now and then."""
        from actors._relay import checkpoint

        store = self._store
        state = self._relay_state
        assert store is not None
        assert state is not None
        polled = anyio.current_time()
        with scope:
            previous: Request | None = None
            while True:
                await anyio.sleep(CHECKPOINT_INTERVAL)
                # One checkpoint at a time: a stalled writer must not pile them up.
                if previous is None or previous.taken:
                    previous = checkpoint(self)
                    if previous is not None and not self._terminating:
                        store.submit(previous, bounded=False)
                if anyio.current_time() - polled >= POLL_INTERVAL:
                    polled = anyio.current_time()
                    await store.checkpoint()
                    head, replays = await store.read(_poll)
                    if head > state.head:
                        state.head = head
                        self._wake_relay()
                    await self.dead_letters.refresh()
                    for letter_id in replays:
                        await self._replay_requested(letter_id)

    async def _replay_requested(self, letter_id: int) -> None:
        """A replay asked for from outside (``python -m engine dead-letters DB replay ID``)."""
        try:
            await self.dead_letters.replay(letter_id)
        except StorageError:
            return  # the database's fault, not the letter's: asked again at the next poll
        except Exception as exc:
            logger.warning(
                "replay of dead letter %d requested from outside failed: %s",
                letter_id,
                exc,
                extra={"dead_letter": letter_id},
            )
            store = self._store
            assert store is not None
            await store.call(
                lambda tx: tx.conn.execute(
                    "UPDATE dead_letters SET replay_requested = 0 WHERE id = ?", (letter_id,)
                ),
                kind="dead letters",
                background=True,
            )
        else:
            logger.info("dead letter %d replayed on request", letter_id)

    async def _close_store(self) -> None:
        from actors._relay import checkpoint

        store = self._store
        assert store is not None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        request = checkpoint(self)
        if request is not None:
            store.submit(request, bounded=False)
        store.close(within=self.shutdown_timeout)
        await self._store_done.wait()
        self.dead_letters.detach()

    def _track(self, subscription: Subscription) -> Tracker:
        from actors._relay import register

        return register(self, subscription)

    async def _catch_up(self, tracker: Tracker) -> None:
        from actors._relay import catch_up

        current_cell.set(self._dispatcher)  # inside the engine: delivers during the drain
        try:
            if not self._terminating:
                await catch_up(self, tracker)
        except (EngineError, sqlite3.Error):
            if not self._terminating:
                raise
            # Stopped while catching up: the next run resumes from the positions.
        finally:
            self._cell_idle()

    async def _replay_projection(
        self, subscription: Subscription, event: Event, letter: DeadLetter
    ) -> None:
        from actors._relay import run_projector

        store = self._store
        assert store is not None
        assert subscription.projector is not None
        projector = subscription.projector
        attempts = subscription.max_attempts

        def replay(tx: Transaction) -> None:
            error = run_projector(tx, projector, event, attempts)
            if error is not None:
                raise error
            tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (letter.id,))

        await store.call(replay)

    def _require_store(self, what: str) -> Store:
        if self.database is None:
            raise EngineError(f"{what} needs a database: use Engine('app.db')")
        if self._store is None:
            self._refuse()
        return self._store

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

    async def tenant_resolver(
        self,
        loader: Callable[[tenancy.TenantKey], Awaitable[_T | None]],
        *,
        ttl: float = 300.0,
        negative_ttl: float = 60.0,
        max_entries: int = 1000,
        max_concurrent_loads: int = 100,
        validator: tenancy.TenantIdentifierValidator | None = None,
        name: str = TENANT_RESOLVER,
    ) -> TenantResolver[_T]:
        """Start a tenant resolver actor: ``await resolver.resolve(key)`` -> the tenant.

        Raw identifiers are validated first (``TenantValidationError``); one
        load per key however many callers wait, in a task the resolver owns;
        loader errors reach every waiter and are not cached; unknown tenants
        (``None``) are cached for ``negative_ttl``; TTLs get +-10% jitter.
        """
        from actors._resolver import start_tenant_resolver

        return await start_tenant_resolver(
            self,
            loader,
            ttl=ttl,
            negative_ttl=negative_ttl,
            max_entries=max_entries,
            max_concurrent_loads=max_concurrent_loads,
            validator=validator,
            name=name,
        )

    def actor(self, name: str) -> ActorRef[Any]:
        """The ref of the running actor called ``name`` (``KeyError`` if there is none)."""
        target = self._names.get(name)
        if not isinstance(target, Cell):
            raise KeyError(f"no running actor named {name!r}")
        return target.ref

    def metrics(self) -> EngineMetrics:
        """A snapshot of every actor's statistics and the engine's counters."""
        validation, tenants = counters.snapshot()
        return EngineMetrics(
            actors={
                name: target.statistics()
                for name, target in self._names.items()
                if isinstance(target, Cell)
            },
            in_flight=self._in_flight(),
            dead_letters=self.dead_letters.count(),
            dead_letters_total=self.dead_letters.total,
            backpressure=self._controller.metrics(),
            outbox_head=self._relay_state.head if self._relay_state is not None else 0,
            lag=self._lag(),
            breakers={name: breaker.metrics() for name, breaker in self._breakers.items()},
            validation_failures=validation,
            tenant_rejections=tenants,
            storage=self._store.metrics() if self._store is not None else None,
        )

    def _lag(self) -> dict[str, int]:
        state = self._relay_state
        if state is None:
            return {}
        lag = {}
        for name, subscription in self._router.subscriptions.items():
            tracker = subscription.tracker
            if tracker is not None and tracker.partitions:
                lag[name] = max(0, state.head - min(tracker.positions()))
        return lag

    # ------------------------------------------------------------- breakers

    def breaker(self, name: str, config: CircuitBreakerConfig | None = None) -> CircuitBreaker:
        """The circuit breaker for dependency ``name``, backed by one breaker actor.

        Asking again for a name returns the same breaker; a different config
        for an existing name is a ``ValueError``. Callable before the engine
        starts; ``await engine.breaker(...)`` works too.
        """
        check_name(name)
        if config is None:
            config = CircuitBreakerConfig()
        elif not isinstance(config, CircuitBreakerConfig):
            raise TypeError(f"config must be a CircuitBreakerConfig, got {type(config).__name__}")
        existing = self._breakers.get(name)
        if existing is not None:
            if existing.config != config:
                raise ValueError(
                    f"breaker {name!r} exists with another config: {existing.config!r}"
                )
            return existing
        if self._closing:
            self._refuse()
        breaker = CircuitBreaker(name, config)
        if self._running:
            self._start_breaker(breaker)
        self._breakers[name] = breaker
        return breaker

    def _start_breaker(self, breaker: CircuitBreaker) -> None:
        from actors._breaker import BreakerActor

        assert self._root is not None
        cell, instance = self._root.add_cell(
            lambda: BreakerActor(self, breaker),
            name=f"{RESERVED_PREFIX}breaker.{breaker.name}",
            capacity=64,
            overflow=Overflow.REJECT,
            restart=Restart.PERMANENT,
            max_attempts=1,
            internal=True,
        )
        breaker._actor = cell.ref
        self._task_group.start_soon(cell.run, instance, name=f"breaker {breaker.name}")

    # ------------------------------------------------------------- durable API

    async def transact(self, fn: Callable[[Transaction], _T]) -> _T:
        """Run ``fn(tx)`` in the database thread inside one transaction; return its result.

        ``tx.db`` is a ``sqlite_utils.Database`` on that transaction and
        ``tx.publish(event)`` appends a validated event to the outbox in it.
        If ``fn`` raises, its writes and its events roll back together and the
        error is raised here. Concurrent calls share one commit (group commit)
        with a savepoint each; this returns once the commit holding the work
        is durable. Needs a database (``EngineError`` otherwise).
        """
        code = getattr(fn, "__code__", None)
        if code is not None:  # a plain function: the cheap check
            if code.co_flags & _ASYNC_FLAGS:
                raise TypeError(_NOT_ASYNC.format(fn=fn))
        elif not callable(fn):
            raise TypeError(f"transact takes a function of the transaction, got {fn!r}")
        elif inspect.iscoroutinefunction(fn):
            raise TypeError(_NOT_ASYNC.format(fn=fn))
        store = self._store
        if store is None or not self._accepting:
            store = self._require_store("transact")
            self._check_publishing()
        result: _T = await store.call(fn)
        return result

    def project(
        self,
        *event_types: type[Event],
        projector: Callable[[Transaction, Any], None],
        name: str,
        max_attempts: int = 3,
        capacity: int = 1000,
    ) -> SubscriptionRef:
        """A durable projection: ``projector(tx, event)`` runs in the database thread.

        It runs inside the transaction that also moves the projection's
        position, so its writes to the same database happen exactly once, even
        across crashes. A failing projector is retried in place (a savepoint
        per attempt) up to ``max_attempts``, then the event is dead-lettered in
        that same transaction. Needs a database.
        """
        from actors._dispatcher import Subscription

        if self.database is None:
            raise EngineError("project needs a database: use Engine('app.db')")
        _check_event_types(event_types, "project")
        if not callable(projector) or inspect.iscoroutinefunction(projector):
            raise TypeError(
                "projector must be a plain function `def projector(tx, event)` (it runs in the "
                f"database thread), got {projector!r}"
            )
        check_name(name)
        check_int(max_attempts, "max_attempts", 1)
        check_int(capacity, "capacity", 1)
        self._check_new_subscription(name)
        subscription = Subscription(
            self,
            tuple(event_types),
            projector,  # type: ignore[arg-type]
            name=name,
            capacity=capacity,
            partitions=1,
            key=None,
            overflow=Overflow.BLOCK,
            max_attempts=max_attempts,
            backoff=Backoff(),
        )
        subscription.projector = projector
        return self._add_subscription(subscription)

    async def prune(self, *, older_than: float | dt.timedelta) -> int:
        """Delete outbox events older than ``older_than`` that every subscription passed.

        ``older_than`` is seconds or a ``timedelta``. Positions are as last
        checkpointed, so an event is never pruned before every durable
        subscription (and projection) finished it. Sequence numbers are never
        reused. Returns how many events were deleted.
        """
        seconds = _age(older_than)
        store = self._require_store("prune")
        self._check_publishing()
        cutoff = time.time() - seconds
        deleted: int = await store.call(lambda tx: prune_outbox(tx.conn, cutoff))
        return deleted

    # ------------------------------------------------------------- events

    def subscribe(
        self,
        *event_types: type[Event],
        handler: Callable[[Any], Awaitable[None]] | Callable[[], Actor],
        name: str,
        capacity: int = 1000,
        partitions: int = 1,
        key: Callable[[Any], object] | None = None,
        overflow: Overflow = Overflow.BLOCK,
        max_attempts: int = 3,
    ) -> SubscriptionRef:
        """Deliver every published event of ``event_types`` (subclasses included) to ``handler``.

        ``handler`` is an async function ``async def handle(event) -> None``
        (stateless: a failing call is retried with backoff up to
        ``max_attempts``, then dead-lettered) or an Actor factory whose
        ``receive(event)`` handles it (failures restart the actor, as for any
        actor). ``partitions=N`` runs N handler actors; ``key(event)`` picks
        one by a stable hash (same key, same actor, so order per key holds;
        without ``key`` the event id spreads them). Callable before the
        engine starts: the subscription then begins with it.
        """
        from actors._dispatcher import Subscription

        _check_event_types(event_types, "subscribe")
        from actors._dispatcher import is_async_function

        if not callable(handler) or not (is_async_function(handler) or _is_actor_factory(handler)):
            raise TypeError(
                "handler must be an async function `async def handle(event)` or an Actor "
                f"factory callable with no arguments, got {handler!r}"
            )
        check_name(name)
        check_int(capacity, "capacity", 1)
        check_int(partitions, "partitions", 1)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable of the event or None, got {key!r}")
        check_enum(overflow, Overflow, "overflow")
        check_int(max_attempts, "max_attempts", 1)
        self._check_new_subscription(name)
        subscription = Subscription(
            self,
            tuple(event_types),
            handler,
            name=name,
            capacity=capacity,
            partitions=partitions,
            key=key,
            overflow=overflow,
            max_attempts=max_attempts,
            backoff=Backoff(),
        )
        return self._add_subscription(subscription)

    def _check_new_subscription(self, name: str) -> None:
        if self._closing:
            self._refuse()
        if name in self._router.subscriptions:
            raise ValueError(f"a subscription named {name!r} already exists")

    def _add_subscription(self, subscription: Subscription) -> SubscriptionRef:
        for taken in [_supervisor_name(subscription.name), *subscription.partition_names()]:
            self._check_name_free(taken)
        if self.database is not None:
            self._track(subscription)
        if self._running:
            self._start_subscription(subscription)
        else:
            self._pending_subscriptions.append(subscription)
        self._router.add(subscription)
        return subscription.ref

    def _start_subscription(self, subscription: Subscription) -> None:
        assert self._root is not None
        supervisor = self._root.add_supervisor(
            _supervisor_name(subscription.name),
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=3,
            within=5.0,
            backoff=Backoff(),
        )
        factory = subscription.factory()
        started: list[tuple[Cell, Actor]] = []
        try:
            for partition in subscription.partition_names():
                started.append(
                    supervisor.add_cell(
                        factory,
                        name=partition,
                        capacity=subscription.capacity,
                        overflow=subscription.overflow,
                        restart=Restart.PERMANENT,
                        max_attempts=subscription.max_attempts,
                    )
                )
        except BaseException:
            # The handler's factory raised: leave nothing registered (and no
            # cell counted busy, which would hold up the shutdown drain).
            for cell, _ in started:
                cell.finalise()
            supervisor.close()
            raise
        for cell, instance in started:
            cell.dead_letter_name = subscription.name
            subscription.cells.append(cell)
            self._task_group.start_soon(cell.run, instance, name=f"subscriber {cell.name}")
        if subscription.tracker is not None:
            self._busy += 1  # counted now: the drain waits for a catch-up not yet begun
            self._task_group.start_soon(
                self._catch_up, subscription.tracker, name=f"catch-up {subscription.name}"
            )

    def _check_event(self, event: object) -> Event:
        if not isinstance(event, Event):
            raise TypeError(f"publish takes an Event, got {type(event).__name__}")
        event.validate()
        return event

    def _check_publishing(self) -> None:
        if not self._accepting and (not self._running or current_cell.get() is None):
            self._refuse()

    def _dispatch(self, delivery: Any) -> None:
        dispatcher = self._dispatcher
        assert dispatcher is not None
        try:
            accepted = dispatcher.offer(delivery)
        except BaseException:
            self._controller.give_back()
            raise
        if not accepted:  # depth >= the dispatcher's queue, so this means a bug
            self._controller.give_back()
            raise BackpressureError("the dispatcher mailbox is full")

    async def publish(self, event: Event, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Validate ``event`` and hand it to the dispatcher, waiting while CRITICAL.

        Raises ``EventValidationError`` for an invalid event (never
        dispatched) and ``BackpressureError`` when ``timeout`` runs out.
        """
        if timeout is not None:
            check_timeout(timeout, "timeout")
        self._check_event(event)
        self._check_publishing()
        controller = self._controller
        store = self._store
        if store is not None:
            # Durable: the outbox holds it once committed; the relay takes the
            # slot when it dispatches. Publishers still wait while CRITICAL.
            await controller.admit(timeout)
            await store.call(lambda tx: tx._append(event), kind="events")
            return
        if not controller.try_acquire():
            await controller.acquire(timeout)
        self._dispatch(self._delivery(event, controller))

    def try_publish(self, event: Event) -> None:
        """Validate ``event`` and hand it to the dispatcher without waiting.

        Raises ``BackpressureError`` while the engine is CRITICAL.
        """
        self._check_event(event)
        self._check_publishing()
        controller = self._controller
        store = self._store
        if store is not None:
            if controller.state is BackpressureState.CRITICAL:
                self._refuse_critical()
            if not store.submit(Request(lambda tx: tx._append(event), kind="events")):
                controller.reject()
                raise BackpressureError(
                    f"the outbox writer has {store.max_pending} writes waiting for a commit"
                )
            return
        if not controller.try_acquire():
            self._refuse_critical()
        self._dispatch(self._delivery(event, controller))

    def _refuse_critical(self) -> NoReturn:
        controller = self._controller
        controller.reject()
        raise BackpressureError(
            f"engine is CRITICAL: {controller.depth} of {self.backpressure.max_depth} "
            "events in flight"
        )


def _is_actor_factory(handler: object) -> bool:
    """An Actor subclass, or a callable that takes no arguments (it builds an Actor)."""
    if isinstance(handler, type):
        return issubclass(handler, Actor)
    try:
        inspect.signature(handler).bind()  # type: ignore[arg-type]
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): let the call decide
        return True
    return True


def _check_event_types(event_types: tuple[object, ...], verb: str) -> None:
    if not event_types:
        raise ValueError(f"{verb} needs at least one event type (Event receives all)")
    for event_type in event_types:
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise TypeError(f"event types must be Event subclasses, got {event_type!r}")


def _supervisor_name(subscription: str) -> str:
    return f"subscription:{subscription}"


def _load_dead_letters(
    limit: int,
) -> Callable[[Any], tuple[list[DeadLetter], int, int]]:
    def load(conn: Any) -> tuple[list[DeadLetter], int, int]:
        count, newest = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM dead_letters"
        ).fetchone()
        return read_rows(conn, limit=limit), count, newest

    return load


def _poll(conn: Any) -> tuple[int, list[int]]:
    head = last_seq(conn)
    replays = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM dead_letters WHERE replay_requested = 1 ORDER BY id LIMIT 100"
        )
    ]
    return head, replays


def _age(older_than: float | dt.timedelta) -> float:
    if isinstance(older_than, dt.timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise TypeError(
            f"older_than must be seconds or a datetime.timedelta, got {type(older_than).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"older_than must be finite and >= 0, got {older_than!r}")
    return seconds
