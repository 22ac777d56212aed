"""Routing: subscriptions, their partitions, the router, and one event's delivery.

An event goes to a partition's mailbox in one of two forms:

- **bare**: an in-memory event routed in the publisher's call to exactly one
  mailbox is queued as itself. It holds one backpressure slot, which the
  partition gives back once it finished the event or dead-lettered it (the
  subscription answers for it: ``Subscription.finished`` and, as the cell's
  ``Owner``, ``Subscription.dead_letter``). No object is made per event.
- **in a ``Delivery``**: every other event (several mailboxes, an outbox or
  stream position, a replay, one routed by the dispatcher actor). The delivery
  holds the slot until the last subscription finished it or dead-lettered it.

What a delivery needs of the rest of the engine (the router, the dispatcher's
cell, the dead letters, the slot's release) comes through one ``Routes``
object, shared by all deliveries of an engine. A partition's ref refuses
messages from anyone but the engine (``PartitionRef``): everything in its
mailbox is an event the engine counted.
"""

from __future__ import annotations

import inspect
import random
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal, Protocol
from uuid import UUID

import anyio

from ._actor import Actor, ActorRef, Cell, Tracked
from ._errors import ActorStopped, MailboxFull
from ._events import Event
from ._supervision import check_name
from ._system import is_system
from ._types import (
    ActorStatistics,
    Backoff,
    DeadLetterReason,
    Overflow,
    check_enum,
    check_int,
    check_timeout,
)

__all__ = [
    "DeadLetterRecorder",
    "Delivery",
    "OutboxRoutes",
    "PartitionRef",
    "Router",
    "Routes",
    "Subscription",
    "SubscriptionRef",
    "SubscriptionRegistry",
    "is_async_function",
    "stable_hash",
]

EventHandler = Callable[[Any], Awaitable[None]]
Projector = Callable[[Any, Any], Any]
Scope = Literal["node", "cluster"]


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


def is_async_function(handler: object) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
    )


class DeadLetterRecorder(Protocol):
    """``DeadLetters.add``: records, then calls ``then`` (with a database once stored)."""

    def add(
        self,
        actor: str,
        message: Any,
        reason: DeadLetterReason,
        *,
        error: BaseException | None = ...,
        attempts: int = ...,
        seq: int | None = ...,
        event_type: str | None = ...,
        entry: str | None = ...,
        then: Callable[[], None] | None = ...,
    ) -> None: ...


class SubscriptionRegistry(Protocol):
    """Where a subscription is registered (the event bus): ``SubscriptionRef.close``."""

    async def close(self, subscription: Subscription, timeout: float | None) -> None: ...  # noqa: ASYNC109


class OutboxRoutes(Protocol):
    """How the dispatcher routes an event that came from the outbox (``Outbox.route``)."""

    async def route(self, delivery: Delivery) -> None: ...


class Routes:
    """What every delivery of one engine shares: where dead letters go, how its
    slot is given back, the router and the dispatcher's cell."""

    __slots__ = ("closing", "dead_letters", "dispatcher", "release", "router")

    def __init__(
        self,
        router: Router,
        dead_letters: DeadLetterRecorder,
        release: Callable[[], None],
        closing: Callable[[], bool],
    ) -> None:
        self.router = router
        self.dead_letters = dead_letters
        # The slot's release (a no-op for deliveries that hold none: catch-up reads).
        self.release = release
        self.closing = closing
        self.dispatcher: Cell | None = None

    def without_slot(self) -> Routes:
        """The same routes for deliveries that take no backpressure slot."""
        routes = Routes(self.router, self.dead_letters, _no_slot, self.closing)
        routes.dispatcher = self.dispatcher
        return routes


def _no_slot() -> None:
    pass


