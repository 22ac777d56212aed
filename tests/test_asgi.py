"""TenantMiddleware: identifier order, refusals (400/404/503), hostile headers, scopes.

In process (the middleware called with a fake receive and send) for every rule, then
through a real server (hypercorn on asyncio and on trio) with an HTTP client. The resolver
is the real TenantResolver, in an Engine, except where a test needs a resolver that
raises one exact error (the Retry-After rules); the open-breaker 503 is also checked end
to end: hypercorn, the resolver, a RedisCache on a real redis-server, a real breaker.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import pytest

from actors._resolver import TenantResolver, start_tenant_resolver
from engine import CircuitBreakerConfig, CircuitOpenError, CircuitState, Engine, TenantKey
from engine.asgi import Message, Receive, Scope, Send, TenantMiddleware
from engine.cache import CacheUnavailable, RedisCache
from engine.tenancy import TenantIdentifierValidator, TenantKeyKind
from tests.asgi_server import served
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio

ACME_ID = UUID("6f1c2b1e-5d1a-4c8e-9b7a-0a1b2c3d4e5f")


@dataclass(frozen=True)
class Tenant:
    name: str


class Unavailable(ConnectionError):
    """A dependency that says when to come back (as CircuitOpenError does)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("directory down")
        self.retry_after = retry_after


