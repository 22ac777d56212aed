"""The dispatcher actor and the actors that run a subscription's handler."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from engine._actor import Actor, bind
from engine._cancel import as_failure
from engine._events import Event
from engine._routing import Delivery, OutboxRoutes, Router, Subscription
from engine._tracing import Tracing, finish_span

__all__ = ["ActorSubscriber", "Dispatcher", "FunctionSubscriber"]

logger = logging.getLogger("actorbus.dispatcher")

EventHandler = Callable[[Any], Awaitable[None]]


class Dispatcher(Actor):
    """The single entry for events: routes each to every matching subscription.

    Delivery into a partition's mailbox takes the non-waiting path; only a
    full BLOCK mailbox makes the dispatcher wait, which holds the depth up and
    so slows publishers (backpressure) without reordering anything. Events
    from the outbox are routed by the outbox's rules (``outbox.route``).
    """

    def __init__(self, router: Router, outbox: OutboxRoutes | None = None) -> None:
        self.router = router
        self.outbox = outbox

    async def receive(self, message: Delivery) -> None:
        message.routed = True
        if message.seq is not None:
            assert self.outbox is not None
            await self.outbox.route(message)
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
            # The common case inline (as in ActorRef.try_tell): a mailbox with
            # room. A deliberate copy of Cell.has_room and Cell.enqueue: this
            # loop is the cost of every delivery.
            if cell.open and len(queue) < cell.capacity:
                queue.append(message)
                if len(queue) > cell.peak:
                    cell.peak = len(queue)
                if cell.wakeup is not None:
                    cell.wake()
                continue
            message.undelivered = subscriptions[index:]
            await subscription.deliver_to(cell, message)


class FunctionSubscriber(Actor):
    """Runs a stateless async handler.

    A failing call is retried with backoff, then dead-lettered: no restart is
    needed. A message is a ``Delivery`` or a bare event (see ``engine._routing``).
    """

    def __init__(self, subscription: Subscription, handler: EventHandler, tracing: Tracing) -> None:
        self.subscription = subscription
        self.handler = handler
        self.finished = subscription.finished
        self.tracing = tracing

    async def receive(self, message: Delivery | Event) -> None:
        event: Any
        if type(message) is Delivery:
            if self.tracing.on:
                await self._traced(message)
                return
            event = message.event
        else:
            event = message
        try:
            await self.handler(event)
        except BaseException as exc:
            # A stray CancelledError is a failed call too; a real cancellation goes on up.
            error = as_failure(exc)
            if error is None:
                raise
            await self._retry(message, event, error)
            return
        cell = self._actorbus_cell
        assert cell is not None
        self.finished(cell, message)

    async def _traced(self, delivery: Delivery) -> None:
        """``receive`` in a ``handle {subscription}`` span, child of the event's trace
        (``receive`` keeps its own copy of these lines: it is every delivery's cost)."""
        cell = self._actorbus_cell
        assert cell is not None
        event = delivery.event
        with self.tracing.handling(self.subscription.name, cell.name, delivery) as span:
            try:
                await self.handler(event)
            except BaseException as exc:
                error = as_failure(exc)
                if error is None:
                    raise
                span.record_exception(error)
                await self._retry(delivery, event, error, span)
                return
            finish_span(span, 1)
            self.finished(cell, delivery)

    async def _retry(
        self, message: Delivery | Event, event: Any, error: Exception, span: Any = None
    ) -> None:
        sub = self.subscription
        attempts = 1
        while attempts < sub.max_attempts:
            await anyio.sleep(sub.backoff.delay(attempts, sub.rng))
            attempts += 1
            try:
                await self.handler(event)
            except BaseException as exc:
                failure = as_failure(exc)
                if failure is None:
                    raise
                error = failure
                if span is not None:
                    span.record_exception(error)
                continue
            cell = self._actorbus_cell
            assert cell is not None
            if span is not None:
                finish_span(span, attempts)
            sub.finished(cell, message)
            return
        cell = self._actorbus_cell
        assert cell is not None
        cell.failed += attempts
        if span is not None:
            finish_span(span, attempts, error)
        cell.dead_letter(message, "failed", error, attempts)


class ActorSubscriber(Actor):
    """Wraps a user's Actor so that it receives the event and its delivery is tracked."""

    def __init__(
        self, subscription: Subscription, factory: Callable[[], Actor], tracing: Tracing
    ) -> None:
        inner = factory()
        if not isinstance(inner, Actor):
            raise TypeError(
                f"subscription handler factory must return an Actor, got {type(inner).__name__}"
            )
        self.subscription = subscription
        self.inner = inner
        self.tracing = tracing

    async def on_start(self) -> None:
        bind(self.inner, self._actorbus_cell)
        await self.inner.on_start()

    async def on_stop(self) -> None:
        await self.inner.on_stop()

    async def on_restart(self, error: BaseException) -> None:
        bind(self.inner, self._actorbus_cell)
        await self.inner.on_restart(error)

    async def receive(self, message: Delivery | Event) -> Any:
        cell = self._actorbus_cell
        assert cell is not None
        if type(message) is Delivery and self.tracing.on:
            # A failure restarts the actor and retries: each attempt is a span of its own,
            # and the last one's carries the dead letter.
            with self.tracing.handling(self.subscription.name, cell.name, message) as span:
                try:
                    result = await self.inner.receive(message.event)
                except BaseException as exc:
                    error = as_failure(exc)
                    if error is not None:
                        attempt, last = cell.attempt()
                        finish_span(span, attempt, error if last else None, failed=not last)
                    raise
                finish_span(span, cell.attempt()[0])
        else:
            event = message.event if type(message) is Delivery else message
            result = await self.inner.receive(event)
        self.subscription.finished(cell, message)
        return result