class Delivery(Tracked):
    """One published event on its way to every matching subscription.

    It holds one backpressure slot, released when the last subscription
    finished it or dead-lettered it — exactly once on every path.
    """

    __slots__ = (
        "cut_short",
        "entry",
        "event",
        "remaining",
        "routed",
        "routes",
        "seq",
        "subscription",
        "trace",
        "undelivered",
    )

    def __init__(
        self,
        event: Event,
        routes: Routes,
        subscription: Subscription | None = None,
        seq: int | None = None,
        entry: str | None = None,
        trace: str | None = None,
    ) -> None:
        self.event = event
        self.routes = routes
        # The trace context current when it was published (engine._tracing), or None.
        self.trace = trace
        # The outbox position of a durable event (None in memory and for replays).
        self.seq = seq
        # The stream entry id of an event read from a cluster stream.
        self.entry = entry
        # Stopped by the engine's shutdown before it was handled: it comes again.
        self.cut_short = False
        self.remaining = 1
        self.routed = False
        # While the dispatcher waits to hand it on: the subscriptions still without it.
        self.undelivered: tuple[Subscription, ...] = ()
        # Set for a replay: only this subscription gets it.
        self.subscription = subscription

    def done(self) -> None:
        self.remaining -= 1
        if not self.remaining:
            self.routes.release()

    def finish(self, cell: Cell) -> None:
        """The subscription partition ``cell`` is finished with this event."""
        track = cell.track
        if track is not None and self.seq is not None:
            track.finish(self.seq)
        self.done()

    def dead_letter(
        self, cell: Cell, reason: DeadLetterReason, error: BaseException | None, attempts: int
    ) -> None:
        routes = self.routes
        # This holder's shares of the slot: one, or (the dispatcher stopped
        # while handing it on) one per subscription still without it.
        stopped_routing = self.routed and cell is routes.dispatcher
        shares = len(self.undelivered) if stopped_routing else 1
        if reason == "shutdown" and (self.seq is not None or self.entry is not None):
            # A durable event cut short by shutdown stays in the outbox (or its
            # stream) and its subscribers' positions stay before it: the next run
            # delivers it. Only this holder's shares go back: others give back theirs.
            self.cut_short = True
            for _ in range(shares):
                self.done()
            return
        if not self.routed:
            # Still in the dispatcher's mailbox (one share): each subscription
            # it was bound for records it under its own name.
            if self.subscription is not None:
                names = [self.subscription.name]
            else:
                names = [s.name for s in routes.router.route(type(self.event))]
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
            routes.dead_letters.add(
                name,
                self.event,
                reason,
                error=error,
                attempts=attempts,
                seq=seq,
                entry=self.entry,
                then=recorded,
            )


