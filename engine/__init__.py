"""actorbus engine: supervised actors with bounded mailboxes on anyio."""

from ._actor import Actor as Actor
from ._actor import ActorRef as ActorRef
from ._deadletters import DeadLetter as DeadLetter
from ._deadletters import DeadLetters as DeadLetters
from ._engine import Engine as Engine
from ._engine import EngineMetrics as EngineMetrics
from ._errors import ActorStopped as ActorStopped
from ._errors import AskTimeout as AskTimeout
from ._errors import EngineError as EngineError
from ._errors import MailboxFull as MailboxFull
from ._errors import SupervisorEscalation as SupervisorEscalation
from ._supervision import SupervisorRef as SupervisorRef
from ._types import ActorState as ActorState
from ._types import ActorStatistics as ActorStatistics
from ._types import Backoff as Backoff
from ._types import Overflow as Overflow
from ._types import Restart as Restart
from ._types import Strategy as Strategy

__all__ = [
    "Actor",
    "ActorRef",
    "ActorState",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Backoff",
    "DeadLetter",
    "DeadLetters",
    "Engine",
    "EngineError",
    "EngineMetrics",
    "MailboxFull",
    "Overflow",
    "Restart",
    "Strategy",
    "SupervisorEscalation",
    "SupervisorRef",
]

import logging as _logging

# Public names report the package, not the private module they live in
# (reprs, docs and pickles then show engine.Actor, not engine._actor.Actor).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("engine._"):
        _obj.__module__ = "engine"
del _name, _obj

# A library never configures logging; the application decides where records go.
_logging.getLogger("actorbus").addHandler(_logging.NullHandler())
