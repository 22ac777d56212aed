"""The tenant resolver: single flight, errors, negative caching, TTLs, invalidation, LRU.

Time-based behaviour (TTLs, negative TTLs, timeouts) runs on trio's virtual clock, in
``TestOnTheVirtualClock``; everything else on asyncio and trio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import anyio
import anyio.lowlevel
import pytest
import trio.testing

from actors._resolver import (
    TENANT_RESOLVER,
    ResolverStatistics,
    TenantResolver,
    _Resolve,
    start_tenant_resolver,
)
from engine import (
    ActorStopped,
    Engine,
    EngineError,
    TenantKey,
    TenantNotFound,
    TenantValidationError,
)
from engine.tenancy import TenantIdentifierValidator, TenantValidationErrorKind

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Tenant:
    key: str
    version: int


class Loader:
    """A loader that knows some tenants, journals its calls and can be held at a gate."""

    def __init__(self, *known: str, gated: bool = False) -> None:
        self.known = set(known)
        self.calls: list[TenantKey] = []
        self.gate: anyio.Event | None = anyio.Event() if gated else None
        self.entered = anyio.Event()
        self.finished = 0
        self.errors: list[Exception] = []

    async def __call__(self, key: TenantKey) -> Tenant | None:
        self.calls.append(key)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        if self.errors:
            raise self.errors.pop(0)
        if str(key.value) not in self.known:
            return None
        return Tenant(str(key.value), len(self.calls))

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the other tasks until ``predicate()`` holds (no timed sleep)."""
    while not predicate():
        await anyio.lowlevel.checkpoint()


def stats(resolver: TenantResolver[Any], **expected: int) -> None:
    actual = resolver.statistics()
    assert {name: getattr(actual, name) for name in expected} == expected


# ---------------------------------------------------------------- single flight


async def test_a_thousand_concurrent_callers_share_one_load() -> None:
    loader = Loader("acme", gated=True)
    results: list[Tenant] = []

    async def caller(resolver: TenantResolver[Tenant]) -> None:
        results.append(await resolver.resolve("acme"))

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            for _ in range(1000):
                tg.start_soon(caller, resolver)
            await loader.entered.wait()
            await wait_until(lambda: resolver.statistics().coalesced == 999)
            assert results == []
            loader.release()
        assert len(loader.calls) == 1
        assert len(results) == 1000
        assert all(result is results[0] for result in results)
        stats(resolver, loads=1, misses=1000, coalesced=999, hits=0, entries=1, in_flight=0)
        # Cached now: answered without the loader.
        assert await resolver.resolve("acme") is results[0]
        stats(resolver, loads=1, hits=1)


async def test_different_keys_load_independently() -> None:
    loader = Loader("acme", "globex")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            for name in ["acme", "globex"] * 5:
                tg.start_soon(resolver.resolve, name)
        assert sorted(str(key) for key in loader.calls) == ["slug:acme", "slug:globex"]
        stats(resolver, loads=2, misses=10, coalesced=8, entries=2)


async def test_a_hit_does_not_go_through_the_mailbox() -> None:
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, Loader("acme"))
        await resolver.resolve("acme")
        actor = engine.actor(TENANT_RESOLVER)
        processed = actor.statistics().processed
        for _ in range(10):
            await resolver.resolve(TenantKey.slug("acme"))
        assert actor.statistics().processed == processed
        stats(resolver, hits=10, misses=1)


async def test_the_actor_answers_from_an_entry_filled_after_the_caller_looked() -> None:
    # A race guard: a miss that reaches the actor after a load of its key has landed is
    # answered from the cache. Sent straight to the actor, as a caller that raced would.
    loader = Loader("acme")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        await resolver.resolve("acme")
        with pytest.raises(TenantNotFound):
            await resolver.resolve("ghost")
        actor = engine.actor(TENANT_RESOLVER)
        landed = await actor.ask(_Resolve(TenantKey.slug("acme")))
        assert landed.done.is_set()
        assert landed.result() == Tenant("acme", 1)
        landed = await actor.ask(_Resolve(TenantKey.slug("ghost")))
        with pytest.raises(TenantNotFound):
            landed.result()
        stats(resolver, loads=2, misses=2, hits=1, negative_hits=1)


