"""Events on the wire: ``encode``, ``decode`` and the registry of event types by tag.

``decode`` uses one typed msgspec JSON decoder over the union of every registered event
class; it is rebuilt on first use after a new class registers.
"""

from ._events import Event as Event
from ._events import EventDecodeError as EventDecodeError
from ._events import EventValidationError as EventValidationError
from ._events import ValidationErrorKind as ValidationErrorKind
from ._events import decode as decode
from ._events import encode as encode
from ._events import registered_types as registered_types
from ._events import uuid7 as uuid7

__all__ = [
    "Event",
    "EventDecodeError",
    "EventValidationError",
    "ValidationErrorKind",
    "decode",
    "encode",
    "registered_types",
    "uuid7",
]
