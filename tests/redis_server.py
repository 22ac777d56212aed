"""The tests' ``redis-server``: ``RedisServer`` (``engine._redis_server``, which the
pytest plugin ``engine.testing`` uses too) and the rule for a missing binary.

``redis_server_binary()`` finds the binary or, when it is missing, skips the
test (fails it when the ``CI`` environment variable is set: CI must run them).
"""

from __future__ import annotations

import os

import pytest

from engine._redis_server import MISSING, RedisServer, find_redis_server

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips the test (fails it under CI) when it is missing."""
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"this test needs {MISSING}")
        pytest.skip(f"this test needs {MISSING}")
    return binary
