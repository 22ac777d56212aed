"""The outbox relay and the projection subscriber: actors serving the ``Outbox``."""

from __future__ import annotations

import anyio

from engine._actor import Actor
from engine._durable import PROJECTION_WINDOW, Outbox, Wake
from engine._routing import Delivery, Subscription

__all__ = ["ProjectionSubscriber", "Relay"]


class Relay(Actor):
    """Dispatches committed outbox events in order, one backpressure slot each.

    Woken after each commit (and by the outbox poll); one wake-up at a time
    waits in its mailbox, and each runs ``outbox.relay()`` to the head.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def receive(self, message: Wake) -> None:
        await self.outbox.relay()


class ProjectionSubscriber(Actor):
    """Applies events to a projection in the writer's transactions, in order.

    Each event is a write request that checks the stored position, runs the
    projector (retried in place up to ``max_attempts``; then the event is
    dead-lettered in the same transaction) and moves the position: applied
    exactly once even across crashes. Up to PROJECTION_WINDOW events wait for
    the writer at a time, so a catch-up commits many per transaction.
    """

    def __init__(self, outbox: Outbox, subscription: Subscription) -> None:
        self.outbox = outbox
        self.subscription = subscription
        self.window = 0
        self.room: anyio.Event | None = None

    def _ended(self) -> None:
        self.window -= 1
        if self.room is not None:
            self.room.set()
            self.room = None

    async def receive(self, message: Delivery) -> None:
        cell = self._actorbus_cell
        assert cell is not None
        self.outbox.project(self.subscription, cell, message, self._ended)
        self.window += 1
        while self.window >= PROJECTION_WINDOW:
            if self.room is None:
                self.room = anyio.Event()
            await self.room.wait()
