"""Cache backends: InMemoryCache (TTL on the virtual clock, LRU) and RedisCache on a real server.

The Redis tests start their own ``redis-server`` on a free loopback port
(``tests/redis_server.py``); they are skipped when the binary is missing and fail
instead when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest
import trio.testing
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError

from engine import (
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    Engine,
    EngineError,
)
from engine._cache import _unavailable
from engine.cache import (
    CacheBackend,
    CacheStatistics,
    CacheUnavailable,
    InMemoryCache,
    RedisCache,
)
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio

T = TypeVar("T")

# A port nothing listens on: for RedisCaches that never reach a server.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


def stats(
    hits: int = 0, misses: int = 0, evictions: int = 0, entries: int = 0, errors: int = 0
) -> CacheStatistics:
    return CacheStatistics(
        hits=hits, misses=misses, evictions=evictions, entries=entries, errors=errors
    )


# ------------------------------------------------------------------ the protocol


def test_both_backends_satisfy_the_protocol() -> None:
    backends: list[CacheBackend] = [InMemoryCache(), RedisCache(NOWHERE)]
    assert all(isinstance(backend, CacheBackend) for backend in backends)


def test_cache_unavailable_is_an_engine_error() -> None:
    assert issubclass(CacheUnavailable, EngineError)


def test_statistics_are_frozen() -> None:
    with pytest.raises(AttributeError):
        stats().hits = 1  # type: ignore[misc]


# ------------------------------------------------------------------ in memory


async def test_memory_round_trip() -> None:
    cache = InMemoryCache()
    assert await cache.health()
    assert await cache.get("k") is None
    await cache.set("k", b"v1")
    assert await cache.get("k") == b"v1"
    await cache.set("k", b"v2")
    assert await cache.get("k") == b"v2"
    await cache.set("empty", b"")
    assert await cache.get("empty") == b""
    await cache.invalidate("k")
    await cache.invalidate("never-set")
    assert await cache.get("k") is None
    assert cache.statistics() == stats(hits=3, misses=2, entries=1)


async def test_memory_evicts_the_least_recently_used_entry() -> None:
    cache = InMemoryCache(max_entries=3)
    for key in "abc":
        await cache.set(key, key.encode())
    assert await cache.get("a") == b"a"  # a is now the most recently used
    await cache.set("b", b"B")  # so is b (an overwrite never evicts)
    assert cache.statistics().evictions == 0
    await cache.set("d", b"d")  # c is the least recently used
    assert await cache.get("c") is None
    await cache.set("e", b"e")  # then a
    assert await cache.get("a") is None
    assert [await cache.get(key) for key in "bde"] == [b"B", b"d", b"e"]
    assert cache.statistics() == stats(hits=4, misses=2, evictions=2, entries=3)


async def test_memory_max_entries_one_keeps_the_last_key() -> None:
    cache = InMemoryCache(max_entries=1)
    await cache.set("a", b"1")
    await cache.set("b", b"2")
    assert await cache.get("a") is None
    assert await cache.get("b") == b"2"
    assert cache.statistics().evictions == 1


async def test_memory_close_empties_it_and_later_calls_are_unavailable() -> None:
    async with InMemoryCache() as cache:
        await cache.set("k", b"v")
    assert cache.statistics().entries == 0
    assert not await cache.health()
    with pytest.raises(CacheUnavailable, match="closed"):
        await cache.get("k")
    with pytest.raises(CacheUnavailable, match="closed"):
        await cache.set("k", b"v")
    with pytest.raises(CacheUnavailable, match="closed"):
        await cache.invalidate("k")
    await cache.close()  # idempotent
    assert cache.statistics().errors == 3
    assert "closed" in repr(cache)


class TestMemoryTTLOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_an_entry_lives_for_the_default_ttl(self) -> None:
        cache = InMemoryCache(ttl=10)
        await cache.set("k", b"v")
        start = anyio.current_time()
        await anyio.sleep_until(start + 9.999)
        assert await cache.get("k") == b"v"
        await anyio.sleep_until(start + 10)
        assert await cache.get("k") is None
        # Expired: a miss, and dropped.
        assert cache.statistics() == stats(hits=1, misses=1, entries=0)

    async def test_a_per_set_ttl_overrides_the_default_and_none_means_the_default(self) -> None:
        cache = InMemoryCache(ttl=100)
        start = anyio.current_time()
        await cache.set("short", b"s", ttl=0.25)
        await cache.set("long", b"l", ttl=1000)
        await cache.set("default", b"d", ttl=None)
        await anyio.sleep_until(start + 0.25)
        assert await cache.get("short") is None
        await anyio.sleep_until(start + 100)
        assert await cache.get("default") is None
        assert await cache.get("long") == b"l"

    async def test_setting_again_restarts_the_ttl(self) -> None:
        cache = InMemoryCache(ttl=10)
        start = anyio.current_time()
        await cache.set("k", b"v")
        await anyio.sleep_until(start + 8)
        await cache.set("k", b"v2")
        await anyio.sleep_until(start + 17)
        assert await cache.get("k") == b"v2"
        await anyio.sleep_until(start + 18)
        assert await cache.get("k") is None

    async def test_reading_does_not_extend_the_ttl(self) -> None:
        cache = InMemoryCache(ttl=10)
        start = anyio.current_time()
        await cache.set("k", b"v")
        await anyio.sleep_until(start + 9)
        assert await cache.get("k") == b"v"
        await anyio.sleep_until(start + 10)
        assert await cache.get("k") is None

    async def test_an_expired_entry_still_counts_until_read_or_evicted(self) -> None:
        cache = InMemoryCache(ttl=1, max_entries=2)
        start = anyio.current_time()
        await cache.set("old", b"o")
        await anyio.sleep_until(start + 5)
        assert cache.statistics().entries == 1
        await cache.set("a", b"a")
        await cache.set("b", b"b")  # evicts the expired, least recently used "old"
        assert cache.statistics() == stats(evictions=1, entries=2)


BAD_SECONDS: list[tuple[object, type[Exception], str]] = [
    (0, ValueError, "> 0"),
    (-1.0, ValueError, "> 0"),
    (math.nan, ValueError, "finite"),
    (math.inf, ValueError, "finite"),
    (True, TypeError, "number"),
    ("5", TypeError, "number"),
]


@pytest.mark.parametrize(("ttl", "error", "rule"), BAD_SECONDS)
def test_memory_refuses_a_bad_default_ttl(ttl: object, error: type[Exception], rule: str) -> None:
    with pytest.raises(error, match=rf"ttl must be .*{rule}.*{ttl!r}"):
        InMemoryCache(ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_entries", "error", "rule"),
    [
        (0, ValueError, ">= 1"),
        (-5, ValueError, ">= 1"),
        (1.5, TypeError, "an int"),
        (True, TypeError, "an int"),
        ("10", TypeError, "an int"),
        (None, TypeError, "an int"),
    ],
)
def test_memory_refuses_bad_max_entries(
    max_entries: object, error: type[Exception], rule: str
) -> None:
    with pytest.raises(error, match=rf"max_entries must be {rule}.*{max_entries!r}"):
        InMemoryCache(max_entries=max_entries)  # type: ignore[arg-type]


BAD_KEYS: list[tuple[object, type[Exception]]] = [
    ("", ValueError),
    (None, TypeError),
    (1, TypeError),
    (b"k", TypeError),
    (["k"], TypeError),
]
BAD_VALUES: list[object] = ["text", bytearray(b"v"), memoryview(b"v"), None, 1]


def memory_cache() -> CacheBackend:
    return InMemoryCache()


def unentered_redis_cache() -> CacheBackend:
    # Arguments are checked before the cache is used: no server, not even entered.
    return RedisCache(NOWHERE)


BACKENDS = [memory_cache, unentered_redis_cache]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize(("key", "error"), BAD_KEYS)
async def test_a_bad_key_is_refused(
    make: Callable[[], CacheBackend], key: object, error: type[Exception]
) -> None:
    cache = make()
    with pytest.raises(error, match="key must be a"):
        await cache.get(key)  # type: ignore[arg-type]
    with pytest.raises(error, match="key must be a"):
        await cache.set(key, b"v")  # type: ignore[arg-type]
    with pytest.raises(error, match="key must be a"):
        await cache.invalidate(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("value", BAD_VALUES)
async def test_a_value_that_is_not_bytes_is_refused(
    make: Callable[[], CacheBackend], value: object
) -> None:
    with pytest.raises(TypeError, match=f"value must be bytes, got {type(value).__name__}"):
        await make().set("k", value)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize(("ttl", "error", "rule"), BAD_SECONDS)
async def test_a_bad_per_set_ttl_is_refused(
    make: Callable[[], CacheBackend], ttl: object, error: type[Exception], rule: str
) -> None:
    cache = make()
    with pytest.raises(error, match=rf"ttl must be .*{rule}"):
        await cache.set("k", b"v", ttl=ttl)  # type: ignore[arg-type]
    assert cache.statistics().errors == 0


# ------------------------------------------------------------------ redis: arguments, lifecycle


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        (None, TypeError, "url must be a str"),
        (b"redis://localhost", TypeError, "url must be a str"),
        ("", ValueError, "must start with redis://"),
        ("http://localhost:6379", ValueError, "must start with redis://"),
        ("localhost:6379", ValueError, "must start with redis://"),
        ("redis://", ValueError, "must name a host"),
        ("unix://", ValueError, "must name a socket path"),
        ("redis://127.0.0.1:port/0", ValueError, "not a valid Redis URL"),
    ],
)
def test_redis_refuses_a_bad_url(url: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        RedisCache(url)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ttl", "connect_timeout", "timeout"])
@pytest.mark.parametrize(("seconds", "error", "rule"), BAD_SECONDS)
def test_redis_refuses_bad_seconds(
    name: str, seconds: object, error: type[Exception], rule: str
) -> None:
    with pytest.raises(error, match=rf"{name} must be .*{rule}"):
        RedisCache(NOWHERE, **{name: seconds})  # type: ignore[arg-type]


def test_redis_refuses_a_bad_prefix_or_breaker() -> None:
    with pytest.raises(TypeError, match="prefix must be a str, got int"):
        RedisCache(NOWHERE, prefix=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="breaker must have an async call"):
        RedisCache(NOWHERE, breaker=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["http://user:s3cret@host", "redis://user:s3cret@", "redis://:s3cret@host:port/0"]
)
def test_redis_url_errors_do_not_show_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="url") as caught:
        RedisCache(url)
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


def test_redis_url_errors_show_the_rest_of_the_url_unchanged() -> None:
    with pytest.raises(ValueError, match="url") as caught:
        RedisCache("http://user:s3cret@host:1/db?ssl=1#part")
    assert "'http://user:***@host:1/db?ssl=1#part'" in str(caught.value)


def test_redis_repr_shows_the_location_not_the_password() -> None:
    cache = RedisCache("redis://user:s3cret@127.0.0.1:1/0", prefix="p")
    assert "s3cret" not in repr(cache)
    assert "127.0.0.1:1" in repr(cache)
    assert "not entered" in repr(cache)


def test_redis_accepts_a_unix_socket_url() -> None:
    assert "/tmp/redis.sock" in repr(RedisCache("unix:///tmp/redis.sock"))


async def test_redis_closed_before_entering_cannot_be_entered() -> None:
    cache = RedisCache(NOWHERE)
    await cache.close()
    with pytest.raises(RuntimeError, match="only once"):
        async with cache:
            pass


async def test_redis_must_be_entered_before_use() -> None:
    cache = RedisCache(NOWHERE)
    with pytest.raises(RuntimeError, match="async with RedisCache"):
        await cache.get("k")
    assert not await cache.health()  # a health probe never raises


async def test_redis_can_be_entered_once_and_is_unavailable_after_close() -> None:
    # Entering makes no connection: it works with nothing listening.
    async with RedisCache(NOWHERE) as cache:
        with pytest.raises(RuntimeError, match="only once"):
            await cache.__aenter__()
        await cache.close()
        with pytest.raises(CacheUnavailable, match="closed"):
            await cache.get("k")
        assert not await cache.health()
    with pytest.raises(CacheUnavailable, match="closed"):
        await cache.set("k", b"v")
    with pytest.raises(RuntimeError, match="only once"):
        await cache.__aenter__()
    assert cache.statistics().errors == 2
    assert "closed" in repr(cache)


class FakeBreaker:
    """``call`` raises ``error`` without calling ``fn``: injects failures without a server."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        await anyio.lowlevel.checkpoint()
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        RedisConnectionError("lost"),
        OSError("unreachable"),
        TimeoutError("slow"),
        anyio.BrokenResourceError(),
        EngineError("refused"),
        ExceptionGroup("several", [OSError("a"), RedisConnectionError("b")]),
    ],
    ids=repr,
)
async def test_redis_turns_every_outage_error_into_cache_unavailable(error: Exception) -> None:
    async with RedisCache(NOWHERE, breaker=FakeBreaker(error)) as cache:
        with pytest.raises(CacheUnavailable) as caught:
            await cache.get("k")
        assert caught.value.__cause__ is error
        assert not await cache.health()
        assert cache.statistics() == stats(evictions=-1, entries=-1, errors=2)


