"""Cluster mode: engines on many machines share events through Redis Streams.

``Engine("node.db", cluster=RedisStreams("redis://10.0.0.5:6379/0", namespace="shop"))``.
Each engine keeps its own SQLite outbox as the source of truth and forwards
every committed event to stream ``{namespace}:{p}``, ``p`` picked by the
event's ``partition_key()``. A subscription in cluster scope (the default)
is one subscriber across the cluster: each partition is leased to one live
node at a time, and its events are handled there, in stream order. A
subscription in node scope (``scope="node"``) and every projection read
every partition on every node, from positions kept in the node's database.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from typing import Final

import msgspec

from ._cache import check_url, redact

__all__ = ["ClusterMetrics", "RedisStreams", "check_cluster"]

_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
MAX_PARTITIONS: Final = 1024


def _default_node() -> str:
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:60] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisStreams:
    """Where and how engines meet: a Redis URL, a namespace shared by every node of one
    cluster, a partition count fixed for the namespace, this node's name, the lease TTL.

    ``partitions`` is the unit of concurrency and order of a cluster-scope
    subscription; a node that starts with another count than the namespace has
    is refused (changing it is a migration). ``node`` defaults to host, pid and a
    random suffix. ``lease_ttl`` is how long a dead node's partitions wait before
    another node takes them; leases are renewed every ``lease_ttl / 3``.
    ``max_len`` caps each stream (entries beyond it are trimmed and counted).
    """

    __slots__ = ("lease_ttl", "max_len", "namespace", "node", "partitions", "url")

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        partitions: int = 16,
        node: str | None = None,
        lease_ttl: float = 10.0,
        max_len: int | None = None,
    ) -> None:
        self.url = check_url(url)
        if not isinstance(namespace, str):
            raise TypeError(
                f"namespace must be a str, got {type(namespace).__name__} {namespace!r}"
            )
        if not _NAME.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1 to 100 letters, digits, '_', '.' or '-', got {namespace!r}"
            )
        self.namespace = namespace
        if isinstance(partitions, bool) or not isinstance(partitions, int):
            raise TypeError(
                f"partitions must be an int, got {type(partitions).__name__} {partitions!r}"
            )
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")
        self.partitions = partitions
        if node is None:
            node = _default_node()
        elif not isinstance(node, str):
            raise TypeError(f"node must be a str or None, got {type(node).__name__} {node!r}")
        elif not _NAME.fullmatch(node):
            raise ValueError(
                f"node must be 1 to 100 letters, digits, '_', '.' or '-', got {node!r}"
            )
        self.node = node
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float):
            raise TypeError(f"lease_ttl must be a number of seconds, got {lease_ttl!r}")
        if not math.isfinite(lease_ttl) or lease_ttl < 0.3:
            raise ValueError(
                f"lease_ttl must be a finite number of seconds >= 0.3, got {lease_ttl!r}"
            )
        self.lease_ttl = float(lease_ttl)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
            raise TypeError(f"max_len must be an int or None, got {max_len!r}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be an int >= 1 or None, got {max_len!r}")
        self.max_len = max_len

    def __repr__(self) -> str:
        return (
            f"RedisStreams({redact(self.url)!r}, namespace={self.namespace!r}, "
            f"partitions={self.partitions}, node={self.node!r}, lease_ttl={self.lease_ttl})"
        )

    def stream(self, partition: int) -> str:
        """The key of partition ``partition``'s stream."""
        return f"{self.namespace}:{partition}"


def check_cluster(cluster: object, database: str | None) -> None:
    """``Engine``'s ``cluster`` argument: None, or a ``RedisStreams`` with a database."""
    if cluster is None:
        return
    if not isinstance(cluster, RedisStreams):
        raise TypeError(f"cluster must be a RedisStreams, got {type(cluster).__name__}")
    if database is None:
        raise ValueError(
            "a cluster needs a database: its outbox is where events commit before they "
            "are forwarded (Engine('node.db', cluster=...))"
        )


class ClusterMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """This node's view of the cluster (``engine.metrics().cluster``)."""

    node: str
    connected: bool
    """Redis answered the last call."""
    live_nodes: list[str]
    """Nodes whose heartbeat has not expired, this one included."""
    owned: dict[str, list[int]]
    """Per cluster-scope subscription: the partitions this node holds a lease on."""
    forwarding_lag: int
    """Events committed here and not yet in Redis."""
    lag: dict[str, dict[int, int]]
    """Per cluster-scope subscription and partition: entries not yet handled, as
    observed on the node's last beat (every lease_ttl / 3). A subscription is listed
    from the moment it is registered; its partitions appear once a beat observed them."""
    trimmed: int
    """Stream entries this node trimmed (retention and ``max_len``)."""
