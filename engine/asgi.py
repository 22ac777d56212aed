"""ASGI for web applications: ``TenantMiddleware``, which resolves the tenant of every
request (shared/CATALOG.md, "Tenant resolution over HTTP"), and ``health_app(engine)``,
the ``/livez`` and ``/readyz`` probes (see ``health_app``).

The middleware's identifier comes from the ``X-Tenant-ID`` header (a uuid), else ``X-Tenant-Slug``,
else the ``Host`` header without its port. ``X-Forwarded-Host`` and ``Forwarded: host=``
count only with ``trust_forwarded=True`` (behind a proxy you control, which sets them).
The middleware identifies the tenant; it does not authorise anyone: a client can name
any tenant it likes with ``X-Tenant-ID``, so the app checks that the caller belongs to it.

Answers, each with a short JSON body ``{"error": ..., "detail": ...}`` that never echoes
the input: 400 for several ``Host`` or tenant headers, a missing identifier or one that
fails validation (non-ASCII, control characters, too long, malformed); 404 for an unknown
tenant; 503 when the resolver fails or times out (with ``Retry-After`` when the error, or
one it was raised from, says when: a ``CircuitOpenError`` behind the ``CacheUnavailable``
of a ``RedisCache`` whose breaker is open, say; whole seconds, 1 to 86400). Bad input
never makes a 500.

The tenant reaches the app in ``scope["state"]["tenant"]`` (and its ``TenantKey`` in
``scope["state"]["tenant_key"]``); the app gets a copy of the scope and of its
``state``, so the server's dicts are never changed and no request sees another's tenant.

Lifespan scopes (and any other type) pass through untouched. A websocket is resolved the
same way; on failure the middleware takes the ``websocket.connect`` message and answers
with an HTTP denial response (same status and body as over HTTP) when the server offers
the ``websocket.http.response`` extension, else closes the handshake with code 1008
(policy violation) or, when the resolver is unavailable, 1013 (try again later); servers
turn a close before accept into an HTTP 403.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final, Protocol, TypeAlias, TypedDict

from ._health import Health
from ._types import check_timeout
from .tenancy import (
    TenantIdentifierValidator,
    TenantKey,
    TenantKeyKind,
    TenantNotFound,
    TenantValidationError,
    TenantValidationErrorKind,
)

__all__ = [
    "ASGIApp",
    "HealthSource",
    "Message",
    "Receive",
    "Resolver",
    "Scope",
    "Send",
    "TenantMiddleware",
    "health_app",
]

logger = logging.getLogger("actorbus.asgi")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]


class Resolver(Protocol):
    """What the middleware needs of a resolver (``actors.TenantResolver`` is one)."""

    async def resolve(self, key: TenantKey, *, timeout: float | None = ...) -> Any: ...  # noqa: ASYNC109


class _ErrorBody(TypedDict):
    error: str
    detail: str


_TENANT_ID: Final = b"x-tenant-id"
_TENANT_SLUG: Final = b"x-tenant-slug"
_HOST: Final = b"host"
_FORWARDED_HOST: Final = b"x-forwarded-host"
_FORWARDED: Final = b"forwarded"
_NAMES: Final = (_TENANT_ID, _TENANT_SLUG, _HOST)
_FORWARDED_NAMES: Final = (*_NAMES, _FORWARDED_HOST, _FORWARDED)
_WANTED: Final = frozenset(_FORWARDED_NAMES)
_DISPLAY: Final = {
    _TENANT_ID: "X-Tenant-ID",
    _TENANT_SLUG: "X-Tenant-Slug",
    _HOST: "Host",
    _FORWARDED_HOST: "X-Forwarded-Host",
    _FORWARDED: "Forwarded",
}
# Far above any valid identifier (a host is at most 253 characters, plus a port), so only
# hostile values are cut off, before anything scans them.
_MAX_HEADER_BYTES: Final = 4096
_MAX_DETAIL: Final = 200
_CLOSE_POLICY_VIOLATION: Final = 1008
_CLOSE_TRY_AGAIN_LATER: Final = 1013
# Retry-After bounds: at least a second (0 invites an immediate retry storm), at most a
# day (a huge or infinite retry_after still makes a short, valid header).
_MIN_RETRY_AFTER: Final = 1
_MAX_RETRY_AFTER: Final = 86_400
# How far down the __cause__/__context__ chain a retry_after is looked for.
_MAX_CHAIN: Final = 16


class _Refusal(Exception):
    """The answer to a request whose tenant cannot be resolved."""

    def __init__(
        self, status: int, error: str, detail: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(status, error, detail)
        self.status = status
        self.error = error
        self.detail = detail[:_MAX_DETAIL]
        self.headers = headers or []


def _invalid(header: str, error: TenantValidationError) -> _Refusal:
    # The validator's message names the rule (and at most a normalised, valid value),
    # never the raw input.
    return _Refusal(400, "invalid_tenant", f"{header}: {error.message} ({error.kind.value})")


def _ambiguous(header: str) -> _Refusal:
    return _Refusal(400, "ambiguous_tenant", f"the request has several {header} values")


def _header_text(header: str, raw: bytes) -> str:
    """A header value as text: ASCII without control characters, optional white space trimmed."""
    if len(raw) > _MAX_HEADER_BYTES:
        raise _Refusal(
            400, "invalid_tenant", f"{header}: longer than {_MAX_HEADER_BYTES} bytes ({len(raw)})"
        )
    if not raw.isascii():
        raise _Refusal(400, "invalid_tenant", f"{header}: only ASCII is allowed")
    # ASGI header values are bytes; latin-1 maps each byte to one character.
    text = raw.decode("latin-1").strip(" \t")
    if not text.isprintable():  # for ASCII: no CR, LF, NUL or other control characters
        raise _Refusal(400, "invalid_tenant", f"{header}: control characters are not allowed")
    return text


def _collect(scope: Scope) -> dict[bytes, list[bytes]]:
    """The headers the middleware reads, every occurrence of each."""
    found: dict[bytes, list[bytes]] = {}
    try:
        for name, value in scope.get("headers") or ():
            if not isinstance(name, bytes | bytearray) or not isinstance(value, bytes | bytearray):
                raise TypeError("ASGI header names and values are bytes")
            key = bytes(name).lower()
            if key in _WANTED:
                found.setdefault(key, []).append(bytes(value))
    except (TypeError, ValueError) as exc:
        raise _Refusal(400, "invalid_request", "the request headers are malformed") from exc
    return found


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes (RFC 7239 quoted-strings)."""
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def _forwarded_hosts(value: str) -> list[str]:
    """Every ``host=`` of every element of a ``Forwarded`` header (RFC 7239)."""
    hosts: list[str] = []
    for element in _split(value, ","):
        for pair in _split(element, ";"):
            name, equals, host = pair.partition("=")
            if equals and name.strip(" \t").lower() == "host":
                host = host.strip(" \t")
                if len(host) >= 2 and host[0] == host[-1] == '"':
                    # A valid host has no quote or backslash to unescape; any left
                    # inside fails validation.
                    host = host[1:-1]
                hosts.append(host)
    return hosts


