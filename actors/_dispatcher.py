"""The dispatcher actor, subscriptions and their handler actors."""

from __future__ import annotations

import inspect
import logging
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from engine._actor import Actor, ActorRef, Cell, Tracked
from engine._backpressure import BackpressureController
from engine._cancel import as_failure
from engine._deadletters import DeadLetterReason
from engine._errors import ActorStopped, MailboxFull
from engine._events import Event
from engine._types import ActorStatistics, Backoff, Overflow

if TYPE_CHECKING:
    from engine._engine import Engine

__all__ = ["Delivery", "Dispatcher", "Router", "Subscription", "SubscriptionRef"]

logger = logging.getLogger("actorbus.dispatcher")

EventHandler = Callable[[Any], Awaitable[None]]


def stable_hash(key: object) -> int:
    """A hash that is the same in every process (``hash(str)`` is salted per process)."""
    if isinstance(key, bool):
        return int(key)
    if isinstance(key, int):
        return key
    if isinstance(key, UUID):
        return key.int
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return zlib.crc32(key)
    return zlib.crc32(repr(key).encode("utf-8", "backslashreplace"))


class Delivery(Tracked):
    """One published event on its way to every matching subscription.

    It holds one backpressure slot, released when the last subscription
    finished it or dead-lettered it — exactly once on every path.
    """

    __slots__ = (
        "controller",
        "event",
        "remaining",
        "routed",
        "seq",
        "subscription",
        "undelivered",
    )

    def __init__(
        self,
        event: Event,
        controller: BackpressureController | Any,
        subscription: Subscription | None = None,
        seq: int | None = None,
    ) -> None:
        self.event = event
        self.controller = controller
        # The outbox position of a durable event (None in memory and for replays).
        self.seq = seq
        self.remaining = 1
        self.routed = False
        # While the dispatcher waits to hand it on: the subscriptions still without it.
        self.undelivered: tuple[Subscription, ...] = ()
        # Set for a replay: only this subscription gets it.
        self.subscription = subscription

    def done(self) -> None:
        self.remaining -= 1
        if not self.remaining:
            self.controller.release()

    def finish(self, cell: Cell) -> None:
        """The subscription partition ``cell`` is finished with this event."""
        track = cell.track
        if track is not None and self.seq is not None:
            track.finish(self.seq)
        self.done()

    def dead_letter(
        self, cell: Cell, reason: DeadLetterReason, error: BaseException | None, attempts: int
    ) -> None:
        engine = cell.engine
        # This holder's shares of the slot: one, or (the dispatcher stopped
        # while handing it on) one per subscription still without it.
        stopped_routing = self.routed and cell is engine._dispatcher
        shares = len(self.undelivered) if stopped_routing else 1
        if reason == "shutdown" and self.seq is not None:
            # A durable event cut short by shutdown stays in the outbox and its
            # subscribers' positions stay before it: the next run delivers it.
            # Only this holder's shares go back: the others give back their own.
            for _ in range(shares):
                self.done()
            return
        if not self.routed:
            # Still in the dispatcher's mailbox (one share): each subscription
            # it was bound for records it under its own name.
            if self.subscription is not None:
                names = [self.subscription.name]
            else:
                names = [s.name for s in engine._router.route(type(self.event))]
        elif stopped_routing:
            names = [s.name for s in self.undelivered]
        else:
            names = [cell.dead_letter_name]
        track = cell.track
        seq = self.seq
        waiting = len(names)

        def recorded() -> None:
            # With a database, after the rows committed: a durable position
            # never passes an event whose dead letter is not stored.
            nonlocal waiting
            waiting -= 1
            if waiting > 0:
                return
            if track is not None and seq is not None:
                track.finish(seq)
            for _ in range(shares):
                self.done()

        if not names:
            waiting = 1
            recorded()
        for name in names:
            engine.dead_letters.add(
                name, self.event, reason, error=error, attempts=attempts, seq=seq, then=recorded
            )


