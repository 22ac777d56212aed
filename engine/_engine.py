"""The Engine: the facade that composes the runtime, the event bus, the outbox,
the breakers and the dead letters, and hands the built-in actors what they serve.

This module is the only one that imports ``actors``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

import engine.asgi as asgi
import engine.cache as cache
import engine.catalog as catalog
import engine.events as events
import engine.tenancy as tenancy
from actors._breaker import BreakerActor
from actors._cluster import Forwarder
from actors._dispatcher import ActorSubscriber, Dispatcher, FunctionSubscriber
from actors._relay import ProjectionSubscriber, Relay
from actors._resolver import ResolverActor

from ._actor import Actor, ActorRef
from ._backpressure import BackpressureConfig
from ._breaker import BreakerRegistry, CircuitBreaker, CircuitBreakerConfig
from ._bus import EventBus
from ._cluster import ClusterLink, breaker_config
from ._deadletters import DeadLetter, DeadLetters
from ._durable import Outbox
from ._durable_api import DurableAPI
from ._events import Event
from ._health import Health, check_health
from ._metrics import EngineMetrics, snapshot
from ._resolver import TENANT_RESOLVER, TenantResolver, start_tenant_resolver
from ._routing import (
    Scope,
    Subscription,
    SubscriptionRef,
)
from ._runtime import Runtime
from ._store import check_path
from ._supervision import Spawner, Supervisor, SupervisorRef, check_name
from ._system import SystemEvent, refuse_unpublishable
from ._tracing import Tracing, event_attributes
from ._types import Overflow, check_int, check_timeout
from .cluster import RedisStreams, check_cluster

_T = TypeVar("_T")


__all__ = ["Engine", "EngineMetrics"]

logger = logging.getLogger("actorbus.engine")


class Engine(Spawner, DurableAPI):
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
        cluster: RedisStreams | None = None,
        tracer_provider: object | None = None,
    ) -> None:
        path = check_path(database)
        check_cluster(cluster, path)
        check_timeout(shutdown_timeout, "shutdown_timeout", allow_none=False)
        check_timeout(storage_timeout, "storage_timeout", allow_none=False)
        check_timeout(start_timeout, "start_timeout")
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        check_int(dead_letter_limit, "dead_letter_limit", 1)
        self.backpressure = backpressure = BackpressureConfig.checked(backpressure)
        self.database = path
        self.shutdown_timeout = float(shutdown_timeout)
        self.storage_timeout = float(storage_timeout)
        self.start_timeout = start_timeout
        self.durability = durability
        self.dead_letters = DeadLetters(self._replay, max_entries=dead_letter_limit)
        runtime = Runtime(self.dead_letters, shutdown_timeout=self.shutdown_timeout)
        self._runtime = runtime
        # OpenTelemetry (engine._tracing): this provider, or the global one at start.
        self._tracing = tracing = Tracing(tracer_provider)
        self._bus = EventBus(runtime, backpressure, self.dead_letters, self._subscriber, tracing)
        self._breakers = BreakerRegistry(
            runtime, lambda breaker: lambda: BreakerActor(breaker, runtime.start_task)
        )
        # The parts whose state changes go out as system events (engine._system).
        emit = self._bus.emit
        runtime.emit = self._bus.controller.emit = self.dead_letters.emit = emit
        self._breakers.emit = emit
        self._breakers.tracing = tracing
        self.cluster = cluster
        self._outbox: Outbox | None = None
        self._link: ClusterLink | None = None
        if path is not None:
            self._outbox = Outbox(
                runtime,
                self._bus,
                self.dead_letters,
                path,
                durability=durability,
                storage_timeout=self.storage_timeout,
                start_timeout=start_timeout,
            )
            self._bus.tracking = self._bus.durable = self._outbox
            if cluster is not None:
                breaker = self._breakers.get("actorbus.cluster", breaker_config())
                self._link = ClusterLink(
                    cluster, runtime, self._bus, self._outbox, self.dead_letters, breaker
                )
                self._link.emit = emit
                self._bus.tracking = self._link
                self._bus.cluster_partitions = cluster.partitions

    def _subscriber(self, subscription: Subscription) -> Callable[[], Actor]:
        """The actor factory of a subscription's partitions."""
        outbox = self._outbox
        if subscription.projector is not None:
            assert outbox is not None
            return lambda: ProjectionSubscriber(outbox, subscription)
        handler = subscription.handler
        if subscription.is_function:
            return lambda: FunctionSubscriber(subscription, handler, self._tracing)
        return lambda: ActorSubscriber(subscription, handler, self._tracing)

    # ---------------------------------------------------------- context manager

    async def __aenter__(self) -> Engine:
        await self._runtime.enter()
        try:
            outbox = self._outbox
            link = self._link
            if outbox is not None:
                await outbox.open()
            if link is not None:
                await link.connect()
            router = self._bus.router
            await self._bus.start(lambda: Dispatcher(router, outbox))
            if outbox is not None:
                relay = (lambda: Forwarder(link)) if link is not None else (lambda: Relay(outbox))
                await outbox.start_relay(relay)
            self._tracing.start()
            self._breakers.start()
            self._bus.start_subscriptions()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        error = exc
        try:
            try:
                await self._runtime.stop(drain=exc is None)
            finally:
                if self._link is not None:
                    await self._link.stop()
                if self._outbox is not None:
                    await self._outbox.close()
        except BaseException as shutdown_error:  # handed to the task group below
            error = shutdown_error
        return await self._runtime.exit(error, exc)

    # ------------------------------------------------------------ supervision

    def _parent(self) -> Supervisor:
        root = self._runtime.root
        if root is None:
            self._runtime.refuse()
        return root

    @property
    def root(self) -> SupervisorRef:
        """The engine's root supervisor (ONE_FOR_ONE, 3 restarts within 5 s)."""
        return self._parent().ref

    def actor(self, name: str) -> ActorRef[Any]:
        """The ref of the running actor called ``name`` (``KeyError`` if there is none)."""
        return self._runtime.actor(name)

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
        return await start_tenant_resolver(
            self._runtime,
            ResolverActor,
            loader,
            ttl=ttl,
            negative_ttl=negative_ttl,
            max_entries=max_entries,
            max_concurrent_loads=max_concurrent_loads,
            validator=validator,
            name=name,
        )

    def breaker(self, name: str, config: CircuitBreakerConfig | None = None) -> CircuitBreaker:
        """The circuit breaker for dependency ``name``, backed by one breaker actor.

        Asking again for a name returns the same breaker; a different config
        for an existing name is a ``ValueError``. Callable before the engine
        starts; ``await engine.breaker(...)`` works too.
        """
        check_name(name)
        return self._breakers.get(name, config)

    def metrics(self) -> EngineMetrics:
        """A snapshot of every actor's statistics and the engine's counters."""
        return snapshot(
            self._runtime, self._bus, self.dead_letters, self._breakers, self._outbox, self._link
        )

    def health(self) -> Health:
        """``ok``, ``degraded`` or ``failing``, a reason per finding (``asgi.health_app``)."""
        return check_health(self._runtime, self.metrics, self.backpressure, self.cluster)

    async def idle(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once nothing is in flight (every mailbox empty and no handler, retry,
        write or catch-up under way, no event holding a slot; in a cluster, what committed
        here is in Redis and this node's readers handled it); ``TimeoutError`` after
        ``timeout`` s. Publish, idle, assert."""
        link = self._link
        extra = [] if link is None else [link.unsettled]
        await self._runtime.wait_idle([self._bus.unsettled, *extra], timeout)

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
        scope: Scope | None = None,
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

        With a cluster, ``scope="cluster"`` (the default) makes it one subscriber
        across every node: each event is handled by one node, in order per
        ``Event.partition_key()``; ``partitions=``/``key=`` are refused there.
        ``scope="node"`` gets every event on this node.
        """
        return self._bus.subscribe(
            event_types,
            handler,
            name=name,
            capacity=capacity,
            partitions=partitions,
            key=key,
            overflow=overflow,
            max_attempts=max_attempts,
            scope=scope,
        )

    def _check_event(self, event: object) -> None:
        if not isinstance(event, Event) or isinstance(event, SystemEvent):
            refuse_unpublishable(event, "publish")
        event.validate()

    async def publish(self, event: Event, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Validate ``event`` and hand it to the dispatcher, waiting while CRITICAL.

        Raises ``EventValidationError`` for an invalid event (never
        dispatched) and ``BackpressureError`` when ``timeout`` runs out.
        """
        if timeout is not None:
            check_timeout(timeout, "timeout")
        self._check_event(event)
        self._runtime.check_publishing()
        tracing = self._tracing
        if tracing.on:
            with tracing.publishing("publish", event_attributes(event)) as trace:
                await self._bus.publish(event, timeout, trace)
            return
        await self._bus.publish(event, timeout)

    def try_publish(self, event: Event) -> None:
        """Validate ``event`` and hand it to the dispatcher without waiting.

        Raises ``BackpressureError`` while the engine is CRITICAL.
        """
        self._check_event(event)
        runtime = self._runtime
        if not runtime.accepting:
            runtime.check_publishing()
        tracing = self._tracing
        if tracing.on:
            with tracing.publishing("publish", event_attributes(event)) as trace:
                self._bus.try_publish(event, trace)
            return
        self._bus.try_publish(event)

    async def _replay(self, letter: DeadLetter) -> None:
        await self._bus.redeliver(letter)