class Subscription:
    """A named subscription: its event types, its partition actors, its policy.

    It checks its own configuration (the arguments of ``subscribe`` and ``project``).
    """

    def __init__(
        self,
        routes: Routes,
        event_types: tuple[object, ...],
        handler: object,
        *,
        name: str,
        capacity: int,
        partitions: int,
        key: Callable[[Any], object] | None,
        overflow: Overflow,
        max_attempts: int,
        backoff: Backoff,
        rng: random.Random,
        projection: bool = False,
        scope: Scope = "node",
    ) -> None:
        verb = "project" if projection else "subscribe"
        if scope not in ("node", "cluster"):
            raise ValueError(f"scope must be 'cluster' or 'node', got {scope!r}")
        self.event_types = check_event_types(event_types, verb)
        # Takes the engine's own events (engine._system), and only those.
        self.system = check_system_types(self.event_types, projection=projection, scope=scope)
        if projection:
            if not callable(handler) or inspect.iscoroutinefunction(handler):
                raise TypeError(
                    "projector must be a plain function `def projector(tx, event)` (it runs in "
                    f"the database thread), got {handler!r}"
                )
        elif not callable(handler) or not (is_async_function(handler) or is_actor_factory(handler)):
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
        self.routes = routes
        self.scope = scope
        self.handler: Any = handler
        self.name = name
        self.capacity = capacity
        self.key = key
        self.overflow = overflow
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.rng = rng
        self.is_function = not projection and is_async_function(handler)
        self.cells: list[Cell] = []
        # Routed by the dispatcher; a durable subscription goes live once it caught up.
        self.live = True
        # A projection: ``handler`` is ``projector(tx, event)``, run in the writer.
        self.projector: Projector | None = handler if projection else None
        self.partition_count = partitions
        # Set by the bus that registers it; ``closed`` once ``close`` began (set when it ended).
        self.registry: SubscriptionRegistry | None = None
        self.closed: anyio.Event | None = None
        self.ref = SubscriptionRef(self)

    @property
    def kind(self) -> str:
        """How ``tracking`` records it: ``projection`` or ``subscription``."""
        return "projection" if self.projector is not None else "subscription"

    @property
    def supervisor_name(self) -> str:
        """The name of the supervisor of its partition actors."""
        return f"subscription:{self.name}"

    def matches(self, event_type: type) -> bool:
        # System events go to system event subscriptions only (not to Event's).
        return issubclass(event_type, self.event_types) and (
            self.system or not is_system(event_type)
        )

    def partition_names(self) -> list[str]:
        if self.partition_count == 1:
            return [self.name]
        return [f"{self.name}#{i}" for i in range(self.partition_count)]

    def names(self) -> list[str]:
        """Every name it takes in the engine: its supervisor's and its partitions'."""
        return [self.supervisor_name, *self.partition_names()]

    def index(self, event: Event) -> int:
        """The partition that takes ``event`` (its key's stable hash; the id without a key)."""
        count = len(self.cells)
        if count == 1:
            return 0
        key = self.key(event) if self.key is not None else event.id
        return stable_hash(key) % count

    def pick(self, event: Event) -> Cell:
        cells = self.cells
        if len(cells) == 1:
            return cells[0]
        return cells[self.index(event)]

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
            reason: DeadLetterReason = "shutdown" if self.routes.closing() else "stopped"
            self.refuse(delivery, reason, exc, cell)

    def finished(self, cell: Cell, item: Delivery | Event) -> None:
        """The partition ``cell`` is finished with ``item``: a delivery, or a bare event."""
        if type(item) is Delivery:
            item.finish(cell)
        else:
            self.routes.release()

    def dead_letter(
        self,
        cell: Cell,
        message: Any,
        reason: DeadLetterReason,
        error: BaseException | None,
        attempts: int,
    ) -> None:
        """A bare event its partition ``cell`` cannot deliver (as the cell's ``Owner``):
        recorded under the subscription's name, then its slot goes back."""
        routes = self.routes
        routes.dead_letters.add(
            self.name, message, reason, error=error, attempts=attempts, then=routes.release
        )

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
        if reason == "shutdown" and (seq is not None or delivery.entry is not None):
            delivery.cut_short = True
            delivery.done()  # durable: the next run delivers it (see Delivery.dead_letter)
            return
        if cell is None and seq is not None and self.cells:
            track = self.cells[0].track
            if track is not None:
                # No partition took it (its key failed): the first one holds its
                # position before the event until the dead letter is stored.
                cell = self.cells[0]
                track.sent(seq)
        finish = delivery.done if cell is None else partial(delivery.finish, cell)
        self.routes.dead_letters.add(
            self.name,
            delivery.event,
            reason,
            error=error,
            seq=seq,
            entry=delivery.entry,
            then=finish,
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

    @property
    def live(self) -> bool:
        """It takes newly published events (a durable one: once it caught up)."""
        return self._subscription.live

    @property
    def closed(self) -> bool:
        """``close`` was called: it takes no more events."""
        return self._subscription.closed is not None

    async def close(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Unsubscribe: take no more events, let the partitions handle what their
        mailboxes hold, then stop them (``on_stop`` runs) and free the name.

        A durable subscription keeps its stored position: subscribing again under
        its name (in this engine or the next) resumes after it, and
        ``engine.forget(name)`` drops it. After ``timeout`` seconds what is left
        is cut short: the handler in progress is cancelled and queued events are
        dead-lettered (reason ``stopped``), or, durable, stay in the outbox (or the
        cluster's streams) to come again. In a cluster a cluster-scope subscription
        hands its partitions on to the other nodes that run it. Closing again does
        nothing. Refused from the subscription's own handler (it would wait for itself).
        """
        check_timeout(timeout, "timeout")
        subscription = self._subscription
        registry = subscription.registry
        assert registry is not None, "a SubscriptionRef comes from a bus that registered it"
        await registry.close(subscription, timeout)

    def statistics(self) -> list[ActorStatistics]:
        return [cell.statistics() for cell in self._subscription.cells]

    def __repr__(self) -> str:
        types = ", ".join(t.__name__ for t in self.event_types)
        return f"<SubscriptionRef {self.name!r} ({types}) x{len(self._subscription.cells)}>"


class PartitionRef(ActorRef[Any]):
    """A subscription partition's ref: it takes events from the engine only.

    Its mailbox holds events the engine counted (each holds a backpressure
    slot), so a message told from outside is refused: publish the event instead.
    """

    __slots__ = ()

    def _refuse(self, message: object) -> TypeError:
        return TypeError(
            f"actor {self.name!r} is a subscription partition: it takes events through "
            f"engine.publish, not a {type(message).__name__} told to it"
        )

    def try_tell(self, message: Any) -> None:
        raise self._refuse(message)

    async def tell(self, message: Any) -> None:
        raise self._refuse(message)

    async def ask(self, message: Any, *, timeout: float | None = 5.0) -> Any:  # noqa: ASYNC109
        raise self._refuse(message)


class Router:
    """Which subscriptions take which event type; cached per concrete type."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self._routes: dict[type, tuple[Subscription, ...]] = {}

    def add(self, subscription: Subscription) -> None:
        self.subscriptions[subscription.name] = subscription
        self._routes.clear()

    def remove(self, subscription: Subscription) -> None:
        """It takes no more events (it is closing)."""
        if self.subscriptions.get(subscription.name) is subscription:
            del self.subscriptions[subscription.name]
        self._routes.clear()

    def changed(self) -> None:
        """A subscription went live: routes are worked out again."""
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

    def route_now(self, event: Event, routes: Routes, trace: str | None = None) -> bool:
        """Route an in-memory ``event`` (holding a slot) without waiting, as the dispatcher would.

        Only when every matching subscription's partition has room in its mailbox
        (and its key function answers): then each takes it now and this returns
        True. Otherwise nothing is queued and it returns False: the dispatcher
        does it, waiting where it must. An event bound for one mailbox goes
        there bare; for several, or with a ``trace`` to carry, in one ``Delivery``.
        """
        try:
            subscriptions = self._routes[type(event)]
        except KeyError:
            subscriptions = self.route(type(event))
        if len(subscriptions) == 1:
            # The common case, inline: this is the cost of every publish.
            subscription = subscriptions[0]
            cells = subscription.cells
            if len(cells) == 1:
                cell = cells[0]
            else:
                try:
                    cell = cells[subscription.index(event)]
                except Exception:
                    return False  # the dispatcher dead-letters it for that subscription
            if not cell.has_room():
                return False
            if trace is None:
                cell.enqueue(event)
            else:
                traced = Delivery(event, routes, trace=trace)
                traced.routed = True
                cell.enqueue(traced)
            return True
        if not subscriptions:
            routes.release()
            return True
        picked: list[Cell] = []
        for subscription in subscriptions:
            try:
                cell = subscription.pick(event)
            except Exception:
                return False
            if not cell.has_room():
                return False
            picked.append(cell)
        delivery = Delivery(event, routes, trace=trace)
        delivery.routed = True
        delivery.remaining = len(picked)
        for cell in picked:
            cell.enqueue(delivery)
        return True


def check_event_types(event_types: tuple[object, ...], verb: str) -> tuple[type[Event], ...]:
    """``event_types`` of ``subscribe``/``project``: at least one, each an Event subclass."""
    if not event_types:
        raise ValueError(f"{verb} needs at least one event type (Event receives all)")
    for event_type in event_types:
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise TypeError(f"event types must be Event subclasses, got {event_type!r}")
    return event_types  # type: ignore[return-value]


def check_system_types(
    event_types: tuple[type[Event], ...], *, projection: bool, scope: Scope
) -> bool:
    """Whether a subscription takes system events; refuses one that mixes them with
    other events, a projection of them and a cluster-scope one (they are the node's own)."""
    system = [is_system(event_type) for event_type in event_types]
    if not any(system):
        return False
    if not all(system):
        raise ValueError(
            "system events (engine.SystemEvent and its subclasses) take a subscription of "
            "their own: do not mix them with other events"
        )
    if projection:
        raise ValueError("system events are in memory only: they cannot be projected")
    if scope == "cluster":
        raise ValueError("system events are this node's own: subscribe to them in scope='node'")
    return True


def is_actor_factory(handler: object) -> bool:
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
