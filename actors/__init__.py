"""actorbus built-in actors: the dispatcher and the subscription handler actors."""

from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import SubscriptionRef as SubscriptionRef

__all__ = ["Dispatcher", "SubscriptionRef"]

# Public names report the package, not the private module they live in.
for _name in __all__:
    globals()[_name].__module__ = "actors"
del _name