async def test_raw_strings_name_the_same_key_as_their_normal_form() -> None:
    uuid = uuid4()
    loader = Loader("acme", "example.com", str(uuid))
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        for raw in ["acme", "  ACME  ", "\tAcMe\n"]:
            assert await resolver.resolve(raw) == Tenant("acme", 1)
        for raw in ["Example.COM", "example.com"]:
            assert await resolver.resolve(raw) == Tenant("example.com", 2)
        for raw in [str(uuid).upper(), str(uuid)]:
            assert await resolver.resolve(raw) == Tenant(str(uuid), 3)
        assert await resolver.resolve(TenantKey.uuid(uuid)) == Tenant(str(uuid), 3)
        assert [key.kind.value for key in loader.calls] == ["slug", "host", "uuid"]
        assert isinstance(loader.calls[2].value, UUID)
        stats(resolver, loads=3, hits=5)


# ---------------------------------------------------------------- errors


async def test_a_loader_error_reaches_every_waiter_and_is_not_cached() -> None:
    loader = Loader("acme", gated=True)
    boom = ConnectionError("database down")
    loader.errors.append(boom)
    caught: list[BaseException] = []

    async def caller(resolver: TenantResolver[Tenant]) -> None:
        try:
            await resolver.resolve("acme")
        except ConnectionError as exc:
            caught.append(exc)

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(caller, resolver)
            await wait_until(lambda: resolver.statistics().misses == 10)
            loader.release()
        assert caught == [boom] * 10
        stats(resolver, loads=1, errors=1, coalesced=9, entries=0)
        # Not cached: the next resolve loads again, and succeeds.
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        stats(resolver, loads=2, errors=1, entries=1)


async def test_a_loader_raising_tenant_not_found_means_no_such_tenant() -> None:
    async def loader(key: TenantKey) -> str:
        raise TenantNotFound(key)

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        for _ in range(2):
            with pytest.raises(TenantNotFound) as info:
                await resolver.resolve("ghost")
            assert info.value.key == TenantKey.slug("ghost")
        stats(resolver, loads=1, errors=0, negative_hits=1)


async def test_an_unknown_tenant_raises_tenant_not_found() -> None:
    loader = Loader()
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        with pytest.raises(TenantNotFound, match="no tenant for slug:ghost"):
            await resolver.resolve("ghost")
        with pytest.raises(TenantNotFound):
            await resolver.resolve("ghost")
        assert len(loader.calls) == 1
        stats(resolver, loads=1, misses=1, negative_hits=1, hits=0, entries=1)


# ---------------------------------------------------------------- giving up


async def test_a_cancelled_caller_does_not_cancel_the_load_for_the_others() -> None:
    loader = Loader("acme", gated=True)
    scopes: list[anyio.CancelScope] = []
    first_gone = anyio.Event()
    results: list[Tenant] = []

    async def first(resolver: TenantResolver[Tenant]) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await resolver.resolve("acme")
        assert scope.cancelled_caught
        first_gone.set()

    async def second(resolver: TenantResolver[Tenant]) -> None:
        results.append(await resolver.resolve("acme"))

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first, resolver)
            await loader.entered.wait()
            tg.start_soon(second, resolver)
            await wait_until(lambda: resolver.statistics().coalesced == 1)
            scopes[0].cancel()
            await first_gone.wait()
            loader.release()
        assert results == [Tenant("acme", 1)]
        assert loader.finished == 1
        stats(resolver, loads=1, coalesced=1, entries=1)


async def test_a_load_whose_callers_all_gave_up_still_fills_the_cache() -> None:
    loader = Loader("acme", gated=True)
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            tg.start_soon(resolver.resolve, "acme")
            await loader.entered.wait()
            tg.cancel_scope.cancel()
        loader.release()
        await wait_until(lambda: resolver.statistics().in_flight == 0)
        assert await resolver.resolve("acme") == Tenant("acme", 1)
        stats(resolver, loads=1, hits=1, entries=1)


async def test_stopping_the_engine_fails_the_waiters_of_a_load_in_flight() -> None:
    loader = Loader("acme", gated=True)
    caught: list[BaseException] = []

    async def waiter(resolver: TenantResolver[Tenant]) -> None:
        try:
            await resolver.resolve("acme")
        except EngineError as exc:
            caught.append(exc)

    # The waiter outlives the engine: its load is cancelled when the engine stops.
    async with anyio.create_task_group() as tg, Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        tg.start_soon(waiter, resolver)
        await loader.entered.wait()
    assert len(caught) == 1
    assert isinstance(caught[0], ActorStopped)
    assert "stopped while loading slug:acme" in str(caught[0])
    assert loader.finished == 0
    stats(resolver, in_flight=0, entries=0)