@pytest.mark.parametrize(
    "error",
    [ValueError("a bug"), ExceptionGroup("mixed", [OSError("a"), KeyError("b")])],
    ids=repr,
)
async def test_redis_lets_a_bug_through_unchanged(error: Exception) -> None:
    async with RedisCache(NOWHERE, breaker=FakeBreaker(error)) as cache:
        with pytest.raises(type(error)) as caught:
            await cache.get("k")
        assert caught.value is error
        assert cache.statistics().errors == 0


def test_outage_classification() -> None:
    assert _unavailable(ExceptionGroup("g", [ExceptionGroup("h", [OSError()])]))
    assert not _unavailable(RuntimeError())


# ------------------------------------------------------------------ redis: a real server


async def test_redis_round_trip(redis_server: RedisServer) -> None:
    async with RedisCache(redis_server.url) as cache:
        assert await cache.health()
        assert await cache.get("k") is None
        await cache.set("k", b"\x00binary\xff")
        assert await cache.get("k") == b"\x00binary\xff"
        await cache.set("k", b"v2")
        assert await cache.get("k") == b"v2"
        await cache.invalidate("k")
        await cache.invalidate("never-set")
        assert await cache.get("k") is None
        assert cache.statistics() == stats(hits=2, misses=2, evictions=-1, entries=-1)
    assert redis_server.keys() == set()


