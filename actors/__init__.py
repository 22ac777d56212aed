"""actorbus built-in actors: dispatcher, subscription handlers, breakers, tenant resolver."""

from ._breaker import BreakerActor as BreakerActor
from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import SubscriptionRef as SubscriptionRef
from ._resolver import ResolverStatistics as ResolverStatistics
from ._resolver import TenantResolver as TenantResolver

__all__ = [
    "BreakerActor",
    "Dispatcher",
    "ResolverStatistics",
    "SubscriptionRef",
    "TenantResolver",
]

# Public names report the package, not the private module they live in.
for _name in __all__:
    globals()[_name].__module__ = "actors"
del _name
