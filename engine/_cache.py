"""Cache backends: the ``CacheBackend`` protocol, ``InMemoryCache`` and ``RedisCache``.

Values are bytes (encode with msgspec or anything else before ``set``). Every
backend is async, validates its arguments the same way and reports the same
``CacheStatistics``. A backend that cannot serve a call raises
``CacheUnavailable``; callers treat that as a miss they cannot fill and carry on
(load from the source of truth), never as a crash.
"""

from __future__ import annotations

import math
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import EngineError
from ._extras import needs_redis

__all__ = [
    "CacheBackend",
    "CacheStatistics",
    "CacheUnavailable",
    "InMemoryCache",
    "RedisCache",
]

_T = TypeVar("_T")

UNKNOWN = -1
"""A ``CacheStatistics`` count the backend cannot know (``RedisCache`` entries, evictions)."""


class CacheUnavailable(EngineError):
    """The cache cannot serve the call: it is down, too slow, closed or its breaker is open.

    The cause (a connection error, ``TimeoutError``, ``CircuitOpenError``...) is
    chained as ``__cause__``.
    """


class CacheStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A backend's counters (``cache.statistics()``)."""

    hits: int
    """``get`` calls that found a live value."""
    misses: int
    """``get`` calls that found nothing (absent or expired)."""
    evictions: int
    """Live entries dropped to stay within ``max_entries``; -1 when unknown (Redis)."""
    entries: int
    """Entries held now (expired ones not yet dropped included); -1 when unknown (Redis)."""
    errors: int = 0
    """Calls that found the cache unavailable (``RedisCache``: failed health probes included)."""


@runtime_checkable
class CacheBackend(Protocol):
    """What the engine needs from a cache. Keys are non-empty strings, values bytes.

    ``ttl`` is in seconds; ``None`` means the backend's default. Errors: a bad
    argument is a ``TypeError`` / ``ValueError``; a backend that cannot serve the
    call raises ``CacheUnavailable`` (``health`` returns False instead).
    """

    async def health(self) -> bool:
        """True when the backend can serve calls now; never raises for an outage."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: the default TTL)."""
        ...

    async def invalidate(self, key: str) -> None:
        """Forget ``key`` (no error when it is absent)."""
        ...

    def statistics(self) -> CacheStatistics:
        """The backend's counters."""
        ...

    async def close(self) -> None:
        """Release the backend's resources; later calls raise ``CacheUnavailable``."""
        ...


# ------------------------------------------------------------------ arguments


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        raise ValueError("key must be a non-empty str, got ''")
    return key


def _check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes, got {type(value).__name__}: {value!r:.80}")
    return value


def _check_seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number of seconds, got {type(value).__name__}: {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _check_ttl(ttl: object, default: float) -> float:
    return default if ttl is None else _check_seconds(ttl, "ttl")


# ------------------------------------------------------------------ in memory


class InMemoryCache:
    """A process-local cache: LRU-bounded, each entry with its own TTL.

    Time comes from ``anyio.current_time()`` (so trio's virtual clock drives it
    in tests). An expired entry counts as a miss and is dropped when read; the
    least recently used entry (read or written) is evicted when a new key would
    exceed ``max_entries``. Usable without ``async with``; ``close()`` empties it.
    """

    def __init__(self, *, ttl: float = 300.0, max_entries: int = 10_000) -> None:
        self._ttl = _check_seconds(ttl, "ttl")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int):
            raise TypeError(
                f"max_entries must be an int, got {type(max_entries).__name__}: {max_entries!r}"
            )
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self._max_entries = max_entries
        # key -> (value, expiry on the anyio clock); order = least recently used first.
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._closed = False
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._errors = 0

    def __repr__(self) -> str:
        return (
            f"<InMemoryCache ttl={self._ttl} entries={len(self._entries)}/{self._max_entries}"
            f"{' closed' if self._closed else ''}>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            self._errors += 1
            raise CacheUnavailable("the in-memory cache is closed")

    async def health(self) -> bool:
        await anyio.lowlevel.checkpoint()
        return not self._closed

    async def get(self, key: str) -> bytes | None:
        _check_key(key)
        await anyio.lowlevel.checkpoint()
        self._check_open()
        entry = self._entries.get(key)
        if entry is not None:
            value, expires = entry
            if anyio.current_time() < expires:
                self._entries.move_to_end(key)
                self._hits += 1
                return value
            del self._entries[key]
        self._misses += 1
        return None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_key(key)
        _check_value(value)
        seconds = _check_ttl(ttl, self._ttl)
        await anyio.lowlevel.checkpoint()
        self._check_open()
        entries = self._entries
        entries[key] = (value, anyio.current_time() + seconds)
        entries.move_to_end(key)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)
            self._evictions += 1

    async def invalidate(self, key: str) -> None:
        _check_key(key)
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._entries.pop(key, None)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            entries=len(self._entries),
            errors=self._errors,
        )

    async def close(self) -> None:
        self._closed = True
        self._entries.clear()
        await anyio.lowlevel.checkpoint()