async def test_redis_prefix_is_visible_in_the_server(redis_server: RedisServer) -> None:
    async with (
        RedisCache(redis_server.url, prefix="tenant-a") as a,
        RedisCache(redis_server.url, prefix="tenant-b") as b,
        RedisCache(redis_server.url) as bare,
    ):
        await a.set("k", b"A")
        await b.set("k", b"B")
        await bare.set("k", b"bare")
        assert redis_server.keys() == {"tenant-a:k", "tenant-b:k", "k"}
        assert redis_server.command("GET", "tenant-a:k") == b"$1\r\nA\r\n"
        assert [await a.get("k"), await b.get("k"), await bare.get("k")] == [b"A", b"B", b"bare"]
        await a.invalidate("k")
        assert redis_server.keys() == {"tenant-b:k", "k"}


async def test_redis_sets_the_ttl_in_the_server(redis_server: RedisServer) -> None:
    async with RedisCache(redis_server.url, prefix="p", ttl=300) as cache:
        await cache.set("default", b"v")
        await cache.set("whole", b"v", ttl=7)
        await cache.set("fraction", b"v", ttl=1.5)
        await cache.set("tiny", b"v", ttl=0.0001)  # at least 1 ms, never "no expiry"
        assert 299_000 < redis_server.pttl("p:default") <= 300_000
        assert 6_000 < redis_server.pttl("p:whole") <= 7_000
        assert 0 < redis_server.pttl("p:fraction") <= 1_500
        assert redis_server.pttl("p:tiny") in (-2, 0, 1)  # gone already, or about to be


