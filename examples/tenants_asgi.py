"""Tenants over HTTP: a plain ASGI app behind TenantMiddleware, served by hypercorn.

Run: python3 examples/tenants_asgi.py [asyncio|trio]

The engine's tenant resolver loads tenants from an in-memory table (your
database in real life). ``engine.asgi.TenantMiddleware`` names the tenant of
every request from ``X-Tenant-ID``, ``X-Tenant-Slug`` or ``Host`` and hands it
to the app in ``scope["state"]["tenant"]``. Hypercorn serves it on a free port
of 127.0.0.1; the example then makes a few requests with httpx, prints what
came back and shuts the server down.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import anyio
import httpx
import hypercorn.asyncio
import hypercorn.trio
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

from engine import Engine, TenantKey
from engine.asgi import Receive, Scope, Send


@dataclass(frozen=True)
class Tenant:
    id: str
    slug: str
    host: str
    name: str


TENANTS = [
    Tenant("0190a4c2-6f1e-7cc2-9b1a-3f9a1c0e5d21", "acme", "shop.acme.example", "Acme Corp"),
    Tenant("0190a4c2-6f1e-7cc2-9b1a-3f9a1c0e5d22", "globex", "shop.globex.example", "Globex"),
]


async def load(key: TenantKey) -> Tenant | None:
    """The resolver's loader: None means no such tenant (cached for negative_ttl)."""
    for tenant in TENANTS:
        if key.value in (UUID(tenant.id), tenant.slug, tenant.host):
            return tenant
    return None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain ASGI app: answers with the tenant the middleware found."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    tenant: Tenant = scope["state"]["tenant"]
    body = json.dumps({"tenant": tenant.slug, "name": tenant.name, "path": scope["path"]})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def listening_socket() -> tuple[int, int]:
    """A socket listening on a free port of 127.0.0.1: (file descriptor, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port: int = sock.getsockname()[1]
    return sock.detach(), port  # hypercorn takes the descriptor over (fd://)


REQUESTS: list[tuple[str, dict[str, str]]] = [
    ("by slug header", {"X-Tenant-Slug": "acme"}),
    ("by Host", {"Host": "shop.globex.example:8080"}),
    ("by uuid header", {"X-Tenant-ID": TENANTS[0].id}),
    ("by slug again (cached)", {"X-Tenant-Slug": "acme"}),
    ("reserved slug", {"X-Tenant-Slug": "admin"}),
    ("unknown slug", {"X-Tenant-Slug": "initech"}),
]


async def serve(backend: str, app: ASGIFramework, config: Config, stop: anyio.Event) -> None:
    """Hypercorn on the running backend, until ``stop`` is set (a graceful shutdown)."""
    if backend == "trio":
        await hypercorn.trio.serve(app, config, shutdown_trigger=stop.wait)
    else:
        await hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)


async def main(backend: str) -> None:
    async with Engine() as engine:
        resolver = await engine.tenant_resolver(load, ttl=60, negative_ttl=5)
        asgi = engine.asgi.TenantMiddleware(app, resolver)

        fd, port = listening_socket()
        config = Config()
        config.bind = [f"fd://{fd}"]
        config.loglevel = "WARNING"
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, backend, cast(ASGIFramework, asgi), config, stop)
            print(f"1. hypercorn ({backend}) serving the app on 127.0.0.1 (a free port)")
            print("2. requests")
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as client:
                for label, headers in REQUESTS:
                    response = await client.get("/orders", headers=headers)
                    shown: Any = response.json()
                    print(f"   {label}: {response.status_code} {json.dumps(shown)}")
            stats = resolver.statistics()
            print(
                f"3. resolver: hits={stats.hits} misses={stats.misses} loads={stats.loads} "
                f"entries={stats.entries}"
            )
            stop.set()
        print("4. server shut down")
    print("done")


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    anyio.run(main, backend, backend=backend)