class Subscription:
    """A named subscription: its event types, its partition actors, its policy."""

    def __init__(
        self,
        engine: Engine,
        event_types: tuple[type[Event], ...],
        handler: EventHandler | Callable[[], Actor],
        *,
        name: str,
        capacity: int,
        partitions: int,
        key: Callable[[Any], object] | None,
        overflow: Overflow,
        max_attempts: int,
        backoff: Backoff,
    ) -> None:
        self.engine = engine
        self.event_types = event_types
        self.handler = handler
        self.name = name
        self.capacity = capacity
        self.key = key
        self.overflow = overflow
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.is_function = is_async_function(handler)
        self.cells: list[Cell] = []
        # Routed by the dispatcher; a durable subscription goes live once it caught up.
        self.live = True
        # A durable subscription's positions (set by the engine when it has a database).
        self.tracker: Any = None
        self.projector: Callable[[Any, Any], Any] | None = None
        self.partition_count = partitions
        self.ref = SubscriptionRef(self)

    def matches(self, event_type: type) -> bool:
        return issubclass(event_type, self.event_types)

    def partition_names(self) -> list[str]:
        if self.partition_count == 1:
            return [self.name]
        return [f"{self.name}#{i}" for i in range(self.partition_count)]

    def factory(self) -> Callable[[], Actor]:
        if self.projector is not None:
            from ._relay import ProjectionSubscriber

            return lambda: ProjectionSubscriber(self)
        if self.is_function:
            handler = self.handler
            return lambda: FunctionSubscriber(self, handler)  # type: ignore[arg-type]
        factory = self.handler
        return lambda: ActorSubscriber(factory)  # type: ignore[arg-type]

    def pick(self, event: Event) -> Cell:
        cells = self.cells
        if len(cells) == 1:
            return cells[0]
        key = self.key(event) if self.key is not None else event.id
        return cells[stable_hash(key) % len(cells)]

    async def deliver(self, delivery: Delivery) -> None:
        """Hand ``delivery`` to the right partition; failures become dead letters."""
        try:
            cell = self.pick(delivery.event)
        except Exception as exc:
            # The key function raised: this subscription cannot place the event.
            self.refuse(delivery, "failed", exc)
            return
        await self.deliver_to(cell, delivery)

    async def deliver_to(self, cell: Cell, delivery: Delivery) -> None:
        track = cell.track
        if track is not None and delivery.seq is not None:
            track.sent(delivery.seq)
        try:
            if not cell.offer(delivery):
                await cell.put(delivery)
        except MailboxFull as exc:
            self.refuse(delivery, "dropped", exc, cell)
        except ActorStopped as exc:
            self.refuse(delivery, "shutdown" if self.engine._closing else "stopped", exc, cell)

    def refuse(
        self,
        delivery: Delivery,
        reason: DeadLetterReason,
        error: Exception,
        cell: Cell | None = None,
    ) -> None:
        """Dead-letter ``delivery`` for this subscription and give back its share
        (with a database once the dead letter is stored)."""
        seq = delivery.seq
        if reason == "shutdown" and seq is not None:
            delivery.done()  # durable: the next run delivers it (see Delivery.dead_letter)
            return
        if cell is None and seq is not None and self.cells and self.cells[0].track is not None:
            # No partition took it (its key failed): the first one holds its
            # position before the event until the dead letter is stored.
            cell = self.cells[0]
            cell.track.sent(seq)
        finish = delivery.done if cell is None else partial(delivery.finish, cell)
        self.engine.dead_letters.add(
            self.name, delivery.event, reason, error=error, seq=seq, then=finish
        )


class SubscriptionRef:
    """Handle to a subscription: its name, partition refs and statistics."""

    __slots__ = ("_subscription",)

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription

    @property
    def name(self) -> str:
        return self._subscription.name

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return self._subscription.event_types

    @property
    def partitions(self) -> list[ActorRef[Any]]:
        """The handler actors, one per partition."""
        return [cell.ref for cell in self._subscription.cells]

    def statistics(self) -> list[ActorStatistics]:
        return [cell.statistics() for cell in self._subscription.cells]

    def __repr__(self) -> str:
        types = ", ".join(t.__name__ for t in self.event_types)
        return f"<SubscriptionRef {self.name!r} ({types}) x{len(self._subscription.cells)}>"


def is_async_function(handler: object) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
    )


class FunctionSubscriber(Actor):
    """Runs a stateless async handler.

    A failing call is retried with backoff, then dead-lettered: no restart is needed.
    """

    def __init__(self, subscription: Subscription, handler: EventHandler) -> None:
        self.subscription = subscription
        self.handler = handler

    async def receive(self, message: Delivery) -> None:
        event = message.event
        try:
            await self.handler(event)
        except BaseException as exc:
            # A stray CancelledError is a failed call too; a real cancellation goes on up.
            error = as_failure(exc)
            if error is None:
                raise
            await self._retry(message, error)
            return
        cell = self._actorbus_cell
        assert cell is not None
        message.finish(cell)

    async def _retry(self, delivery: Delivery, error: Exception) -> None:
        sub = self.subscription
        attempts = 1
        while attempts < sub.max_attempts:
            await anyio.sleep(sub.backoff.delay(attempts, sub.engine._rng))
            attempts += 1
            try:
                await self.handler(delivery.event)
            except BaseException as exc:
                failure = as_failure(exc)
                if failure is None:
                    raise
                error = failure
                continue
            cell = self._actorbus_cell
            assert cell is not None
            delivery.finish(cell)
            return
        cell = self._actorbus_cell
        assert cell is not None
        cell.failed += attempts
        delivery.dead_letter(cell, "failed", error, attempts)


