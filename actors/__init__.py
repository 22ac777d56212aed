"""actorbus built-in actors: dispatcher, subscription handlers, breakers, tenant resolver.

``SubscriptionRef``, ``TenantResolver`` and ``ResolverStatistics`` live in ``engine`` now;
they stay importable from here under their old names.
"""

from engine._resolver import ResolverStatistics as ResolverStatistics
from engine._resolver import TenantResolver as TenantResolver
from engine._routing import SubscriptionRef as SubscriptionRef

from ._breaker import BreakerActor as BreakerActor
from ._dispatcher import Dispatcher as Dispatcher

__all__ = [
    "BreakerActor",
    "Dispatcher",
    "ResolverStatistics",
    "SubscriptionRef",
    "TenantResolver",
]

# Public names report the package, not the private module they live in.
for _name in ("BreakerActor", "Dispatcher"):
    globals()[_name].__module__ = "actors"
del _name
