"""Optional dependencies: what a feature needs beyond ``pip install actorbus``.

The core (in-memory and durable engines, the CLI's database commands) needs anyio,
trio, msgspec and sqlite-utils only. Every Redis feature (``RedisCache``, cluster
mode, ``python -m engine cluster status``) imports coredis where it is first used,
inside ``with needs_redis(feature):``, so that importing ``engine``, ``engine.cache``
or ``engine.cluster`` works without it and using the feature says which extra to
install.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from ._errors import EngineError

__all__ = ["MissingExtra", "missing_extra", "needs_extra", "needs_redis"]


class MissingExtra(EngineError, ImportError):
    """A feature was used whose optional dependency is not installed (an ``ImportError``,
    and an ``EngineError`` as every error the engine raises).

    The message names the feature, the distribution and the extra that installs
    it; the original ``ImportError`` is chained as ``__cause__``.
    """


def missing_extra(feature: str, distribution: str, extra: str) -> MissingExtra:
    """The error for ``feature`` used without ``distribution`` (installed by ``extra``)."""
    return MissingExtra(f"{feature} needs {distribution}: pip install 'actorbus[{extra}]'")


@contextmanager
def needs_extra(feature: str, distribution: str, extra: str) -> Iterator[None]:
    """Turn an ``ImportError`` in the block into ``MissingExtra`` naming ``extra``."""
    try:
        yield
    except ImportError as exc:
        if isinstance(exc, MissingExtra):
            raise
        raise missing_extra(feature, distribution, extra) from exc


def needs_redis(feature: str) -> AbstractContextManager[None]:
    """``with needs_redis("RedisCache"): import coredis``: coredis comes with ``redis``."""
    return needs_extra(feature, "coredis", "redis")