async def test_a_stopped_resolver_refuses_even_cached_tenants() -> None:
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, Loader("acme"))
        await resolver.resolve("acme")
    with pytest.raises(ActorStopped):
        await resolver.resolve("acme")
    with pytest.raises(EngineError):
        await start_tenant_resolver(engine, Loader())


# ---------------------------------------------------------------- invalidation


async def test_invalidate_drops_a_cached_tenant() -> None:
    loader = Loader("acme")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        assert await resolver.resolve("acme") == Tenant("acme", 1)
        await resolver.invalidate("ACME")
        stats(resolver, entries=0)
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        await resolver.invalidate(TenantKey.slug("globex"))  # not cached: nothing to do
        stats(resolver, loads=2, entries=1)


async def test_invalidate_racing_a_load_keeps_the_stale_value_out_of_the_cache() -> None:
    loader = Loader("acme", gated=True)
    results: list[Tenant] = []

    async def caller(resolver: TenantResolver[Tenant]) -> None:
        results.append(await resolver.resolve("acme"))

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, resolver)
            await loader.entered.wait()
            await resolver.invalidate("acme")
            loader.release()
        # The caller that was waiting gets the load it waited for...
        assert results == [Tenant("acme", 1)]
        # ...but that value, loaded before the invalidation, was not cached.
        stats(resolver, entries=0, in_flight=0)
        loader.gate = None
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        stats(resolver, loads=2, hits=1, entries=1)


async def test_a_caller_after_an_invalidation_does_not_join_the_stale_load() -> None:
    loader = Loader("acme", gated=True)
    results: dict[str, Tenant] = {}

    async def caller(resolver: TenantResolver[Tenant], label: str) -> None:
        results[label] = await resolver.resolve("acme")

    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, resolver, "before")
            await loader.entered.wait()
            await resolver.invalidate("acme")
            tg.start_soon(caller, resolver, "after")
            await wait_until(lambda: len(loader.calls) == 2)
            loader.release()
        assert results == {"before": Tenant("acme", 2), "after": Tenant("acme", 2)}
        stats(resolver, loads=2, coalesced=0, entries=1)
        # The second load (current generation) was cached; the first one never was.
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        stats(resolver, loads=2, hits=1)


# ---------------------------------------------------------------- bounds


async def test_the_cache_keeps_at_most_max_entries_least_recently_used_out_first() -> None:
    loader = Loader("a", "b", "c", "d")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader, max_entries=3)
        for name in ["a", "b", "c"]:
            await resolver.resolve(name)
        await resolver.resolve("a")  # a hit: a is now the most recently used
        await resolver.resolve("d")  # evicts b, the least recently used
        stats(resolver, loads=4, hits=1, entries=3, evictions=1)
        await resolver.resolve("a")
        await resolver.resolve("c")
        await resolver.resolve("d")
        stats(resolver, loads=4, hits=4)
        await resolver.resolve("b")  # loaded again; evicts a
        stats(resolver, loads=5, entries=3, evictions=2)
        with pytest.raises(TenantNotFound):  # negative entries count toward the bound too
            await resolver.resolve("nobody")
        stats(resolver, loads=6, entries=3, evictions=3)


async def test_loads_run_at_most_max_concurrent_loads_at_once() -> None:
    names = [f"t{i}" for i in range(5)]
    loader = Loader(*names, gated=True)
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader, max_concurrent_loads=2)
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(resolver.resolve, name)
            await wait_until(lambda: resolver.statistics().in_flight == 5)
            await anyio.wait_all_tasks_blocked()
            assert len(loader.calls) == 2
            loader.release()
        assert len(loader.calls) == 5
        stats(resolver, loads=5, entries=5, in_flight=0)


