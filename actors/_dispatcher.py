"""The dispatcher actor and the actors that run a subscription's handler."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from engine._actor import Actor, Cell, Tracked, bind
from engine._cancel import as_failure
from engine._errors import ActorStopped, MailboxFull
from engine._routing import Delivery, OutboxRoutes, Router, Subscription
from engine._types import DeadLetterReason

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
        self.cache = router.cache
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
        subscriptions = self.cache.get(type(event))
        if subscriptions is None:
            subscriptions = self.router.route(type(event))
        if not subscriptions:
            message.done()
            return
        message.remaining = len(subscriptions)
        for index, subscription in enumerate(subscriptions):
            cells = subscription.cells
            if len(cells) == 1:
                lane = 0
            else:
                try:
                    lane = subscription.index(event)
                except Exception as exc:
                    subscription.refuse(message, "failed", exc)
                    continue
            cell = cells[lane]
            if cell.open:
                inline = subscription.inline
                if inline is not None and cell.idle:
                    # Its actor waits with an empty mailbox and the handler cannot
                    # suspend: call it here, as that actor would next, without the
                    # hop through its mailbox. The event keeps its slot meanwhile.
                    coroutine = inline(event)
                    try:
                        subscription.contexts[lane].run(coroutine.send, None)
                    except StopIteration:
                        cell.processed += 1
                        # Delivery.done written out (the router's events carry no seq,
                        # so Delivery.finish would do no more).
                        remaining = message.remaining = message.remaining - 1
                        if not remaining:
                            message.routes.release()
                        continue
                    except BaseException as exc:
                        self._inline_failed(cell, message, exc)
                        continue
                    # Unreachable for a body without await points; should its code
                    # have been swapped since, do not resume it in this task.
                    coroutine.close()
                    self._inline_failed(
                        cell,
                        message,
                        RuntimeError(f"handler of {subscription.name!r} suspended when called"),
                    )
                    continue
                queue = cell.queue
                # The common case inline (as in ActorRef.try_tell): a mailbox with
                # room. A deliberate copy of Cell.offer's fast path: this loop is
                # the cost of every delivery.
                if len(queue) < cell.capacity:
                    queue.append(message)
                    if len(queue) > cell.peak:
                        cell.peak = len(queue)
                    if cell.wakeup is not None:
                        cell.wake()
                    continue
            message.undelivered = subscriptions[index:]
            await subscription.deliver_to(cell, message)

    @staticmethod
    def _inline_failed(cell: Cell, delivery: Delivery, caught: BaseException) -> None:
        """The first call of a handler run inline failed: its actor takes over from
        there, retrying and dead-lettering exactly as after a first call of its own."""
        error = as_failure(caught)
        if error is None:
            raise caught
        retry = Retry(delivery, error)
        try:
            # Its mailbox is empty (the actor was idle): there is room.
            if cell.offer(retry):
                return
        except (ActorStopped, MailboxFull):
            pass
        cell.failed += 1
        delivery.dead_letter(cell, "failed", error, 1)


class Retry(Tracked):
    """To a function subscriber: ``delivery`` whose first call, made by the
    dispatcher, failed with ``error``; retry it (the next attempt is the second)."""

    __slots__ = ("delivery", "error")

    def __init__(self, delivery: Delivery, error: Exception) -> None:
        self.delivery = delivery
        self.error = error

    def dead_letter(
        self, cell: Cell, reason: DeadLetterReason, error: BaseException | None, attempts: int
    ) -> None:
        # Stopped, shut down or dropped while waiting: as the delivery itself would be.
        self.delivery.dead_letter(cell, reason, error, attempts)


class FunctionSubscriber(Actor):
    """Runs a stateless async handler.

    A failing call is retried with backoff, then dead-lettered: no restart is needed.
    """

    def __init__(self, subscription: Subscription, handler: EventHandler) -> None:
        self.subscription = subscription
        self.handler = handler

    async def receive(self, message: Delivery | Retry) -> None:
        if type(message) is Retry:
            await self._retry(message.delivery, message.error)
            return
        assert type(message) is Delivery
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
            await anyio.sleep(sub.backoff.delay(attempts, sub.rng))
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
        bind(self.inner, self._actorbus_cell)
        await self.inner.on_start()

    async def on_stop(self) -> None:
        await self.inner.on_stop()

    async def on_restart(self, error: BaseException) -> None:
        bind(self.inner, self._actorbus_cell)
        await self.inner.on_restart(error)

    async def receive(self, message: Delivery) -> Any:
        result = await self.inner.receive(message.event)
        cell = self._actorbus_cell
        assert cell is not None
        message.finish(cell)
        return result
