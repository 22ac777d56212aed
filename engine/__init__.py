"""actorbus engine: supervised actors with bounded mailboxes on anyio."""

from . import asgi as asgi
from . import cache as cache
from . import catalog as catalog
from . import events as events
from . import tenancy as tenancy
from . import validation as validation
from ._actor import Actor as Actor
from ._actor import ActorRef as ActorRef
from ._backpressure import BackpressureConfig as BackpressureConfig
from ._backpressure import BackpressureError as BackpressureError
from ._backpressure import BackpressureMetrics as BackpressureMetrics
from ._backpressure import BackpressureState as BackpressureState
from ._breaker import BreakerMetrics as BreakerMetrics
from ._breaker import CircuitBreaker as CircuitBreaker
from ._breaker import CircuitBreakerConfig as CircuitBreakerConfig
from ._breaker import CircuitOpenError as CircuitOpenError
from ._breaker import CircuitState as CircuitState
from ._cache import CacheUnavailable as CacheUnavailable
from ._cancel import StrayCancellation as StrayCancellation
from ._deadletters import DeadLetter as DeadLetter
from ._deadletters import DeadLetters as DeadLetters
from ._engine import Engine as Engine
from ._errors import ActorStopped as ActorStopped
from ._errors import AskTimeout as AskTimeout
from ._errors import EngineError as EngineError
from ._errors import MailboxFull as MailboxFull
from ._errors import SupervisorEscalation as SupervisorEscalation
from ._events import Event as Event
from ._events import EventDecodeError as EventDecodeError
from ._events import EventValidationError as EventValidationError
from ._events import ValidationErrorKind as ValidationErrorKind
from ._extras import MissingExtra as MissingExtra
from ._health import Health as Health
from ._metrics import EngineMetrics as EngineMetrics
from ._resolver import ResolverStatistics as ResolverStatistics
from ._resolver import TenantResolver as TenantResolver
from ._routing import SubscriptionRef as SubscriptionRef
from ._store import StorageError as StorageError
from ._store import StorageMetrics as StorageMetrics
from ._store import Transaction as Transaction
from ._store import TransactionControlRefused as TransactionControlRefused
from ._store import TransactionEnded as TransactionEnded
from ._supervision import SupervisorRef as SupervisorRef
from ._system import ActorRestarted as ActorRestarted
from ._system import BackpressureStateChanged as BackpressureStateChanged
from ._system import BreakerStateChanged as BreakerStateChanged
from ._system import DeadLettered as DeadLettered
from ._system import PartitionsRebalanced as PartitionsRebalanced
from ._system import SystemEvent as SystemEvent
from ._types import ActorState as ActorState
from ._types import ActorStatistics as ActorStatistics
from ._types import Backoff as Backoff
from ._types import Overflow as Overflow
from ._types import Restart as Restart
from ._types import Strategy as Strategy
from .tenancy import TenantKey as TenantKey
from .tenancy import TenantNotFound as TenantNotFound
from .tenancy import TenantValidationError as TenantValidationError

__all__ = [
    "Actor",
    "ActorRef",
    "ActorRestarted",
    "ActorState",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "BackpressureConfig",
    "BackpressureError",
    "BackpressureMetrics",
    "BackpressureState",
    "BackpressureStateChanged",
    "Backoff",
    "BreakerMetrics",
    "BreakerStateChanged",
    "CacheUnavailable",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "CircuitState",
    "DeadLetter",
    "DeadLettered",
    "DeadLetters",
    "Engine",
    "EngineError",
    "EngineMetrics",
    "Event",
    "EventDecodeError",
    "EventValidationError",
    "Health",
    "MailboxFull",
    "MissingExtra",
    "Overflow",
    "PartitionsRebalanced",
    "Restart",
    "ResolverStatistics",
    "StorageError",
    "StorageMetrics",
    "Strategy",
    "StrayCancellation",
    "SupervisorEscalation",
    "SubscriptionRef",
    "SupervisorRef",
    "SystemEvent",
    "TenantKey",
    "TenantNotFound",
    "TenantResolver",
    "TenantValidationError",
    "Transaction",
    "TransactionControlRefused",
    "TransactionEnded",
    "ValidationErrorKind",
    "asgi",
    "cache",
    "catalog",
    "events",
    "tenancy",
    "validation",
]

import logging as _logging

# Public names report the package, not the private module they live in
# (reprs, docs and pickles then show engine.Actor, not engine._actor.Actor).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("engine._"):
        _obj.__module__ = "engine"
del _name, _obj

# A library never configures logging; the application decides where records go.
_logging.getLogger("actorbus").addHandler(_logging.NullHandler())