HOSTILE = [
    "acme\r\nX-Injected: 1",
    "acme\nevil",
    "a" * 10_000,
    "a." * 200 + "com",
    "x" * 64 + "y",
    "tenänt",
    "\uff54\uff45\uff4e\uff41\uff4e\uff54",  # fullwidth "tenant"
    "\u212aelvin",  # the Kelvin sign lower-cases to k
    "acme\u200b",  # zero-width space
    "acme\u202e",  # right-to-left override
    "",
    "   ",
    "\t\r\n",
    "\x00",
    "acme\x00evil",
    "../../etc/passwd",
    "'; DROP TABLE--",
    "<script>alert(1)</script>",
    "slug:acme",
    "admin",
    "-acme",
    "example..com",
    "00000000-0000-0000-0000-000000000000",
    "acme.com:8080",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
async def test_hostile_raw_identifiers_are_refused_before_the_loader(raw: str) -> None:
    loader = Loader("acme")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        with pytest.raises(TenantValidationError):
            await resolver.resolve(raw)
        with pytest.raises(TenantValidationError):
            await resolver.invalidate(raw)
        assert loader.calls == []
        stats(resolver, misses=0, loads=0, entries=0)


async def test_identifiers_that_are_not_strings_are_a_type_error() -> None:
    loader = Loader("acme")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        for bad in [42, b"acme", None, ["acme"]]:
            with pytest.raises(TypeError):
                await resolver.resolve(bad)  # type: ignore[arg-type]
        assert loader.calls == []


async def test_a_custom_validator_decides_what_is_reserved() -> None:
    loader = Loader("admin")
    validator = TenantIdentifierValidator(reserved=frozenset({"acme"}))
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader, validator=validator)
        with pytest.raises(TenantValidationError) as info:
            await resolver.resolve("acme")
        assert info.value.kind is TenantValidationErrorKind.RESERVED
        assert await resolver.resolve("admin") == Tenant("admin", 1)


# ---------------------------------------------------------------- the actor


async def test_the_resolver_is_an_engine_actor_under_a_reserved_name() -> None:
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, Loader("acme"))
        assert resolver.name == TENANT_RESOLVER
        assert repr(resolver) == "<TenantResolver 'actorbus.tenant_resolver' 0 entries>"
        assert TENANT_RESOLVER in engine.metrics().actors
        with pytest.raises(ValueError, match="already taken"):
            await start_tenant_resolver(engine, Loader())
        # Users may not spawn under the reserved prefix, but may name a second resolver.
        other = await start_tenant_resolver(engine, Loader("acme"), name="tenants")
        assert await other.resolve("acme") == Tenant("acme", 1)
        stats(resolver, loads=0)


async def test_the_cache_survives_a_restart_of_the_actor() -> None:
    loader = Loader("acme")
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, loader)
        await resolver.resolve("acme")
        with pytest.raises(TypeError, match="unknown message"):
            await engine.actor(TENANT_RESOLVER).ask("garbage", timeout=None)
        assert await resolver.resolve("acme") == Tenant("acme", 1)
        await resolver.invalidate("acme")  # through the restarted actor
        assert await resolver.resolve("acme") == Tenant("acme", 2)
        assert engine.actor(TENANT_RESOLVER).statistics().restarts == 1
    assert engine.dead_letters.count() == 1


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"ttl": -1.0}, ValueError),
        ({"ttl": "300"}, TypeError),
        ({"negative_ttl": float("nan")}, ValueError),
        ({"max_entries": 0}, ValueError),
        ({"max_entries": 1.5}, TypeError),
        ({"max_concurrent_loads": 0}, ValueError),
        ({"validator": "strict"}, TypeError),
        ({"name": ""}, ValueError),
        ({"name": 7}, TypeError),
    ],
)
async def test_arguments_are_checked(arguments: dict[str, Any], error: type[Exception]) -> None:
    async with Engine() as engine:
        with pytest.raises(error):
            await start_tenant_resolver(engine, Loader(), **arguments)
        assert TENANT_RESOLVER not in engine.metrics().actors


async def test_the_loader_must_be_callable_and_timeouts_valid() -> None:
    async with Engine() as engine:
        with pytest.raises(TypeError, match="loader"):
            await start_tenant_resolver(engine, "load")  # type: ignore[arg-type]
        resolver = await start_tenant_resolver(engine, Loader("acme"))
        with pytest.raises(ValueError, match="timeout"):
            await resolver.resolve("acme", timeout=-1)


async def test_statistics_are_a_frozen_snapshot() -> None:
    async with Engine() as engine:
        resolver = await start_tenant_resolver(engine, Loader("acme"))
        before = resolver.statistics()
        await resolver.resolve("acme")
        assert before == ResolverStatistics(
            hits=0,
            misses=0,
            loads=0,
            coalesced=0,
            negative_hits=0,
            errors=0,
            entries=0,
            evictions=0,
            in_flight=0,
        )
        with pytest.raises(AttributeError):
            before.hits = 1  # type: ignore[misc]
        stats(resolver, misses=1, loads=1, entries=1)


# ---------------------------------------------------------------- time


class TestOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        # autojump: when every task is blocked the clock jumps to the next deadline.
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_tenants_expire_after_their_ttl_within_the_jitter_bounds(self) -> None:
        names = [f"t{i}" for i in range(50)]
        loader = Loader(*names)
        async with Engine() as engine:
            resolver = await start_tenant_resolver(engine, loader, ttl=100.0)
            start = anyio.current_time()
            for name in names:
                await resolver.resolve(name)
            assert anyio.current_time() == start
            # -10 %: every tenant is still fresh.
            await anyio.sleep(90.0 - 1e-3)
            for name in names:
                await resolver.resolve(name)
            stats(resolver, loads=50, hits=50)
            # At the nominal TTL the jitter splits them: some expired, some not.
            await anyio.sleep(10.0)
            for name in names:
                await resolver.resolve(name)
            reloaded = resolver.statistics().loads - 50
            assert 0 < reloaded < 50
            # +10 %: every tenant of the first load has expired.
            await anyio.sleep(10.0 + 2e-3)
            for name in names:
                await resolver.resolve(name)
            assert resolver.statistics().loads == 100

    async def test_unknown_tenants_are_remembered_for_the_negative_ttl(self) -> None:
        loader = Loader()
        async with Engine() as engine:
            resolver = await start_tenant_resolver(engine, loader, ttl=300.0, negative_ttl=60.0)
            with pytest.raises(TenantNotFound):
                await resolver.resolve("ghost")
            await anyio.sleep(54.0 - 1e-3)  # 60 s - 10 %
            with pytest.raises(TenantNotFound):
                await resolver.resolve("ghost")
            stats(resolver, loads=1, negative_hits=1)
            loader.known.add("ghost")  # the tenant is created meanwhile
            await anyio.sleep(12.0 + 2e-3)  # past 60 s + 10 %
            assert await resolver.resolve("ghost") == Tenant("ghost", 2)
            stats(resolver, loads=2, negative_hits=1, hits=0)

    async def test_a_zero_ttl_caches_nothing(self) -> None:
        loader = Loader("acme")
        async with Engine() as engine:
            resolver = await start_tenant_resolver(engine, loader, ttl=0, negative_ttl=0)
            for name in ["acme", "acme"]:
                await resolver.resolve(name)
            for _ in range(2):
                with pytest.raises(TenantNotFound):
                    await resolver.resolve("ghost")
            stats(resolver, loads=4, hits=0, negative_hits=0, entries=0)

    async def test_a_resolve_timeout_raises_timeout_error_and_the_load_goes_on(self) -> None:
        loader = Loader("acme", gated=True)
        async with Engine() as engine:
            resolver = await start_tenant_resolver(engine, loader)
            start = anyio.current_time()
            with pytest.raises(TimeoutError, match=r"slug:acme was not resolved within 2\.5 s"):
                await resolver.resolve("acme", timeout=2.5)
            assert anyio.current_time() - start == pytest.approx(2.5)
            stats(resolver, in_flight=1)
            loader.release()
            await wait_until(lambda: resolver.statistics().in_flight == 0)
            assert await resolver.resolve("acme", timeout=2.5) == Tenant("acme", 1)
            stats(resolver, loads=1, hits=1)

    async def test_a_zero_timeout_answers_only_from_the_cache(self) -> None:
        loader = Loader("acme")
        async with Engine() as engine:
            resolver = await start_tenant_resolver(engine, loader)
            with pytest.raises(TimeoutError):
                await resolver.resolve("acme", timeout=0)
            # The load it asked for went on and filled the cache.
            await wait_until(lambda: resolver.statistics().entries == 1)
            assert await resolver.resolve("acme", timeout=0) == Tenant("acme", 1)
            await resolver.invalidate("acme", timeout=5.0)
            stats(resolver, loads=1, hits=1, entries=0)


async def test_engine_tenant_resolver_loads_once_for_a_thousand_cold_callers() -> None:
    loads: list[TenantKey] = []
    release = anyio.Event()

    async def loader(key: TenantKey) -> str:
        loads.append(key)
        await release.wait()
        return f"tenant {key.value}"

    results: list[str] = []

    async def resolve(resolver: Any) -> None:
        results.append(await resolver.resolve("acme"))

    async with Engine() as engine:
        resolver = await engine.tenant_resolver(loader, ttl=60.0)
        async with anyio.create_task_group() as tg:
            for _ in range(1000):
                tg.start_soon(resolve, resolver)
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert results == ["tenant acme"] * 1000
        assert len(loads) == 1
        stats = resolver.statistics()
        assert (stats.loads, stats.coalesced, stats.entries) == (1, 999, 1)
        assert "actorbus.tenant_resolver" in engine.metrics().actors
