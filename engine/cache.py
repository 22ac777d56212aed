"""Cache backends: the ``CacheBackend`` protocol, ``InMemoryCache`` and ``RedisCache``.

``RedisCache`` must be entered (``async with RedisCache(url) as cache:``) before
use; a backend that cannot serve a call raises ``CacheUnavailable``.
"""

from ._cache import CacheBackend as CacheBackend
from ._cache import CacheStatistics as CacheStatistics
from ._cache import CacheUnavailable as CacheUnavailable
from ._cache import InMemoryCache as InMemoryCache
from ._cache import RedisCache as RedisCache

__all__ = [
    "CacheBackend",
    "CacheStatistics",
    "CacheUnavailable",
    "InMemoryCache",
    "RedisCache",
]
