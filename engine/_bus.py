"""The event bus: subscriptions and their actors, the dispatcher, the in-flight budget.

In memory ``publish`` takes a backpressure slot and hands the event to the
dispatcher actor, which hands it to the mailbox of each matching
subscription's partition. With a database the outbox (``_durable``) feeds the
same dispatcher after each commit; the bus asks it, through ``Tracking``, to
follow a durable subscription's positions and to start its catch-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import anyio

from ._actor import Actor, Cell, current_cell
from ._backpressure import (
    BackpressureConfig,
    BackpressureController,
    BackpressureError,
    BackpressureMetrics,
)
from ._deadletters import DeadLetter
from ._errors import ActorStopped, EngineError
from ._events import Event, decode
from ._routing import (
    DeadLetterRecorder,
    Delivery,
    PartitionRef,
    Router,
    Routes,
    Scope,
    Subscription,
    SubscriptionRef,
)
from ._runtime import RESERVED_PREFIX, Runtime
from ._supervision import ChildSpec, Supervisor, check_name
from ._system import SystemEvent, is_system
from ._tracing import Tracing
from ._types import Backoff, DeadLetterReason, Overflow, Restart, Strategy

__all__ = ["DISPATCHER", "RELAY", "EventBus", "Tracking"]

logger = logging.getLogger("actorbus.dispatcher")

DISPATCHER = RESERVED_PREFIX + "dispatcher"
RELAY = RESERVED_PREFIX + "relay"


class Tracking(Protocol):
    """What the outbox does for a durable subscription."""

    def track(self, subscription: Subscription) -> None:
        """Follow its positions from now on (it goes live once it caught up)."""

    def start(self, subscription: Subscription) -> None:
        """Its actors run: read the outbox from its position, then make it live."""

    async def replay_projection(
        self, subscription: Subscription, event: Event, letter: DeadLetter
    ) -> None:
        """Apply a dead-lettered event to its projection again."""

    async def halt(self, subscription: Subscription) -> None:
        """It is closing: end its catch-up (in a cluster: its readers, its leases)."""

    async def retire(self, subscription: Subscription) -> None:
        """Its actors stopped: store the positions it reached and stop following it."""


class DurablePublisher(Protocol):
    """With a database, publishing goes through the outbox (``Outbox``)."""

    async def publish(
        self,
        event: Event,
        timeout: float | None,  # noqa: ASYNC109
        trace: str | None = None,
    ) -> None: ...

    def try_publish(self, event: Event, trace: str | None = None) -> None: ...


class EventBus:
    """Publishing, dispatching and the lifecycle of subscriptions."""

    def __init__(
        self,
        runtime: Runtime,
        config: BackpressureConfig,
        dead_letters: DeadLetterRecorder,
        subscriber: Callable[[Subscription], Callable[[], Actor]],
        tracing: Tracing,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.controller = BackpressureController(config)
        self.router = Router()
        self.routes = Routes(self.router, dead_letters, self.controller.release, self._closing)
        # Catch-up deliveries come from the outbox by position and take no slot.
        self.free_routes = self.routes.without_slot()
        self._subscriber = subscriber
        self._pending: list[Subscription] = []
        # Each started subscription's supervisor (of its partition actors), by name.
        self._supervisors: dict[str, Supervisor] = {}
        # System events a lagging subscriber lost (its oldest, when its mailbox was full).
        self.system_events_dropped = 0
        self.dispatcher: Cell | None = None
        self.tracking: Tracking | None = None
        self.durable: DurablePublisher | None = None
        self.tracing = tracing
        # With a cluster: its partition count (a cluster-scope subscription has one
        # actor per partition), and subscriptions are in cluster scope by default.
        self.cluster_partitions: int | None = None

    def _closing(self) -> bool:
        return self.runtime.closing

    # ------------------------------------------------------------- lifecycle

    async def start(self, dispatcher: Callable[[], Actor]) -> None:
        """Start the dispatcher; its mailbox holds ``max_depth`` events."""
        cell = await self.runtime.start_builtin(
            dispatcher, name=DISPATCHER, capacity=self.config.max_depth, overflow=Overflow.BLOCK
        )
        self.dispatcher = cell
        self.routes.dispatcher = self.free_routes.dispatcher = cell

    def start_subscriptions(self) -> None:
        """Start the subscriptions added before the engine ran."""
        pending, self._pending = self._pending, []
        for subscription in pending:
            self._start(subscription)

    def check_retired(self, name: str) -> None:
        """``name`` may be forgotten (``engine.forget``): not the engine's own, and no
        subscription of that name registered here."""
        check_name(name)
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(f"names starting with {RESERVED_PREFIX!r} are the engine's own")
        if name in self.router.subscriptions:
            raise ValueError(
                f"subscription {name!r} is registered in this engine: close it before forgetting it"
            )

    def check_new(self, name: str) -> None:
        """A new subscription may take ``name``."""
        if self.runtime.closing:
            self.runtime.refuse()
        if name in self.router.subscriptions:
            raise ValueError(f"a subscription named {name!r} already exists")

    def subscribe(
        self,
        event_types: tuple[object, ...],
        handler: object,
        *,
        scope: Scope | None = None,
        **options: Any,
    ) -> SubscriptionRef:
        """A new subscription (``options`` as ``Subscription`` takes and checks them)."""
        partitions = self.cluster_partitions
        if scope is None:
            # System events are the node's own: a subscription to them is in node scope.
            system = all(isinstance(t, type) and is_system(t) for t in event_types)
            scope = "cluster" if partitions is not None and not system else "node"
        if scope == "cluster":
            if partitions is None:
                raise ValueError(
                    "scope='cluster' needs a cluster: Engine('node.db', cluster=RedisStreams(...))"
                )
            if options.get("partitions", 1) != 1 or options.get("key") is not None:
                raise ValueError(
                    "partitions= and key= are refused in cluster scope: its partitions are the "
                    "cluster's, and events keep their order per Event.partition_key()"
                )
            options["partitions"] = partitions
        subscription = Subscription(
            self.routes,
            event_types,
            handler,
            backoff=Backoff(),
            rng=self.runtime.rng,
            scope=scope,
            **options,
        )
        return self.add(subscription)

    def project(
        self, event_types: tuple[object, ...], projector: object, **options: Any
    ) -> SubscriptionRef:
        """A projection (``engine.project``): one partition, in order, the node's own."""
        return self.subscribe(
            event_types,
            projector,
            partitions=1,
            key=None,
            overflow=Overflow.BLOCK,
            projection=True,
            scope="node",  # a projection is the node's own, in any engine
            **options,
        )

    def add(self, subscription: Subscription) -> SubscriptionRef:
        """Register ``subscription``; its actors start now, or with the engine."""
        self.check_new(subscription.name)
        runtime = self.runtime
        names = subscription.names()
        for name in names:
            runtime.check_name_free(name)
        if self.tracking is not None and not subscription.system:
            self.tracking.track(subscription)
        if runtime.running:
            self._start(subscription)
        else:
            runtime.reserve(names, f"subscription {subscription.name!r}")
            self._pending.append(subscription)
        self.router.add(subscription)
        subscription.registry = self
        return subscription.ref

    async def close(self, subscription: Subscription, timeout: float | None) -> None:  # noqa: ASYNC109
        """Unsubscribe (``SubscriptionRef.close``): no more events; its partitions
        drain (up to ``timeout``), then stop; a durable one's positions are stored."""
        if current_cell.get() in subscription.cells:
            raise EngineError(
                f"subscription {subscription.name!r} cannot close itself from its own handler "
                "(it would wait for itself): close it from outside"
            )
        while (closing := subscription.closed) is not None:
            await closing.wait()  # another call closes it
            if subscription.closed is closing:
                return  # and it did; else it failed or was cancelled: try here
        runtime = self.runtime
        pending = subscription in self._pending  # the engine has not started it
        if not pending and (runtime.closing or not runtime.running):
            runtime.refuse()
        subscription.closed = closed = anyio.Event()
        try:
            await self._close(subscription, timeout, pending=pending)
        except BaseException:
            subscription.closed = None  # not closed: closing again does the rest
            raise
        finally:
            closed.set()

    async def _close(
        self,
        subscription: Subscription,
        timeout: float | None,  # noqa: ASYNC109
        *,
        pending: bool,
    ) -> None:
        runtime = self.runtime
        tracking = None if subscription.system else self.tracking
        if pending:
            self._pending.remove(subscription)
            runtime.release(subscription.names())
        elif tracking is not None:
            await tracking.halt(subscription)
        subscription.live = False
        self.router.remove(subscription)
        supervisor = self._supervisors.get(subscription.name)
        if supervisor is not None:
            with anyio.move_on_after(math.inf if timeout is None else timeout) as waited:
                for cell in subscription.cells:
                    await cell.drained()
            # A durable event cut short stays in the outbox ("shutdown"): it comes again.
            reason: DeadLetterReason = "shutdown" if tracking is not None else "stopped"
            await supervisor.terminate(reason, cancel_current=waited.cancelled_caught)
            del self._supervisors[subscription.name]
        if tracking is not None:
            await tracking.retire(subscription)

    def _start(self, subscription: Subscription) -> None:
        runtime = self.runtime
        root = runtime.root
        assert root is not None
        runtime.release(subscription.names())
        supervisor = root.add_supervisor(
            subscription.supervisor_name,
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=3,
            within=5.0,
            backoff=Backoff(),
        )
        factory = self._subscriber(subscription)
        started: list[tuple[Cell, Actor]] = []
        try:
            for partition in subscription.partition_names():
                spec = ChildSpec(
                    factory,
                    partition,
                    subscription.capacity,
                    subscription.overflow,
                    Restart.PERMANENT,
                    subscription.max_attempts,
                )
                started.append(supervisor.add_cell(spec))
        except BaseException:
            # The handler's factory raised: leave nothing registered (and no
            # cell counted busy, which would hold up the shutdown drain).
            for cell, _ in started:
                cell.finalise()
            supervisor.close()
            raise
        self._supervisors[subscription.name] = supervisor
        for cell, instance in started:
            cell.dead_letter_name = subscription.name
            # It holds bare events, which the subscription answers for; only
            # the engine queues into it.
            cell.owner = subscription
            cell.ref = PartitionRef(cell)
            cell.silent = subscription.system
            subscription.cells.append(cell)
            runtime.start_task(cell.run, instance, name=f"subscriber {cell.name}")
        if self.tracking is not None and not subscription.system:
            self.tracking.start(subscription)

    # ------------------------------------------------------------- publishing

    def send(self, event: Event, trace: str | None = None) -> None:
        """Hand an in-memory ``event`` (holding a slot) on.

        With the dispatcher idle (nothing queued before it, nothing in hand) it
        is routed here and now when every mailbox it goes to has room: the same
        order and the same slot, one task hop fewer (``Router.route_now``).
        Otherwise it goes to the dispatcher in a ``Delivery``.
        """
        dispatcher = self.dispatcher
        assert dispatcher is not None
        if dispatcher.idle and self.router.route_now(event, self.routes, trace):
            dispatcher.processed += 1  # routed on its behalf: its count stays "events routed"
            return
        self.dispatch(Delivery(event, self.routes, trace=trace))

    def dispatch(self, delivery: Delivery) -> None:
        """Hand ``delivery`` (holding a slot) to the dispatcher's mailbox."""
        dispatcher = self.dispatcher
        assert dispatcher is not None
        controller = self.controller
        try:
            accepted = dispatcher.offer(delivery)
        except BaseException:
            controller.give_back()
            raise
        if not accepted:  # depth >= the dispatcher's queue, so this means a bug
            controller.give_back()
            raise BackpressureError("the dispatcher mailbox is full")

    async def publish(
        self,
        event: Event,
        timeout: float | None,  # noqa: ASYNC109
        trace: str | None = None,
    ) -> None:
        """Take a slot (waiting while CRITICAL, up to ``timeout``) and send ``event``
        (with a database: commit it to the outbox, whose relay takes the slot);
        ``trace``: the context it carries (engine._tracing)."""
        if self.durable is not None:
            await self.durable.publish(event, timeout, trace)
            return
        controller = self.controller
        if not controller.try_acquire():
            await controller.acquire(timeout)
        self.send(event, trace)

    def try_publish(self, event: Event, trace: str | None = None) -> None:
        if self.durable is not None:
            self.durable.try_publish(event, trace)
            return
        if not self.controller.try_acquire():
            self.refuse_critical()
        self.send(event, trace)

    async def redeliver(self, letter: DeadLetter) -> None:
        """Replay ``letter``: an event to its subscription (or, the relay's, to every
        live one), a projection's through the writer, a message to its actor."""
        subscription = self.router.subscriptions.get(letter.actor)
        durable = subscription is not None or letter.actor == RELAY
        message = letter.message
        if durable and isinstance(message, bytes) and letter.seq is not None:
            try:  # an outbox row whose type was not registered then may be now
                message = decode(message)
            except Exception as exc:
                raise EngineError(
                    f"cannot replay dead letter {letter.id}: its event does not decode ({exc})"
                ) from exc
        if durable and isinstance(message, Event):
            self.runtime.check_publishing()
            if subscription is not None and subscription.projector is not None:
                assert self.tracking is not None
                await self.tracking.replay_projection(subscription, message, letter)
                return
            await self.controller.acquire(None)
            self.dispatch(Delivery(message, self.routes, subscription))
            return
        cell = self.runtime.cell(letter.actor)
        if cell is None:
            raise ActorStopped(f"cannot replay dead letter {letter.id}: no actor {letter.actor!r}")
        await cell.ref.tell(letter.message)

    def emit(self, event: SystemEvent) -> None:
        """Hand a system event to every subscription that takes it (``engine._system``):
        no slot; a full mailbox loses its oldest system event, counted."""
        subscriptions = self.router.route(type(event))
        for subscription in subscriptions:
            try:
                cell = subscription.pick(event)
            except Exception:  # its key function failed: as if its mailbox were full
                self._dropped_system_event(subscription)
                continue
            if cell.closed:  # stopped (during the drain its mailbox still takes them)
                self._dropped_system_event(subscription)
                continue
            queue = cell.queue
            if len(queue) >= cell.capacity:
                queue.popleft()  # a system event too: its subscription takes no other
                self._dropped_system_event(subscription)
            delivery = Delivery(event, self.free_routes)
            delivery.routed = True  # handed to this partition: its dead letter is this one's
            cell.enqueue(delivery)

    def _dropped_system_event(self, subscription: Subscription) -> None:
        self.system_events_dropped += 1
        if self.system_events_dropped % 1000 == 1 and not self.runtime.closing:
            logger.warning(
                "system events subscription %r lags: %d system events dropped so far",
                subscription.name,
                self.system_events_dropped,
                extra={"subscriber": subscription.name},
            )

    def unsettled(self) -> str | None:
        """What keeps the bus from idle (``engine.idle``): events in flight, or None."""
        depth = self.controller.depth
        return f"{depth} events in flight" if depth else None

    def refuse_critical(self) -> NoReturn:
        controller = self.controller
        controller.reject()
        raise BackpressureError(
            f"engine is CRITICAL: {controller.depth} of {self.config.max_depth} events in flight"
        )

    def metrics(self) -> BackpressureMetrics:
        return self.controller.metrics()
