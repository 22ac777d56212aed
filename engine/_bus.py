"""The event bus: subscriptions and their actors, the dispatcher, the in-flight budget.

In memory ``publish`` takes a backpressure slot and hands the event to the
dispatcher actor, which hands it to the mailbox of each matching
subscription's partition. With a database the outbox (``_durable``) feeds the
same dispatcher after each commit; the bus asks it, through ``Tracking``, to
follow a durable subscription's positions and to start its catch-up.
"""

from __future__ import annotations

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
from ._supervision import ChildSpec, Supervisor
from ._types import Backoff, DeadLetterReason, Overflow, Restart, Strategy

__all__ = ["DISPATCHER", "RELAY", "EventBus", "Tracking"]

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
        """It is closing: end its catch-up (``EngineError`` where closing is not supported)."""

    async def retire(self, subscription: Subscription) -> None:
        """Its actors stopped: store the positions it reached and stop following it."""


class EventBus:
    """Publishing, dispatching and the lifecycle of subscriptions."""

    def __init__(
        self,
        runtime: Runtime,
        config: BackpressureConfig,
        dead_letters: DeadLetterRecorder,
        subscriber: Callable[[Subscription], Callable[[], Actor]],
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
        self.dispatcher: Cell | None = None
        self.tracking: Tracking | None = None
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

    def registered(self, name: str) -> bool:
        """A subscription (or projection) called ``name`` is registered here."""
        return name in self.router.subscriptions

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
            scope = "cluster" if partitions is not None else "node"
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

    def add(self, subscription: Subscription) -> SubscriptionRef:
        """Register ``subscription``; its actors start now, or with the engine."""
        self.check_new(subscription.name)
        runtime = self.runtime
        names = subscription.names()
        for name in names:
            runtime.check_name_free(name)
        if self.tracking is not None:
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
        if subscription.closed:
            return
        runtime = self.runtime
        if current_cell.get() in subscription.cells:
            raise EngineError(
                f"subscription {subscription.name!r} cannot close itself from its own handler "
                "(it would wait for itself): close it from outside"
            )
        tracking = self.tracking
        if subscription in self._pending:  # the engine has not started it
            self._pending.remove(subscription)
            runtime.release(subscription.names())
        elif runtime.closing or not runtime.running:
            runtime.refuse()
        elif tracking is not None:
            await tracking.halt(subscription)
        subscription.closed = True
        subscription.live = False
        self.router.remove(subscription)
        supervisor = self._supervisors.pop(subscription.name, None)
        if supervisor is not None:
            with anyio.move_on_after(math.inf if timeout is None else timeout) as waited:
                for cell in subscription.cells:
                    await cell.drained()
            # A durable event cut short stays in the outbox ("shutdown"): it comes again.
            reason: DeadLetterReason = "shutdown" if tracking is not None else "stopped"
            await supervisor.terminate(reason, cancel_current=waited.cancelled_caught)
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
            subscription.cells.append(cell)
            runtime.start_task(cell.run, instance, name=f"subscriber {cell.name}")
        if self.tracking is not None:
            self.tracking.start(subscription)

    # ------------------------------------------------------------- publishing

    def send(self, event: Event) -> None:
        """Hand an in-memory ``event`` (holding a slot) on.

        With the dispatcher idle (nothing queued before it, nothing in hand) it
        is routed here and now when every mailbox it goes to has room: the same
        order and the same slot, one task hop fewer (``Router.route_now``).
        Otherwise it goes to the dispatcher in a ``Delivery``.
        """
        dispatcher = self.dispatcher
        assert dispatcher is not None
        if dispatcher.idle and self.router.route_now(event, self.routes):
            dispatcher.processed += 1  # routed on its behalf: its count stays "events routed"
            return
        self.dispatch(Delivery(event, self.routes))

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

    async def publish(self, event: Event, timeout: float | None) -> None:  # noqa: ASYNC109
        """Take a slot (waiting while CRITICAL, up to ``timeout``) and send ``event``."""
        controller = self.controller
        if not controller.try_acquire():
            await controller.acquire(timeout)
        self.send(event)

    def try_publish(self, event: Event) -> None:
        if not self.controller.try_acquire():
            self.refuse_critical()
        self.send(event)

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