# ------------------------------------------------------------------ redis


class _Breaker(Protocol):
    """What ``RedisCache`` needs from a breaker: ``CircuitBreaker.call``'s contract."""

    async def call(self, fn: Callable[..., Awaitable[_T]], /, *args: Any, **kwargs: Any) -> _T: ...


def is_redis_outage(error: BaseException) -> bool:
    """Whether ``error`` means "Redis cannot serve this call" (vs. a bug)."""
    with needs_redis("Redis"):
        from coredis.exceptions import RedisError

    kinds = (
        RedisError,  # every coredis error: connection, protocol, server replies
        OSError,  # sockets, DNS
        TimeoutError,  # our deadline, coredis' stream timeout, the breaker's call_timeout
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.EndOfStream,
        EngineError,  # CircuitOpenError and anything else the breaker refuses with
    )
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(kinds)
        return rest is None
    return isinstance(error, kinds)


_unavailable = is_redis_outage  # the earlier name

_closing_classes: dict[type[Any], type[Any]] = {}


def closing_connection_class(base: type[Any]) -> type[Any]:
    """``base`` (a coredis connection class) closing its memory streams when it ends.

    A coredis 6.x connection creates anyio memory object streams in its
    constructor but closes them only when the connection was established: a
    refused connection (Redis down) leaks them and their ``ResourceWarning`` fires
    when they are garbage collected. Closing them is idempotent and harmless.
    """
    cls = _closing_classes.get(base)
    if cls is None:

        async def run(
            self: Any, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            try:
                await base.run(self, task_status=task_status)
            finally:
                for value in list(vars(self).values()):
                    if isinstance(value, MemoryObjectSendStream | MemoryObjectReceiveStream):
                        value.close()

        cls = type(base.__name__, (base,), {"run": run, "__module__": __name__})
        _closing_classes[base] = cls
    return cls


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    userinfo, _, hostinfo = parsed.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:***@{hostinfo}"
    return urllib.parse.urlunsplit(
        (parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment)
    )


def check_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    parsed = urllib.parse.urlsplit(url)
    shown = redact(url)
    if parsed.scheme in ("redis", "rediss"):
        if not parsed.hostname:
            raise ValueError(f"url must name a host (redis://host:port/db), got {shown!r}")
    elif parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError(f"url must name a socket path (unix:///path), got {shown!r}")
    else:
        raise ValueError(
            "url must start with redis://, rediss:// or unix://, "
            f"got {parsed.scheme!r} in {shown!r}"
        )
    return url


class RedisCache:
    """A cache in Redis, through coredis (anyio-native: runs under asyncio and trio).

    Open it with ``async with RedisCache(url) as cache:``: coredis runs its
    connection pool in a task group that must be entered and left by the task
    that owns the cache (a call before entering is a ``RuntimeError``).
    Connections are made on demand, so entering works while Redis is down and
    the cache recovers by itself when Redis is back: the next call reconnects.

    Keys are stored as ``f"{prefix}:{key}"`` (just ``key`` without a prefix),
    with ``SET key value EX seconds`` (``PX`` milliseconds for a TTL that is not
    a whole number of seconds); ``invalidate`` is ``DEL``; ``health`` is ``PING``.

    Every call (``health`` included) goes through ``breaker.call`` when a
    breaker is given (``engine.breaker("redis", ...)`` or any object with its
    ``call`` contract) and is bounded by ``connect_timeout + timeout`` seconds
    (``connect_timeout`` bounds opening a connection, ``timeout`` each reply).
    A connection error, a timeout, an error reply or an open breaker raises
    ``CacheUnavailable`` with the cause chained, never a raw coredis or OS
    error; ``health`` returns False instead. After a timeout the pooled
    connections are dropped so that the next call starts afresh.

    ``statistics()`` counts hits, misses and errors; ``entries`` and
    ``evictions`` are ``-1`` (unknown: Redis expires and evicts on its own and
    other clients share the keyspace).

    Needs coredis (``pip install 'actorbus[redis]'``): without it, constructing one
    raises ``ImportError`` naming that extra.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        ttl: float = 300.0,
        breaker: _Breaker | None = None,
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        with needs_redis("RedisCache"):
            import coredis
            from coredis.exceptions import ConnectionError as RedisConnectionError
            from coredis.retry import ConstantRetryPolicy

        check_url(url)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
        self._prefix = f"{prefix}:" if prefix else ""
        self._ttl = _check_seconds(ttl, "ttl")
        if breaker is not None and not callable(getattr(breaker, "call", None)):
            raise TypeError(f"breaker must have an async call(fn, *args) method, got {breaker!r}")
        self._breaker = breaker
        connect_timeout = _check_seconds(connect_timeout, "connect_timeout")
        timeout = _check_seconds(timeout, "timeout")
        self._deadline = connect_timeout + timeout
        try:
            client = coredis.Redis.from_url(
                url,
                connect_timeout=connect_timeout,
                stream_timeout=timeout,
                # One immediate retry on a connection error: a pooled connection
                # to a Redis that restarted fails once, the retry reconnects.
                retry_policy=ConstantRetryPolicy((RedisConnectionError,), retries=1, delay=0.0),
            )
        except ValueError as error:  # e.g. a port that is not a number
            raise ValueError(f"url is not a valid Redis URL: {redact(url)!r} ({error})") from None
        pool = client.connection_pool
        pool.connection_class = closing_connection_class(pool.connection_class)
        self._client = client
        self._location = str(pool.location)
        self._entered = False
        self._closed = False
        self._hits = 0
        self._misses = 0
        self._errors = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._entered else "not entered"
        return f"<RedisCache {self._location} prefix={self._prefix[:-1]!r} {state}>"

    async def __aenter__(self) -> Self:
        if self._entered or self._closed:
            raise RuntimeError("a RedisCache can be entered only once")
        await self._client.__aenter__()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        await self._client.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------ operations

    async def health(self) -> bool:
        if not self._entered or self._closed:
            await anyio.lowlevel.checkpoint()
            return False
        try:
            await self._run("PING", self._client.ping)
        except CacheUnavailable:
            return False
        return True

    async def get(self, key: str) -> bytes | None:
        name = self._key(key)
        value = await self._run("GET", self._client.get, name)
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        name = self._key(key)
        _check_value(value)
        seconds = _check_ttl(ttl, self._ttl)
        if seconds.is_integer():
            await self._run("SET", self._client.set, name, value, ex=int(seconds))
        else:
            millis = max(1, round(seconds * 1000))
            await self._run("SET", self._client.set, name, value, px=millis)

    async def invalidate(self, key: str) -> None:
        await self._run("DEL", self._client.delete, [self._key(key)])

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            evictions=UNKNOWN,
            entries=UNKNOWN,
            errors=self._errors,
        )

    async def close(self) -> None:
        """Drop the connections; later calls raise ``CacheUnavailable``.

        Leaving ``async with`` closes the cache (and stops coredis' pool); calling
        ``close()`` earlier is allowed and idempotent.
        """
        if not self._closed:
            self._closed = True
            if self._entered:
                self._client.connection_pool.disconnect()
        await anyio.lowlevel.checkpoint()

    # ------------------------------------------------------------ internals

    def _key(self, key: str) -> str:
        return self._prefix + _check_key(key)

    async def _run(
        self, command: str, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any
    ) -> _T:
        if not self._entered:
            raise RuntimeError("enter the RedisCache first: async with RedisCache(url) as cache")
        try:
            if self._closed:
                raise CacheUnavailable(f"the Redis cache at {self._location} is closed")
            if self._breaker is None:
                return await self._bounded(fn, *args, **kwargs)
            return await self._breaker.call(self._bounded, fn, *args, **kwargs)
        except Exception as error:
            if isinstance(error, CacheUnavailable):
                self._errors += 1
                raise
            if not is_redis_outage(error):
                raise
            self._errors += 1
            raise CacheUnavailable(
                f"Redis cache at {self._location}: {command} failed: "
                f"{type(error).__name__}: {error}"
            ) from error

    async def _bounded(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        try:
            with anyio.fail_after(self._deadline):
                return await fn(*args, **kwargs)
        except TimeoutError:
            # A connection whose replies stopped coming may be half-open: start afresh.
            self._client.connection_pool.disconnect()
            raise