async def test_redis_serves_many_concurrent_callers(redis_server: RedisServer) -> None:
    async with RedisCache(redis_server.url, prefix="c") as cache:

        async def round_trip(n: int) -> None:
            await cache.set(f"k{n}", str(n).encode())
            assert await cache.get(f"k{n}") == str(n).encode()

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(round_trip, n)
        assert cache.statistics().hits == 50
    assert len(redis_server.keys()) == 50


async def test_redis_outage_raises_cache_unavailable_and_recovers(
    redis_server: RedisServer,
) -> None:
    async with RedisCache(redis_server.url, prefix="p") as cache:
        await cache.set("k", b"v")
        redis_server.stop()

        assert not await cache.health()
        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: cache.get("k"),
            lambda: cache.set("k", b"v"),
            lambda: cache.invalidate("k"),
        ]
        for operation in operations:
            with pytest.raises(CacheUnavailable, match="failed") as caught:
                await operation()
            assert isinstance(caught.value.__cause__, RedisError | OSError)
        assert cache.statistics() == stats(evictions=-1, entries=-1, errors=4)
        # A refused connection leaves nothing unclosed behind (coredis would
        # leak its connection's memory streams: see _closing_connection_class).
        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always")
            gc.collect()
        assert [w for w in caught_warnings if issubclass(w.category, ResourceWarning)] == []

        redis_server.restart()  # same port, empty dataset
        assert await cache.health()
        assert await cache.get("k") is None
        await cache.set("k", b"again")
        assert await cache.get("k") == b"again"
        assert redis_server.keys() == {"p:k"}