def _without_port(header: str, host: str) -> str:
    """``example.com:8080`` -> ``example.com``; the absolute form ``example.com.`` too."""
    if host.startswith("["):
        raise _invalid(
            header,
            TenantValidationError(
                TenantValidationErrorKind.INVALID_HOSTNAME, host, "an IP literal names no tenant"
            ),
        )
    name, colon, port = host.rpartition(":")
    if colon:
        if port and (len(port) > 5 or not port.isdigit()):
            raise _invalid(
                header,
                TenantValidationError(
                    TenantValidationErrorKind.INVALID_HOSTNAME,
                    host,
                    "the port must be at most 5 digits",
                ),
            )
        host = name
    if host.endswith("."):
        host = host[:-1]
    return host


def _retry_after(error: BaseException) -> list[tuple[bytes, bytes]]:
    """A ``Retry-After`` header from the first error in the chain that says when, if any.

    Wrappers such as ``CacheUnavailable`` chain the error that knows (``__cause__``,
    or ``__context__`` unless suppressed); the walk is bounded and stops at a cycle.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        try:
            seconds = getattr(current, "retry_after", None)
        except Exception:  # a property that fails says nothing
            seconds = None
        # NaN and non-numbers say nothing; the errors it was raised from may.
        if (
            isinstance(seconds, int | float)
            and not isinstance(seconds, bool)
            and not (isinstance(seconds, float) and math.isnan(seconds))
        ):
            # Clamped before rounding: int/float comparisons are exact at any size, while
            # math.ceil(inf) raises and str() of a huge int is refused.
            whole = math.ceil(min(max(seconds, _MIN_RETRY_AFTER), _MAX_RETRY_AFTER))
            return [(b"retry-after", str(whole).encode("ascii"))]
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return []


class TenantMiddleware:
    """ASGI middleware: resolves each request's tenant into ``scope["state"]["tenant"]``.

    ``resolver`` is an ``actors.TenantResolver`` (``await engine.tenant_resolver(...)``) or
    anything with ``async resolve(key, *, timeout)``. ``timeout`` bounds each resolution
    (a 503 after it). ``validator`` must apply the same rules as the resolver's.
    """

    def __init__(
        self,
        app: ASGIApp,
        resolver: Resolver,
        *,
        trust_forwarded: bool = False,
        timeout: float | None = 5.0,
        validator: TenantIdentifierValidator | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {app!r}")
        if not callable(getattr(resolver, "resolve", None)):
            raise TypeError(f"resolver must have an async resolve(key) method, got {resolver!r}")
        if not isinstance(trust_forwarded, bool):
            raise TypeError(f"trust_forwarded must be a bool, got {trust_forwarded!r}")
        check_timeout(timeout, "timeout")
        if validator is None:
            validator = TenantIdentifierValidator()
        elif not isinstance(validator, TenantIdentifierValidator):
            raise TypeError(
                f"validator must be a TenantIdentifierValidator, got {type(validator).__name__}"
            )
        self.app = app
        self.resolver = resolver
        self.trust_forwarded = trust_forwarded
        self.timeout = timeout
        self.validator = validator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        try:
            key = self._key(scope)
            tenant = await self._resolve(key)
        except _Refusal as refusal:
            await self._refuse(scope, receive, send, refusal)
            return
        inner = dict(scope)
        state = scope.get("state")
        inner["state"] = dict(state) if isinstance(state, Mapping) else {}
        inner["state"]["tenant"] = tenant
        inner["state"]["tenant_key"] = key
        await self.app(inner, receive, send)

    # ------------------------------------------------------------- identifier

    def _key(self, scope: Scope) -> TenantKey:
        headers = _collect(scope)
        wanted = _FORWARDED_NAMES if self.trust_forwarded else _NAMES
        values: dict[bytes, bytes] = {}
        for raw_name in wanted:
            raw = headers.get(raw_name)
            if raw is None:
                continue
            if len(raw) > 1:
                raise _ambiguous(_DISPLAY[raw_name])
            values[raw_name] = raw[0]
        validator = self.validator
        header = "Host"
        try:
            if _TENANT_ID in values:
                header = "X-Tenant-ID"
                text = _header_text(header, values[_TENANT_ID])
                return validator.validate(text, kind=TenantKeyKind.UUID)
            if _TENANT_SLUG in values:
                header = "X-Tenant-Slug"
                text = _header_text(header, values[_TENANT_SLUG])
                return validator.validate(text, kind=TenantKeyKind.SLUG)
            header, host = self._host(values)
            return validator.validate(host, kind=TenantKeyKind.HOST)
        except TenantValidationError as exc:
            raise _invalid(header, exc) from None

    def _host(self, values: dict[bytes, bytes]) -> tuple[str, str]:
        """The header naming the host and the host, without its port."""
        if self.trust_forwarded:
            forwarded: list[str] = []
            x_forwarded: list[str] = []
            if _FORWARDED in values:
                forwarded = _forwarded_hosts(_header_text("Forwarded", values[_FORWARDED]))
            if _FORWARDED_HOST in values:
                text = _header_text("X-Forwarded-Host", values[_FORWARDED_HOST])
                x_forwarded = [host.strip(" \t") for host in _split(text, ",")]
            if len(forwarded) > 1:
                raise _ambiguous("Forwarded host")
            if len(x_forwarded) > 1:
                raise _ambiguous("X-Forwarded-Host")
            if forwarded and x_forwarded and forwarded[0].lower() != x_forwarded[0].lower():
                raise _ambiguous("Forwarded host and X-Forwarded-Host")
            if forwarded:
                return "Forwarded", _without_port("Forwarded", forwarded[0])
            if x_forwarded:
                return "X-Forwarded-Host", _without_port("X-Forwarded-Host", x_forwarded[0])
        if _HOST not in values:
            raise _Refusal(
                400,
                "missing_tenant",
                "the request names no tenant: no X-Tenant-ID, X-Tenant-Slug or Host header",
            )
        return "Host", _without_port("Host", _header_text("Host", values[_HOST]))

    # ------------------------------------------------------------- resolution

    async def _resolve(self, key: TenantKey) -> Any:
        try:
            return await self.resolver.resolve(key, timeout=self.timeout)
        except TenantNotFound:
            raise _Refusal(404, "unknown_tenant", f"no tenant has this {key.kind}") from None
        except TenantValidationError as exc:
            raise _invalid(f"tenant {key.kind}", exc) from None
        except Exception as exc:
            # A timeout, an open circuit, a cache or database outage: the client may retry.
            logger.warning("resolving tenant %s failed: %r", key, exc, extra={"tenant": str(key)})
            raise _Refusal(
                503,
                "tenant_unavailable",
                "the tenant directory is unavailable; try again later",
                _retry_after(exc),
            ) from None

    # ------------------------------------------------------------- answers

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refusal: _Refusal) -> None:
        body_fields: _ErrorBody = {"error": refusal.error, "detail": refusal.detail}
        # ensure_ascii: whatever a detail holds goes out as plain ASCII escapes.
        body = json.dumps(body_fields, ensure_ascii=True).encode("ascii")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            *refusal.headers,
        ]
        status = refusal.status
        if scope.get("type") == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # A websocket: the refusal answers the handshake, so take it first.
        message = await receive()
        if message.get("type") != "websocket.connect":
            return  # the client is gone
        extensions = scope.get("extensions") or {}
        if "websocket.http.response" in extensions:
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        code = _CLOSE_TRY_AGAIN_LATER if status == 503 else _CLOSE_POLICY_VIOLATION
        await send({"type": "websocket.close", "code": code, "reason": refusal.error})


# ------------------------------------------------------------------ health probes


class HealthSource(Protocol):
    """What ``health_app`` needs of an engine (an ``Engine`` is one)."""

    def health(self) -> Health: ...


class _ProbeBody(TypedDict):
    status: str
    reasons: list[str]


_LIVEZ: Final = "/livez"
_READYZ: Final = "/readyz"
_ALLOWED: Final = (b"allow", b"GET, HEAD")
# A probe's answer stays short whatever the engine has to say.
_MAX_REASONS: Final = 20


def health_app(engine: HealthSource) -> ASGIApp:
    """An ASGI app for orchestrators' probes, answering from ``engine.health()``.

    ``GET /livez``: 200 while the engine is ok or degraded, 503 while it is failing.
    ``GET /readyz``: 200 while it is ready (``Health.ready``: not failing and not
    CRITICAL), else 503. Both answer ``{"status": ..., "reasons": [...]}`` (at most
    20 reasons) with ``Cache-Control: no-store``; ``HEAD`` answers as ``GET`` without a
    body. Other paths are a 404, other methods a 405 with ``Allow: GET, HEAD``, both
    with ``{"error": ..., "detail": ...}``; the query string is ignored. Mounted under
    a prefix, the paths count after ``root_path``. Lifespan events are answered;
    a websocket is closed before it is accepted. Nothing waits or does I/O: the answer
    is read off the engine's memory, in the engine's event loop.
    """
    if not callable(getattr(engine, "health", None)):
        raise TypeError(
            f"engine must be an Engine (anything with a health() method), "
            f"got {type(engine).__name__}"
        )
    return _HealthApp(engine)


class _HealthApp:
    def __init__(self, engine: HealthSource) -> None:
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind == "websocket":
            if (await receive()).get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": _CLOSE_POLICY_VIOLATION})
            return
        if kind != "http":
            # The ASGI way to say "not a protocol this app speaks".
            raise ValueError(f"health_app serves http and lifespan scopes, got {kind!r}")
        method = scope.get("method")
        head = method == "HEAD"
        path = _route(scope)
        if path != _LIVEZ and path != _READYZ:
            detail = f"the health app answers {_LIVEZ} and {_READYZ}"
            await _answer(send, 404, {"error": "not_found", "detail": detail}, head=head)
            return
        if method != "GET" and not head:
            detail = "the health probes answer GET and HEAD"
            await _answer(
                send,
                405,
                {"error": "method_not_allowed", "detail": detail},
                head=False,
                headers=[_ALLOWED],
            )
            return
        try:
            health = self.engine.health()
            status, reasons = health.status, list(health.reasons)
            up = health.live if path == _LIVEZ else health.ready
        except Exception as exc:  # a probe gets an answer, never a 500
            logger.exception("engine.health() raised")
            status, up = "failing", False
            reasons = [f"health: the check raised {type(exc).__name__}"]
        if len(reasons) > _MAX_REASONS:
            more = len(reasons) - _MAX_REASONS + 1
            reasons = [*reasons[: _MAX_REASONS - 1], f"... and {more} more"]
        body: _ProbeBody = {"status": status, "reasons": [r[:_MAX_DETAIL] for r in reasons]}
        await _answer(send, 200 if up else 503, body, head=head)


def _route(scope: Scope) -> str | None:
    """The request's path after ``root_path`` (servers and routers differ on whether
    ``path`` includes it); None when the scope has no usable path."""
    path = scope.get("path")
    if not isinstance(path, str):
        return None
    root = scope.get("root_path")
    if isinstance(root, str) and root and path.startswith(root) and path[len(root) :][:1] == "/":
        return path[len(root) :]
    return path


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        kind = message.get("type")
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(
    send: Send,
    status: int,
    fields: _ProbeBody | _ErrorBody,
    *,
    head: bool,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    # ensure_ascii: names and errors in reasons go out as plain ASCII escapes.
    body = json.dumps(fields, ensure_ascii=True).encode("ascii")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})
