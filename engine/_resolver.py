"""The tenant resolver: a cache of tenants in front of a loader, one load per key at a time.

The resolver actor (``actors/_resolver.py``) owns the cache and the loads in flight: a miss
is a message to it, and it starts at most one load per key, in a task of the engine's task
group, so a caller that gives up does not cancel the load for the others. A hit is answered
by the caller's own task from the actor's published entries, without a mailbox round trip.

Every change to the shared state is synchronous (no ``await`` between a check and the
write that depends on it), so the actor, its load tasks and the callers' fast path never
see one another half-way. Callers only read entries, move a hit to the recent end of the
LRU order and count; inserts, removals and generations belong to the actor and the loads
it started.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import anyio
import msgspec

from ._actor import Actor, ActorRef, Cell
from ._cancel import as_failure
from ._errors import ActorStopped
from ._runtime import RESERVED_PREFIX, Runtime
from ._supervision import check_name
from ._types import Overflow, check_int, check_timeout
from .tenancy import TenantIdentifierValidator, TenantKey, TenantNotFound

__all__ = [
    "TENANT_RESOLVER",
    "Invalidate",
    "Resolve",
    "ResolverState",
    "ResolverStatistics",
    "TenantResolver",
    "start_tenant_resolver",
]

logger = logging.getLogger("actorbus.tenant_resolver")

TENANT_RESOLVER: Final = RESERVED_PREFIX + "tenant_resolver"
# Misses queue here; more concurrent misses than this wait for room (backpressure).
MAILBOX_CAPACITY: Final = 1024
JITTER: Final = 0.1

_T = TypeVar("_T")

Loader = Callable[[TenantKey], Awaitable[_T | None]]
"""``async def load(key: TenantKey) -> tenant | None`` (``None``: no such tenant)."""

_default_validator: Final = TenantIdentifierValidator()


class ResolverStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a tenant resolver's counters (``resolver.statistics()``)."""

    hits: int
    """Resolves answered from a fresh cached tenant."""
    misses: int
    """Resolves that found no fresh entry and waited for a load (``loads`` + ``coalesced``)."""
    loads: int
    """Loader calls."""
    coalesced: int
    """Misses that joined a load already in flight for their key instead of starting one."""
    negative_hits: int
    """Resolves answered ``TenantNotFound`` from a cached "no such tenant"."""
    errors: int
    """Loads whose loader raised (the error reached every waiter and was not cached)."""
    entries: int
    """Entries held now, tenants and "no such tenant" alike (at most ``max_entries``)."""
    evictions: int
    """Entries dropped, least recently used first, to stay within ``max_entries``."""
    in_flight: int
    """Loads running now."""


class Resolve(msgspec.Struct, frozen=True, tag="tenant_resolver.resolve"):
    key: TenantKey


class Invalidate(msgspec.Struct, frozen=True, tag="tenant_resolver.invalidate"):
    key: TenantKey


class Entry(Generic[_T]):
    """A cached answer: a tenant, or ``found=False`` for "no such tenant"."""

    __slots__ = ("expires", "found", "value")

    def __init__(self, value: _T | None, expires: float) -> None:
        self.value = value
        self.found = value is not None
        self.expires = expires


class Flight(Generic[_T]):
    """One load of one key; every caller waiting for that key waits on ``done``."""

    __slots__ = ("done", "error", "key", "stale", "traceback", "value")

    def __init__(self, key: TenantKey) -> None:
        self.key = key
        self.done = anyio.Event()
        self.value: _T | None = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        # Set by invalidate: the key's generation moved on while this load ran, so its
        # result still answers the callers waiting for it but is never cached.
        self.stale = False

    @classmethod
    def answered(cls, key: TenantKey, entry: Entry[_T], state: ResolverState[_T]) -> Flight[_T]:
        """A flight already landed, holding a cached answer (counted as a hit)."""
        flight: Flight[_T] = cls(key)
        if entry.found:
            state.hits += 1
        else:
            state.negative_hits += 1
        flight.finish(entry.value)
        return flight

    def finish(self, value: _T | None) -> None:
        self.value = value
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.traceback = error.__traceback__
        self.done.set()

    def result(self) -> _T:
        error = self.error
        if error is not None:
            # One error object for every waiter, re-raised from its original traceback
            # each time (as asyncio futures do) so tracebacks do not pile up.
            raise error.with_traceback(self.traceback)
        if self.value is None:
            raise TenantNotFound(self.key)
        return self.value


