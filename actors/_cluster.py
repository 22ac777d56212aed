"""The forwarder: takes committed outbox events to the cluster's streams."""

from __future__ import annotations

from engine._actor import Actor
from engine._cluster import ClusterLink
from engine._durable import Wake

__all__ = ["Forwarder"]


class Forwarder(Actor):
    """Woken after each commit (as the relay is without a cluster), it runs
    ``link.forward()``: the events after the producer's mark go to Redis in order."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link

    async def receive(self, message: Wake) -> None:
        await self.link.forward()