class Directory:
    """The loader: acme under its uuid, slug and host; 'broken' and 'closed' fail."""

    def __init__(self) -> None:
        self.calls: list[TenantKey] = []
        self.never = anyio.Event()

    async def __call__(self, key: TenantKey) -> Tenant | None:
        self.calls.append(key)
        if key.kind is TenantKeyKind.UUID:
            return Tenant("acme") if key.value == ACME_ID else None
        if key.value in ("acme", "acme.example.com", "127.0.0.1"):
            return Tenant("acme")
        if key.value == "globex":
            return Tenant("globex")
        if key.value == "broken":
            raise ConnectionError("database down")
        if key.value == "closed":
            raise Unavailable(2.2)
        if key.value == "slow":
            await self.never.wait()
        return None


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Inner:
    """The app behind the middleware: answers 200 and journals the scopes it got."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            return
        tenant = scope["state"]["tenant"]
        body = json.dumps({"tenant": tenant.name}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def directory_resolver(
    **options: Any,
) -> AsyncIterator[tuple[TenantResolver[Tenant], Directory]]:
    directory = Directory()
    async with Engine() as engine:
        yield await start_tenant_resolver(engine, directory, **options), directory
        directory.never.set()


def http_scope(*headers: tuple[bytes, bytes], **extra: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


async def call(app: TenantMiddleware, scope: Scope, *incoming: Message) -> list[Message]:
    """Run ``app`` on ``scope``; returns what it sent."""
    queue = list(incoming)
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def answer(sent: list[Message]) -> Answer:
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    return Answer(sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"])


async def request(app: TenantMiddleware, *headers: tuple[bytes, bytes]) -> Answer:
    return answer(await call(app, http_scope(*headers)))


def refused(result: Answer, status: int, error: str) -> None:
    assert result.status == status
    assert result.json["error"] == error
    assert set(result.json) == {"error", "detail"}
    assert result.headers[b"content-type"] == b"application/json"
    assert result.headers[b"content-length"] == str(len(result.body)).encode()
    assert len(result.body) < 300
    assert result.body.isascii()


# ---------------------------------------------------------------- resolution


async def test_a_tenant_slug_reaches_the_app_in_scope_state() -> None:
    async with directory_resolver() as (resolver, directory):
        inner = Inner()
        app = TenantMiddleware(inner, resolver)
        result = await request(app, (b"x-tenant-slug", b"acme"), (b"host", b"ignored.example"))
        assert result.status == 200
        assert result.json == {"tenant": "acme"}
        state = inner.scopes[0]["state"]
        assert state["tenant"] == Tenant("acme")
        assert state["tenant_key"] == TenantKey.slug("acme")
        assert directory.calls == [TenantKey.slug("acme")]


async def test_the_servers_scope_and_state_are_copied_not_changed() -> None:
    async with directory_resolver() as (resolver, _):
        inner = Inner()
        app = TenantMiddleware(inner, resolver)
        server_state = {"pool": "db"}
        scope = http_scope((b"x-tenant-slug", b"acme"), state=server_state)
        answer(await call(app, scope))
        assert server_state == {"pool": "db"}
        assert scope["state"] is server_state
        seen = inner.scopes[0]
        assert seen is not scope
        assert seen["state"] == {
            "pool": "db",
            "tenant": Tenant("acme"),
            "tenant_key": TenantKey.slug("acme"),
        }
        # Without a state, one is made for the app; the server's scope gets none.
        bare = http_scope((b"x-tenant-slug", b"acme"))
        answer(await call(app, bare))
        assert "state" not in bare
        assert inner.scopes[1]["state"]["tenant"] == Tenant("acme")
        # A state that is not a mapping is replaced.
        answer(await call(app, http_scope((b"x-tenant-slug", b"acme"), state="junk")))
        assert set(inner.scopes[2]["state"]) == {"tenant", "tenant_key"}


@pytest.mark.parametrize(
    "value", [str(ACME_ID).encode(), str(ACME_ID).upper().encode(), b"  " + str(ACME_ID).encode()]
)
async def test_x_tenant_id_names_a_tenant_by_uuid(value: bytes) -> None:
    async with directory_resolver() as (resolver, directory):
        result = await request(TenantMiddleware(Inner(), resolver), (b"x-tenant-id", value))
        assert result.status == 200
        assert directory.calls == [TenantKey.uuid(ACME_ID)]


@pytest.mark.parametrize(
    "host",
    [b"acme.example.com", b"ACME.example.com:8443", b"acme.example.com.", b"acme.example.com:"],
)
async def test_the_host_header_names_a_tenant_without_its_port(host: bytes) -> None:
    async with directory_resolver() as (resolver, directory):
        result = await request(TenantMiddleware(Inner(), resolver), (b"host", host))
        assert result.status == 200
        assert directory.calls == [TenantKey.host("acme.example.com")]


async def test_x_tenant_id_comes_first_then_x_tenant_slug_then_host() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver)
        everything = [
            (b"host", b"nobody.example.com"),
            (b"x-tenant-slug", b"globex"),
            (b"x-tenant-id", str(ACME_ID).encode()),
        ]
        assert (await request(app, *everything)).json == {"tenant": "acme"}
        assert (await request(app, *everything[:2])).json == {"tenant": "globex"}
        refused(await request(app, everything[0]), 404, "unknown_tenant")
        assert [key.kind.value for key in directory.calls] == ["uuid", "slug", "host"]


async def test_only_the_header_that_names_the_tenant_is_judged() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver)
        odd_host = (b"host", b"\xff\xfe weird host")
        assert (await request(app, (b"x-tenant-slug", b"acme"), odd_host)).status == 200
        # Several of any of them are still refused.
        refused(
            await request(app, (b"x-tenant-slug", b"acme"), odd_host, odd_host),
            400,
            "ambiguous_tenant",
        )
        assert directory.calls == [TenantKey.slug("acme")]


async def test_header_names_are_matched_in_any_case() -> None:
    async with directory_resolver() as (resolver, _):
        result = await request(TenantMiddleware(Inner(), resolver), (b"X-Tenant-Slug", b"acme"))
        assert result.status == 200


# ---------------------------------------------------------------- forwarded hosts


async def test_forwarded_hosts_are_ignored_unless_trusted() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver)
        spoofed = [(b"host", b"nobody.example.com"), (b"x-forwarded-host", b"acme.example.com")]
        refused(await request(app, *spoofed), 404, "unknown_tenant")
        forwarded = [(b"host", b"nobody.example.com"), (b"forwarded", b"host=acme.example.com")]
        refused(await request(app, *forwarded), 404, "unknown_tenant")
        # Ignored means ignored: even several of them are no error.
        twice = [
            (b"host", b"acme.example.com"),
            (b"x-forwarded-host", b"a.com"),
            (b"x-forwarded-host", b"b.com"),
        ]
        assert (await request(app, *twice)).status == 200
        assert {str(key.value) for key in directory.calls} == {
            "nobody.example.com",
            "acme.example.com",
        }


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-forwarded-host", b"acme.example.com")],
        [(b"x-forwarded-host", b" ACME.example.com:443 ")],
        [(b"forwarded", b"for=192.0.2.60;proto=https;host=acme.example.com")],
        [(b"forwarded", b'for="[2001:db8::1]:4711"; host="acme.example.com:8443"')],
        [(b"forwarded", b"host=acme.example.com"), (b"x-forwarded-host", b"acme.example.com")],
    ],
    ids=["x-forwarded-host", "x-forwarded-host-port", "forwarded", "forwarded-quoted", "both"],
)
async def test_trusted_forwarded_hosts_win_over_host(headers: list[tuple[bytes, bytes]]) -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver, trust_forwarded=True)
        result = await request(app, (b"host", b"proxy.internal"), *headers)
        assert result.status == 200
        assert directory.calls == [TenantKey.host("acme.example.com")]


async def test_trusting_forwarded_hosts_still_falls_back_to_host() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver, trust_forwarded=True)
        assert (await request(app, (b"host", b"acme.example.com"))).status == 200
        forwarded_without_host = (b"forwarded", b"for=192.0.2.60;proto=https")
        result = await request(app, (b"host", b"acme.example.com"), forwarded_without_host)
        assert result.status == 200
        assert directory.calls == [TenantKey.host("acme.example.com")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-forwarded-host", b"acme.example.com, evil.example.com")],
        [(b"x-forwarded-host", b"acme.example.com"), (b"x-forwarded-host", b"acme.example.com")],
        [(b"forwarded", b"host=acme.example.com, host=evil.example.com")],
        [(b"forwarded", b"host=acme.example.com;host=evil.example.com")],
        [(b"forwarded", b"host=a.com"), (b"forwarded", b"host=a.com")],
        [(b"forwarded", b"host=acme.example.com"), (b"x-forwarded-host", b"evil.example.com")],
    ],
    ids=["comma-list", "two-headers", "two-elements", "two-pairs", "two-forwarded", "disagree"],
)
async def test_several_trusted_forwarded_hosts_are_a_400(
    headers: list[tuple[bytes, bytes]],
) -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver, trust_forwarded=True)
        refused(
            await request(app, (b"host", b"acme.example.com"), *headers), 400, "ambiguous_tenant"
        )
        assert directory.calls == []


@pytest.mark.parametrize(
    "forwarded",
    [b'host="acme.example.com\\"x"', b'host="a,b"', b"host=", b'host="', b"host=[::1]:80"],
)
async def test_a_malformed_trusted_forwarded_host_is_a_400(forwarded: bytes) -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver, trust_forwarded=True)
        result = await request(app, (b"host", b"acme.example.com"), (b"forwarded", forwarded))
        refused(result, 400, "invalid_tenant")
        assert directory.calls == []


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"acme.example.com"), (b"host", b"acme.example.com")],
        [(b"host", b"acme.example.com"), (b"host", b"evil.example.com")],
        [(b"x-tenant-slug", b"acme"), (b"x-tenant-slug", b"globex")],
        [(b"x-tenant-id", str(ACME_ID).encode()), (b"x-tenant-id", str(ACME_ID).encode())],
        # Smuggling shapes: the identifier used is single, but another header is doubled.
        [(b"x-tenant-id", str(ACME_ID).encode()), (b"host", b"a.com"), (b"host", b"b.com")],
        [
            (b"x-tenant-id", str(ACME_ID).encode()),
            (b"x-tenant-slug", b"a"),
            (b"X-Tenant-Slug", b"b"),
        ],
    ],
    ids=[
        "host-twice",
        "two-hosts",
        "two-slugs",
        "two-ids",
        "id-with-two-hosts",
        "id-with-two-slugs",
    ],
)
async def test_several_host_or_tenant_headers_are_a_400(headers: list[tuple[bytes, bytes]]) -> None:
    async with directory_resolver() as (resolver, directory):
        refused(
            await request(TenantMiddleware(Inner(), resolver), *headers), 400, "ambiguous_tenant"
        )
        assert directory.calls == []


HOSTILE = [
    (b"x-tenant-slug", b"acme\r\nx-injected: 1"),
    (b"x-tenant-slug", b"acme\nevil"),
    (b"x-tenant-slug", b"acme\x00"),
    (b"x-tenant-slug", b"\x1b[31macme"),
    (b"x-tenant-slug", b"a" * 100_000),
    (b"x-tenant-slug", b"a" * 65),
    (b"x-tenant-slug", b"t\xc3\xa9nant"),  # UTF-8 non-ASCII
    (b"x-tenant-slug", b"\xff\xfe\xfd"),
    (b"x-tenant-slug", b"acme\xe2\x80\xae"),  # right-to-left override
    (b"x-tenant-slug", b""),
    (b"x-tenant-slug", b"   "),
    (b"x-tenant-slug", b"admin"),
    (b"x-tenant-slug", b"'; DROP TABLE tenants--"),
    (b"x-tenant-slug", b"<script>alert(1)</script>"),
    (b"x-tenant-slug", b"../../etc/passwd"),
    (b"x-tenant-slug", b"acme.example.com"),
    (b"x-tenant-id", b""),
    (b"x-tenant-id", b"00000000-0000-0000-0000-000000000000"),
    (b"x-tenant-id", b"acme"),
    (b"x-tenant-id", b"6f1c2b1e5d1a4c8e9b7a0a1b2c3d4e5f"),
    (b"x-tenant-id", b"{6f1c2b1e-5d1a-4c8e-9b7a-0a1b2c3d4e5f}"),
    (b"x-tenant-id", "\uff16f1c2b1e-5d1a-4c8e-9b7a-0a1b2c3d4e5f".encode()),
    (b"host", b""),
    (b"host", b"acme.example.com\r\n"),
    (b"host", b"acme.example.com:80a"),
    (b"host", b"acme.example.com:123456"),
    (b"host", b"acme.example.com:80:80"),
    (b"host", b"[::1]:8080"),
    (b"host", b"user@acme.example.com"),
    (b"host", b"acme..example.com"),
    (b"host", b"-acme.example.com"),
    (b"host", b"a" * 254 + b".com"),
    (b"host", b"xn--bcher-kva.example\xc3\xa9"),
    (b"host", b"."),
]


@pytest.mark.parametrize(
    ("name", "value"), HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))]
)
async def test_hostile_identifiers_are_a_400_that_echoes_nothing(name: bytes, value: bytes) -> None:
    async with directory_resolver() as (resolver, directory):
        result = await request(TenantMiddleware(Inner(), resolver), (name, value))
        refused(result, 400, "invalid_tenant")
        assert name.decode() in result.json["detail"].lower()
        # None of the input comes back (the reserved slug is named, being harmless).
        if value.strip() and value != b"admin":
            assert value.strip() not in result.body
        assert directory.calls == []


async def test_a_request_without_any_identifier_is_a_400() -> None:
    async with directory_resolver() as (resolver, _):
        refused(await request(TenantMiddleware(Inner(), resolver)), 400, "missing_tenant")
        scope = http_scope()
        del scope["headers"]
        refused(
            answer(await call(TenantMiddleware(Inner(), resolver), scope)), 400, "missing_tenant"
        )


@pytest.mark.parametrize(
    "headers",
    [[("x-tenant-slug", "acme")], [(b"x-tenant-slug", None)], [(b"x-tenant-slug",)], [42]],
    ids=["str", "none", "short", "int"],
)
async def test_malformed_asgi_headers_are_a_400(headers: list[Any]) -> None:
    async with directory_resolver() as (resolver, _):
        scope = http_scope()
        scope["headers"] = headers
        refused(
            answer(await call(TenantMiddleware(Inner(), resolver), scope)), 400, "invalid_request"
        )


async def test_an_unknown_tenant_is_a_404() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver)
        for headers in [(b"x-tenant-slug", b"ghost"), (b"x-tenant-id", str(uuid4()).encode())]:
            result = await request(app, headers)
            refused(result, 404, "unknown_tenant")
            assert b"ghost" not in result.body
        # Remembered: a second request does not reach the loader.
        refused(await request(app, (b"x-tenant-slug", b"ghost")), 404, "unknown_tenant")
        assert len(directory.calls) == 2


async def test_a_failing_resolver_is_a_503_and_not_cached() -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver)
        for _ in range(2):
            result = await request(app, (b"x-tenant-slug", b"broken"))
            refused(result, 503, "tenant_unavailable")
            assert b"database" not in result.body
            assert b"retry-after" not in result.headers
        assert len(directory.calls) == 2


async def test_a_503_says_when_to_retry_when_the_error_knows() -> None:
    async with directory_resolver() as (resolver, _):
        result = await request(TenantMiddleware(Inner(), resolver), (b"x-tenant-slug", b"closed"))
        refused(result, 503, "tenant_unavailable")
        assert result.headers[b"retry-after"] == b"3"


class Failing:
    """A resolver that raises exactly ``error`` (a fresh one from ``make`` each time)."""

    def __init__(self, make: Callable[[], BaseException]) -> None:
        self.make = make

    async def resolve(self, key: TenantKey, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        raise self.make()


async def refusal_for(make: Callable[[], BaseException]) -> Answer:
    result = await request(TenantMiddleware(Inner(), Failing(make)), (b"x-tenant-slug", b"acme"))
    refused(result, 503, "tenant_unavailable")
    return result


class Said(ConnectionError):
    """An outage error carrying any ``retry_after`` value at all."""

    def __init__(self, retry_after: object) -> None:
        super().__init__("down")
        self.retry_after = retry_after


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (2.2, b"3"),
        (30, b"30"),
        (0.0, b"1"),
        (0, b"1"),
        (-5.0, b"1"),
        (86_400.5, b"86400"),
        (1e300, b"86400"),
        (10**5000, b"86400"),  # no float holds it; str() of it is refused
        (-(10**5000), b"1"),
        (math.inf, b"86400"),
        (-math.inf, b"1"),
        (math.nan, None),
        (True, None),
        ("5", None),
        (None, None),
    ],
    ids=[
        "fraction",
        "int",
        "zero",
        "int-zero",
        "negative",
        "over-a-day",
        "1e300",
        "10**5000",
        "-10**5000",
        "inf",
        "-inf",
        "nan",
        "bool",
        "str",
        "none",
    ],
)
async def test_retry_after_is_clamped_to_a_short_valid_header(
    seconds: object, header: bytes | None
) -> None:
    result = await refusal_for(lambda: Said(seconds))
    assert result.headers.get(b"retry-after") == header


def wrapped_in_cache_unavailable() -> BaseException:
    try:
        try:
            raise CircuitOpenError("redis", 7.5)
        except CircuitOpenError as error:
            raise CacheUnavailable("Redis cache: GET failed") from error
    except CacheUnavailable as wrapped:
        return wrapped


def raised_while_handling() -> BaseException:
    try:
        raise CircuitOpenError("redis", 7.5)
    except CircuitOpenError:
        try:
            raise RuntimeError("the loader failed while handling it")
        except RuntimeError as error:
            return error


def raised_from_none() -> BaseException:
    try:
        raise CircuitOpenError("redis", 7.5)
    except CircuitOpenError:
        try:
            raise RuntimeError("the loader hid it") from None
        except RuntimeError as error:
            return error


def outer_says_first() -> BaseException:
    outer = Said(1.5)
    outer.__cause__ = CircuitOpenError("redis", 7.5)
    return outer


def chain(depth: int) -> BaseException:
    """``depth`` plain errors, each caused by the next, ending in an open circuit."""
    error: BaseException = CircuitOpenError("redis", 7.5)
    for level in range(depth):
        outer = ConnectionError(f"level {level}")
        outer.__cause__ = error
        error = outer
    return error


def cycle() -> BaseException:
    first, second = ConnectionError("first"), ConnectionError("second")
    first.__cause__, second.__context__ = second, first
    return first


class Broken(ConnectionError):
    @property
    def retry_after(self) -> float:
        raise RuntimeError("a retry_after that fails")


def broken_then_open() -> BaseException:
    error = Broken("down")
    error.__cause__ = CircuitOpenError("redis", 7.5)
    return error


def nan_then_open() -> BaseException:
    error = Said(math.nan)  # says nothing: the error it was raised from may
    error.__cause__ = CircuitOpenError("redis", 7.5)
    return error


@pytest.mark.parametrize(
    ("make", "header"),
    [
        (wrapped_in_cache_unavailable, b"8"),
        (raised_while_handling, b"8"),
        (raised_from_none, None),  # suppressed on purpose: not looked at
        (outer_says_first, b"2"),
        (lambda: chain(3), b"8"),
        (lambda: chain(10_000), None),  # the walk is bounded
        (cycle, None),  # and stops at a cycle
        (broken_then_open, b"8"),
        (nan_then_open, b"8"),
    ],
    ids=[
        "cause",
        "context",
        "from-none",
        "outermost-first",
        "deep",
        "too-deep",
        "cycle",
        "failing-property",
        "nan-then-cause",
    ],
)
async def test_retry_after_is_found_down_the_cause_chain(
    make: Callable[[], BaseException], header: bytes | None
) -> None:
    result = await refusal_for(make)
    assert result.headers.get(b"retry-after") == header


async def test_a_resolver_timeout_is_a_503() -> None:
    async with directory_resolver() as (resolver, _):
        app = TenantMiddleware(Inner(), resolver, timeout=0)
        refused(await request(app, (b"x-tenant-slug", b"slow")), 503, "tenant_unavailable")


async def test_a_stopped_resolver_is_a_503() -> None:
    async with directory_resolver() as (resolver, _):
        app = TenantMiddleware(Inner(), resolver)
        assert (await request(app, (b"x-tenant-slug", b"acme"))).status == 200
    refused(await request(app, (b"x-tenant-slug", b"acme")), 503, "tenant_unavailable")


async def test_a_validation_error_from_the_resolver_is_a_400() -> None:
    class Strict:
        async def resolve(self, key: TenantKey, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
            TenantIdentifierValidator(reserved=frozenset({"acme"})).validate_slug(str(key.value))

    result = await request(TenantMiddleware(Inner(), Strict()), (b"x-tenant-slug", b"acme"))
    refused(result, 400, "invalid_tenant")


async def test_the_apps_own_errors_are_not_turned_into_responses() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("app bug")

    async with directory_resolver() as (resolver, _):
        with pytest.raises(RuntimeError, match="app bug"):
            await call(TenantMiddleware(failing, resolver), http_scope((b"x-tenant-slug", b"acme")))


async def test_a_custom_validator_applies_its_reserved_slugs() -> None:
    validator = TenantIdentifierValidator(reserved=frozenset({"globex"}))
    async with directory_resolver(validator=validator) as (resolver, _):
        app = TenantMiddleware(Inner(), resolver, validator=validator)
        refused(await request(app, (b"x-tenant-slug", b"globex")), 400, "invalid_tenant")
        assert (await request(app, (b"x-tenant-slug", b"acme"))).status == 200


async def test_a_custom_validator_admits_a_slug_the_default_reserves() -> None:
    # The key reaching the resolver is the validator's, not rebuilt by TenantKey.slug(),
    # which would refuse "api" against RESERVED_SLUGS.
    validator = TenantIdentifierValidator(reserved=frozenset())
    async with directory_resolver(validator=validator) as (resolver, directory):
        app = TenantMiddleware(Inner(), resolver, validator=validator)
        refused(await request(app, (b"x-tenant-slug", b"API")), 404, "unknown_tenant")
        assert [(key.kind, key.value) for key in directory.calls] == [(TenantKeyKind.SLUG, "api")]


# ---------------------------------------------------------------- other scopes


async def test_lifespan_passes_through_untouched() -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(lifespan, resolver)
        for kind in ["lifespan", "something.else"]:
            scope: Scope = {"type": kind, "asgi": {"version": "3.0"}, "state": {}}
            await app(scope, receive, send)
            assert seen[-1] == (scope, receive, send)
            assert seen[-1][0] is scope
            assert scope["state"] == {}
        assert directory.calls == []


def websocket_scope(*headers: tuple[bytes, bytes], **extra: Any) -> Scope:
    return http_scope(*headers, type="websocket", scheme="ws", subprotocols=[], **extra)


async def test_a_websocket_gets_its_tenant_too() -> None:
    async with directory_resolver() as (resolver, _):
        inner = Inner()
        app = TenantMiddleware(inner, resolver)
        sent = await call(
            app, websocket_scope((b"x-tenant-slug", b"acme")), {"type": "websocket.connect"}
        )
        assert sent == [{"type": "websocket.accept"}]
        assert inner.scopes[0]["state"]["tenant"] == Tenant("acme")


@pytest.mark.parametrize(
    ("headers", "code", "reason"),
    [
        ([(b"x-tenant-slug", b"admin")], 1008, "invalid_tenant"),
        ([(b"x-tenant-slug", b"ghost")], 1008, "unknown_tenant"),
        ([(b"host", b"a.com"), (b"host", b"b.com")], 1008, "ambiguous_tenant"),
        ([(b"x-tenant-slug", b"broken")], 1013, "tenant_unavailable"),
    ],
)
async def test_a_refused_websocket_handshake_is_closed(
    headers: list[tuple[bytes, bytes]], code: int, reason: str
) -> None:
    async with directory_resolver() as (resolver, _):
        inner = Inner()
        sent = await call(
            TenantMiddleware(inner, resolver),
            websocket_scope(*headers),
            {"type": "websocket.connect"},
        )
        assert sent == [{"type": "websocket.close", "code": code, "reason": reason}]
        assert inner.scopes == []


async def test_a_refused_websocket_gets_an_http_denial_when_the_server_offers_one() -> None:
    async with directory_resolver() as (resolver, _):
        scope = websocket_scope(
            (b"x-tenant-slug", b"ghost"), extensions={"websocket.http.response": {}}
        )
        sent = await call(TenantMiddleware(Inner(), resolver), scope, {"type": "websocket.connect"})
        assert [message["type"] for message in sent] == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert sent[0]["status"] == 404
        assert json.loads(sent[1]["body"])["error"] == "unknown_tenant"


async def test_a_websocket_client_gone_before_the_refusal_gets_nothing() -> None:
    async with directory_resolver() as (resolver, _):
        scope = websocket_scope((b"x-tenant-slug", b"ghost"))
        sent = await call(
            TenantMiddleware(Inner(), resolver), scope, {"type": "websocket.disconnect"}
        )
        assert sent == []


# ---------------------------------------------------------------- arguments


async def test_arguments_are_checked() -> None:
    async with directory_resolver() as (resolver, _):
        inner = Inner()
        with pytest.raises(TypeError, match="app"):
            TenantMiddleware("app", resolver)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="resolver"):
            TenantMiddleware(inner, object())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="trust_forwarded"):
            TenantMiddleware(inner, resolver, trust_forwarded="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            TenantMiddleware(inner, resolver, timeout=-1)
        with pytest.raises(TypeError, match="validator"):
            TenantMiddleware(inner, resolver, validator="strict")  # type: ignore[arg-type]


# ---------------------------------------------------------------- a real server


async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A small app: lifespan puts a value in the state; requests answer with the tenant."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["app"] = "demo"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    state = scope["state"]
    body = json.dumps({"tenant": state["tenant"].name, "app": state.get("app")}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_through_hypercorn_with_an_http_client(anyio_backend: str) -> None:
    async with directory_resolver() as (resolver, directory):
        app = TenantMiddleware(lifespan_app, resolver)
        async with served(app, anyio_backend) as url, httpx.AsyncClient(base_url=url) as client:
            ok = await client.get("/", headers={"X-Tenant-Slug": "acme"})
            assert ok.status_code == 200
            assert ok.json() == {"tenant": "acme", "app": "demo"}

            by_host = await client.get("/", headers={"Host": "acme.example.com:8080"})
            assert by_host.status_code == 200
            by_client_host = await client.get("/")  # Host: 127.0.0.1:port
            assert by_client_host.json()["tenant"] == "acme"

            reserved = await client.get("/", headers={"X-Tenant-Slug": "admin"})
            assert reserved.status_code == 400
            assert reserved.json()["error"] == "invalid_tenant"
            assert reserved.headers["content-type"] == "application/json"

            twice = await client.get(
                "/", headers=[("X-Tenant-Slug", "acme"), ("X-Tenant-Slug", "globex")]
            )
            assert twice.status_code == 400
            assert twice.json()["error"] == "ambiguous_tenant"

            non_ascii = await client.get("/", headers=[(b"X-Tenant-Slug", b"t\xe9nant")])
            assert non_ascii.status_code == 400

            unknown = await client.get("/", headers={"X-Tenant-Slug": "ghost"})
            assert unknown.status_code == 404
            assert unknown.json()["error"] == "unknown_tenant"

            broken = await client.get("/", headers={"X-Tenant-Slug": "broken"})
            assert broken.status_code == 503
            assert broken.json()["error"] == "tenant_unavailable"

        assert [key for key in directory.calls if key.value == "admin"] == []
        stats = resolver.statistics()
        assert stats.loads == 5  # acme, acme.example.com, 127.0.0.1, ghost, broken
        assert stats.errors == 1


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


async def test_an_open_redis_breaker_is_a_503_with_retry_after_end_to_end(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    # The tenants live in Redis behind a breaker: an open breaker reaches the middleware
    # as a CacheUnavailable chaining the CircuitOpenError that says when to come back.
    timeout = 3600.0
    config = CircuitBreakerConfig(failure_threshold=2, timeout=timeout)
    async with Engine() as engine:
        breaker = engine.breaker("redis", config)
        async with RedisCache(redis_server.url, prefix="tenants", breaker=breaker) as cache:

            async def load(key: TenantKey) -> Tenant | None:
                name = await cache.get(str(key.value))
                return None if name is None else Tenant(name.decode())

            for slug in ("acme", "globex"):
                await cache.set(slug, slug.encode())
            resolver = await engine.tenant_resolver(load)
            app = TenantMiddleware(lifespan_app, resolver)
            async with served(app, anyio_backend) as url, httpx.AsyncClient(base_url=url) as client:

                async def get(slug: str) -> httpx.Response:
                    return await client.get("/", headers={"X-Tenant-Slug": slug})

                def says_when(response: httpx.Response) -> bool:
                    assert response.status_code == 503
                    assert response.json()["error"] == "tenant_unavailable"
                    if "retry-after" not in response.headers:
                        return False
                    # Whole seconds left of the open timeout (how many depends on the clock).
                    assert 1 <= int(response.headers["retry-after"]) <= timeout
                    return True

                assert (await get("acme")).json()["tenant"] == "acme"

                await breaker.force_open()
                assert says_when(await get("globex"))
                await breaker.reset()
                assert (await get("globex")).json()["tenant"] == "globex"

                # Redis gone: a failure is a 503 that cannot say when; the one that
                # reaches the threshold has opened the breaker when its request is
                # answered, and the very next request is told when to come back.
                redis_server.stop()
                assert not says_when(await get("initech"))
                assert breaker.metrics().state is CircuitState.CLOSED
                assert not says_when(await get("umbrella"))
                assert breaker.metrics().state is CircuitState.OPEN
                assert says_when(await get("hooli"))
                assert breaker.metrics().rejected == 2