class ResolverState(Generic[_T]):
    """What the actor owns; it outlives the actor's instances, so a restart keeps the cache."""

    def __init__(
        self,
        runtime: Runtime,
        loader: Loader[_T],
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        max_concurrent_loads: int,
    ) -> None:
        self.runtime = runtime
        self.loader = loader
        self.ttl = float(ttl)
        self.negative_ttl = float(negative_ttl)
        self.max_entries = max_entries
        self.limiter = anyio.CapacityLimiter(max_concurrent_loads)
        self.rng = random.Random()
        # Least recently used first.
        self.entries: collections.OrderedDict[TenantKey, Entry[_T]] = collections.OrderedDict()
        self.flights: dict[TenantKey, Flight[_T]] = {}
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.coalesced = 0
        self.negative_hits = 0
        self.errors = 0
        self.evictions = 0
        self.running = 0

    def answer(self, entry: Entry[_T], key: TenantKey) -> _T:
        if entry.found:
            self.hits += 1
            return entry.value  # type: ignore[return-value]
        self.negative_hits += 1
        raise TenantNotFound(key)

    def store(self, key: TenantKey, value: _T | None) -> None:
        ttl = self.ttl if value is not None else self.negative_ttl
        entries = self.entries
        if ttl <= 0:
            entries.pop(key, None)
            return
        # Jitter spreads the expiry of tenants loaded together (a cold start, a deploy),
        # so they are not all reloaded in the same instant.
        ttl *= 1.0 + JITTER * self.rng.uniform(-1.0, 1.0)
        entries[key] = Entry(value, anyio.current_time() + ttl)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1

    def start_load(self, flight: Flight[_T]) -> None:
        """Load ``flight``'s key in a task of the engine (callers giving up do not cancel it)."""
        self.flights[flight.key] = flight
        self.runtime.start_task(_load, self, flight, name=f"tenant load {flight.key}")

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(
            hits=self.hits,
            misses=self.misses,
            loads=self.loads,
            coalesced=self.coalesced,
            negative_hits=self.negative_hits,
            errors=self.errors,
            entries=len(self.entries),
            evictions=self.evictions,
            in_flight=self.running,
        )


async def _load(state: ResolverState[_T], flight: Flight[_T]) -> None:
    """One load, in the engine's task group: callers giving up do not cancel it."""
    key = flight.key
    state.running += 1
    try:
        async with state.limiter:
            state.loads += 1
            try:
                value = await state.loader(key)
            except TenantNotFound:
                value = None
    except BaseException as exc:
        # A stray CancelledError from the loader fails this load, not the engine;
        # a real cancellation (the engine stopping) goes on up.
        error = as_failure(exc)
        if error is None:
            raise
        state.errors += 1
        logger.warning("loading tenant %s failed: %r", key, error, extra={"tenant": str(key)})
        flight.fail(error)
    else:
        if not flight.stale:
            state.store(key, value)
        flight.finish(value)
    finally:
        state.running -= 1
        if state.flights.get(key) is flight:
            del state.flights[key]
        if not flight.done.is_set():  # cancelled: the engine is stopping
            flight.fail(ActorStopped(f"the tenant resolver stopped while loading {key}"))


