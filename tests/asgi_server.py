"""A real ASGI server for the tests: hypercorn on a free loopback port."""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

import anyio
import hypercorn.asyncio
import hypercorn.trio
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

from engine.asgi import ASGIApp

__all__ = ["served"]

Serve = Callable[..., Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def served(app: ASGIApp, backend: str) -> AsyncIterator[str]:
    """Hypercorn on 127.0.0.1 (a free port, bound here first), stopped on the way out."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn takes the socket over
    config.graceful_timeout = 5.0
    serve: Serve = hypercorn.trio.serve if backend == "trio" else hypercorn.asyncio.serve
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            functools.partial(serve, cast(ASGIFramework, app), config, shutdown_trigger=stop.wait)
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()
