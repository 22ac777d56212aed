"""The tenant resolver actor: owns the cache and starts one load per key (``engine._resolver``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from engine._actor import Actor
from engine._resolver import (
    TENANT_RESOLVER,
    Flight,
    Invalidate,
    Resolve,
    ResolverState,
    ResolverStatistics,
    TenantResolver,
)
from engine.tenancy import TenantKey

if TYPE_CHECKING:
    from engine._engine import Engine
    from engine._resolver import Loader

__all__ = [
    "TENANT_RESOLVER",
    "ResolverActor",
    "ResolverStatistics",
    "TenantResolver",
    "start_tenant_resolver",
]

_T = TypeVar("_T")

# The spellings of earlier versions.
_Resolve = Resolve
_Invalidate = Invalidate


class ResolverActor(Actor, Generic[_T]):
    """Owns a resolver's cache: answers misses, starts one load per key, invalidates."""

    def __init__(self, state: ResolverState[_T]) -> None:
        self._state = state

    async def receive(self, message: Any) -> Any:
        match message:
            case Resolve(key=key):
                return self._resolve(key)
            case Invalidate(key=key):
                self._invalidate(key)
                return None
        raise TypeError(f"the tenant resolver got an unknown message {type(message).__name__}")

    def _resolve(self, key: TenantKey) -> Flight[_T]:
        state = self._state
        entry = state.entries.get(key)
        if entry is not None:
            if anyio.current_time() < entry.expires:
                # Filled between the caller's look and this message: a hit after all.
                state.entries.move_to_end(key)
                return Flight.answered(key, entry, state)
            del state.entries[key]
        state.misses += 1
        flight = state.flights.get(key)
        if flight is not None:
            state.coalesced += 1
            return flight
        flight = Flight(key)
        state.start_load(flight)
        return flight

    def _invalidate(self, key: TenantKey) -> None:
        state = self._state
        state.entries.pop(key, None)
        # A new generation of the key: the load in flight (if any) belongs to the old one.
        # Its waiters still get its result; later callers start a fresh load.
        flight = state.flights.pop(key, None)
        if flight is not None:
            flight.stale = True


async def start_tenant_resolver(
    engine: Engine, loader: Loader[_T], **options: Any
) -> TenantResolver[_T]:
    """``engine.tenant_resolver(...)`` (kept for code written against earlier versions)."""
    return await engine.tenant_resolver(loader, **options)