class TenantResolver(Generic[_T]):
    """Resolves tenant identifiers to tenants through a cache; one load per key at a time.

    Made by ``engine.tenant_resolver(loader, ...)``; it is the handle to the resolver actor.
    """

    __slots__ = ("_cell", "_ref", "_state", "_validator")

    def __init__(
        self, cell: Cell, state: ResolverState[_T], validator: TenantIdentifierValidator
    ) -> None:
        self._cell = cell
        self._ref: ActorRef[Any] = cell.ref
        self._state = state
        self._validator = validator

    @property
    def name(self) -> str:
        """The resolver actor's name."""
        return self._ref.name

    def __repr__(self) -> str:
        return f"<TenantResolver {self._ref.name!r} {len(self._state.entries)} entries>"

    def _key(self, key: TenantKey | str) -> TenantKey:
        if isinstance(key, TenantKey):
            return key
        if isinstance(key, str):
            return self._validator.validate(key)
        raise TypeError(f"a tenant key must be a TenantKey or a str, got {type(key).__name__}")

    async def resolve(self, key: TenantKey | str, *, timeout: float | None = None) -> _T:  # noqa: ASYNC109
        """The tenant ``key`` names.

        A ``str`` is validated first (``TenantValidationError``, and the loader never sees
        it). Raises ``TenantNotFound`` for an unknown tenant, the loader's error if its load
        failed, and ``TimeoutError`` after ``timeout`` seconds (the load goes on for the
        others and still fills the cache).
        """
        if timeout is not None:
            check_timeout(timeout, "timeout")
        key = self._key(key)
        state = self._state
        entry = state.entries.get(key)
        if entry is not None and anyio.current_time() < entry.expires and not self._cell.closed:
            state.entries.move_to_end(key)
            return state.answer(entry, key)
        # A load of this key already in flight: wait for it without a message to the
        # actor (1,000 cold callers cost one ask, not 1,000).
        flight: Flight[_T] | None = state.flights.get(key)
        if flight is not None and not self._cell.closed:
            state.misses += 1
            state.coalesced += 1
        else:
            flight = None
        with anyio.move_on_after(timeout):
            if flight is None:
                flight = await self._ref.ask(Resolve(key), timeout=None)
            await flight.done.wait()
        if flight is None or not flight.done.is_set():
            raise TimeoutError(f"tenant {key} was not resolved within {timeout} s")
        return flight.result()

    async def invalidate(self, key: TenantKey | str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Forget ``key``: the next resolve loads it again.

        A load of ``key`` in flight is not written back to the cache (its waiters still get
        its result). Raises ``AskTimeout`` after ``timeout`` seconds.
        """
        await self._ref.ask(Invalidate(self._key(key)), timeout=timeout)

    def statistics(self) -> ResolverStatistics:
        """A snapshot of the counters."""
        return self._state.statistics()


async def start_tenant_resolver(
    runtime: Runtime,
    actor: Callable[[ResolverState[_T]], Actor],
    loader: Loader[_T],
    *,
    ttl: float,
    negative_ttl: float,
    max_entries: int,
    max_concurrent_loads: int,
    validator: TenantIdentifierValidator | None,
    name: str,
) -> TenantResolver[_T]:
    """Check the settings and start a resolver actor (``actor(state)``) under the root."""
    if not callable(loader):
        raise TypeError(f"loader must be an async function of a TenantKey, got {loader!r}")
    check_timeout(ttl, "ttl")
    check_timeout(negative_ttl, "negative_ttl")
    check_int(max_entries, "max_entries", 1)
    check_int(max_concurrent_loads, "max_concurrent_loads", 1)
    if validator is None:
        validator = _default_validator
    elif not isinstance(validator, TenantIdentifierValidator):
        raise TypeError(
            f"validator must be a TenantIdentifierValidator, got {type(validator).__name__}"
        )
    check_name(name)
    runtime.check_accepting()
    state = ResolverState(
        runtime,
        loader,
        ttl=ttl,
        negative_ttl=negative_ttl,
        max_entries=max_entries,
        max_concurrent_loads=max_concurrent_loads,
    )
    # The engine's own actor: its name may take the reserved "actorbus." prefix.
    cell = await runtime.start_builtin(
        lambda: actor(state), name=name, capacity=MAILBOX_CAPACITY, overflow=Overflow.BLOCK
    )
    return TenantResolver(cell, state, validator)