async def test_redis_that_stops_answering_times_out_into_cache_unavailable(
    redis_server: RedisServer,
) -> None:
    async with RedisCache(redis_server.url, connect_timeout=0.2, timeout=0.2) as cache:
        await cache.set("k", b"v")
        redis_server.pause()
        try:
            with pytest.raises(CacheUnavailable) as caught:
                await cache.get("k")
            assert isinstance(caught.value.__cause__, TimeoutError)
            assert not await cache.health()
        finally:
            redis_server.resume()
        assert await cache.get("k") == b"v"
        assert await cache.health()


async def test_redis_through_a_breaker(redis_server: RedisServer) -> None:
    config = CircuitBreakerConfig(failure_threshold=2, timeout=60.0)
    async with Engine() as engine:
        breaker = engine.breaker("redis", config)
        async with RedisCache(redis_server.url, prefix="b", breaker=breaker) as cache:
            await cache.set("k", b"v")
            assert await cache.get("k") == b"v"
            assert breaker.metrics().successes == 2

            redis_server.stop()
            for state in (CircuitState.CLOSED, CircuitState.OPEN):
                with pytest.raises(CacheUnavailable) as caught:
                    await cache.get("k")
                assert isinstance(caught.value.__cause__, RedisError)
                # The failure that reaches the threshold has opened it when the call returns.
                assert breaker.state is state

            redis_server.restart()
            # Open: refused without asking Redis, though Redis is back.
            with pytest.raises(CacheUnavailable) as caught:
                await cache.get("k")
            assert isinstance(caught.value.__cause__, CircuitOpenError)
            assert not await cache.health()
            assert breaker.metrics().rejected == 2

            await breaker.reset()
            assert await cache.health()
            await cache.set("k", b"again")
            assert await cache.get("k") == b"again"
            assert cache.statistics() == stats(hits=2, evictions=-1, entries=-1, errors=4)