class ActorSubscriber(Actor):
    """Wraps a user's Actor so that it receives the event and its delivery is tracked."""

    def __init__(self, factory: Callable[[], Actor]) -> None:
        inner = factory()
        if not isinstance(inner, Actor):
            raise TypeError(
                f"subscription handler factory must return an Actor, got {type(inner).__name__}"
            )
        self.inner = inner

    async def on_start(self) -> None:
        self.inner._actorbus_cell = self._actorbus_cell
        await self.inner.on_start()

    async def on_stop(self) -> None:
        await self.inner.on_stop()

    async def on_restart(self, error: BaseException) -> None:
        self.inner._actorbus_cell = self._actorbus_cell
        await self.inner.on_restart(error)

    async def receive(self, message: Delivery) -> Any:
        result = await self.inner.receive(message.event)
        cell = self._actorbus_cell
        assert cell is not None
        message.finish(cell)
        return result


class Router:
    """Which subscriptions take which event type; cached per concrete type."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self._routes: dict[type, tuple[Subscription, ...]] = {}

    def add(self, subscription: Subscription) -> None:
        self.subscriptions[subscription.name] = subscription
        self._routes.clear()

    def changed(self) -> None:
        """A subscription went live: routes are worked out again."""
        self._routes.clear()

    def remove(self, subscription: Subscription) -> None:
        self.subscriptions.pop(subscription.name, None)
        self._routes.clear()

    def route(self, event_type: type) -> tuple[Subscription, ...]:
        try:
            return self._routes[event_type]
        except KeyError:
            routes = tuple(
                s for s in self.subscriptions.values() if s.live and s.matches(event_type)
            )
            self._routes[event_type] = routes
            return routes


class Dispatcher(Actor):
    """The single entry for events: routes each to every matching subscription.

    Delivery into a partition's mailbox takes the non-waiting path; only a
    full BLOCK mailbox makes the dispatcher wait, which holds the depth up and
    so slows publishers (backpressure) without reordering anything.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    async def receive(self, message: Delivery) -> None:
        message.routed = True
        if message.seq is not None:
            await self._route_durable(message)
            return
        target = message.subscription
        if target is not None:
            message.undelivered = (target,)
            await target.deliver(message)
            return
        event = message.event
        subscriptions = self.router.route(type(event))
        if not subscriptions:
            message.done()
            return
        message.remaining = len(subscriptions)
        for index, subscription in enumerate(subscriptions):
            try:
                cell = subscription.pick(event)
            except Exception as exc:
                subscription.refuse(message, "failed", exc)
                continue
            queue = cell.queue
            # The common case inline (as in ActorRef.try_tell): a mailbox with room.
            if cell.open and len(queue) < cell.capacity:
                queue.append(message)
                if len(queue) > cell.peak:
                    cell.peak = len(queue)
                if cell.wakeup is not None:
                    cell.wake()
                continue
            message.undelivered = subscriptions[index:]
            await subscription.deliver_to(cell, message)

    async def _route_durable(self, message: Delivery) -> None:
        """Route an outbox event: only to live subscriptions that have not had it yet.

        A subscription that just caught up from the outbox may already have
        handled an event still queued here; its tracker's cursor says so.
        """
        cell = self._actorbus_cell
        assert cell is not None
        engine = cell.engine
        try:
            await self._route_outbox_event(message, engine)
        finally:
            engine._routing -= 1

    async def _route_outbox_event(self, message: Delivery, engine: Engine) -> None:
        event = message.event
        seq = message.seq
        assert seq is not None
        if event is None:  # an outbox row the relay dead-lettered: only the position moves
            message.done()
            if seq > engine._dispatched:
                engine._dispatched = seq
            return
        subscriptions = tuple(
            s for s in self.router.route(type(event)) if s.tracker is None or seq > s.tracker.cursor
        )
        if not subscriptions:
            message.done()
        else:
            message.remaining = len(subscriptions)
            for index, subscription in enumerate(subscriptions):
                if subscription.tracker is not None:
                    subscription.tracker.cursor = seq
                message.undelivered = subscriptions[index:]
                await subscription.deliver(message)
        if seq > engine._dispatched:
            engine._dispatched = seq
