"""The event model: the msgspec base every event derives from, its registry, codec and checks.

msgspec checks types and ``Meta`` constraints only while decoding, and an event built in
Python is published without ever being decoded. So ``Event.validate()`` repeats those
checks on the instance, adds each field's ``Check`` rules and the nil-UUID rule, then the
class's cross-field ``cross_check``; the per-class validator is generated once, on first use.
What validates encodes: ``validate()`` also refuses every value the encoder cannot write
faithfully (an int beyond 64 bits, NaN, a lone surrogate, a UTC offset with seconds, an
object JSON has no form for), so ``publish`` never meets an encoding error later.
"""

import dataclasses
import enum
import functools
import math
import operator
import os
import random
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Final, NoReturn, TypeAlias, cast
from uuid import UUID, SafeUUID

import msgspec
import msgspec.inspect as mi

from ._counters import count_validation_failure
from ._errors import EngineError

__all__ = [
    "Check",
    "Event",
    "EventDecodeError",
    "EventValidationError",
    "Rule",
    "ValidationErrorKind",
    "decode",
    "encode",
    "registered_types",
    "uuid7",
]


# ---------------------------------------------------------------------------
# Errors


class ValidationErrorKind(enum.StrEnum):
    """Which kind of rule an event broke."""

    EMPTY_FIELD = "empty_field"
    FIELD_TOO_LONG = "field_too_long"
    NIL_UUID = "nil_uuid"
    INVALID_VALUE = "invalid_value"
    MISSING_FIELD = "missing_field"
    OUT_OF_RANGE = "out_of_range"
    INVALID_CHARACTERS = "invalid_characters"


class EventValidationError(EngineError, ValueError):
    """An event broke one of its rules; ``field`` names the first offending field."""

    event_type: str
    field: str
    kind: ValidationErrorKind
    message: str

    def __init__(
        self, event_type: str, field: str, kind: ValidationErrorKind, message: str
    ) -> None:
        # All four go to args so the error survives pickling (worker threads, processes).
        super().__init__(event_type, field, kind, message)
        self.event_type = event_type
        self.field = field
        self.kind = kind
        self.message = message
        count_validation_failure(event_type, str(kind))

    def __str__(self) -> str:
        return f"{self.event_type} {self.field}: {self.message} ({self.kind.name})"


class EventDecodeError(EngineError):
    """The input is not a valid encoded event; the underlying error is chained."""


_PREVIEW_CHARS: Final = 40
_ECHO_HEAD: Final = 60
_ECHO_TAIL: Final = 24


def _preview(value: object) -> str:
    """A short repr for error messages: hostile input can be megabytes long."""
    if isinstance(value, int) and value.bit_length() > 128:
        # repr() of a huge int is quadratic and, past 4300 digits, a ValueError.
        sign = "negative " if value < 0 else ""
        return f"<{sign}int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except ValueError:  # a huge int somewhere inside
        return f"<{type(value).__name__}>"
    if len(text) <= _PREVIEW_CHARS:
        return text
    size = f"{len(value)} chars" if isinstance(value, str) else type(value).__name__
    return f"{text[: _PREVIEW_CHARS - 1]}… ({size})"


def _shorten(text: str) -> str:
    """``text`` cut in the middle when long, its length noted.

    For messages that echo input (a decoder naming an unknown 10 MB tag); the tail is
    kept because it says where the input went wrong (msgspec ends with ``- at `$.type```).
    """
    if len(text) <= _ECHO_HEAD + _ECHO_TAIL + 20:
        return text
    return f"{text[:_ECHO_HEAD]}… ({len(text)} chars) …{text[-_ECHO_TAIL:]}"


# ---------------------------------------------------------------------------
# Field rules given as Annotated metadata

Rule: TypeAlias = Callable[[str, str, Any], None]
"""``rule(event_type, field, value)``: raises ``EventValidationError`` or returns."""


class Check:
    """Extra rules for one field, as ``Annotated`` metadata.

    ``kind: Annotated[str, Check(check_not_blank, partial(check_max_bytes, limit=64))]``.
    The rules run in order after the field's type and ``Meta`` checks passed, and never
    for ``None`` (an optional field that is absent has nothing to check). msgspec ignores
    this metadata, so decoding is unaffected.
    """

    __slots__ = ("rules",)

    rules: tuple[Rule, ...]

    def __init__(self, *rules: Rule) -> None:
        for rule in rules:
            if not callable(rule):
                raise TypeError(f"Check rules must be callables, got {rule!r}")
        self.rules = rules

    def __repr__(self) -> str:
        return f"Check({', '.join(map(repr, self.rules))})"


def _must_be_utc(event_type: str, field: str, value: datetime) -> None:
    if value.tzinfo is not UTC and value.utcoffset() != _ZERO:
        raise EventValidationError(
            event_type,
            field,
            ValidationErrorKind.INVALID_VALUE,
            f"must be in UTC, got offset {value.utcoffset()}",
        )


_ZERO: Final = timedelta(0)
# For a rule of the generated validators: a condition on ``v`` true only for
# values that certainly pass it (the rule is then not called).
_RULE_PASSES: Final[dict[Rule, str]] = {_must_be_utc: "v.tzinfo is _UTC"}
_MINUTE: Final = timedelta(minutes=1)

# What msgspec writes and reads natively (int64 and uint64). Its JSON encoder writes
# larger ints too, up to Python's int-to-str digit limit, a process-wide setting, and
# its decoder reads at most 4300 characters: a fixed range keeps "what validates
# encodes" independent of both and of what a consumer in another language can read.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_BEYOND_64_BITS: Final = " (events carry 64-bit integers)"


# ---------------------------------------------------------------------------
# UUID version 7

# A private generator: the ids need uniqueness, not secrecy, and os.urandom costs a
# system call per event. It is reseeded in forked children so they do not repeat ids.
_rng = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rng.seed)
_uuid7_lock = threading.Lock()
_uuid7_last_ms = 0
_uuid7_counter = 0
_COUNTER_MAX: Final = (1 << 42) - 1
_V7_FLAGS: Final = (7 << 76) | (0b10 << 62)
_new_uuid = object.__new__
_set_attr = object.__setattr__
_UNKNOWN_SAFETY: Final = SafeUUID.unknown


def uuid7() -> UUID:
    """A new time-ordered UUID (RFC 9562 version 7), strictly increasing within the process.

    Layout: 48-bit Unix milliseconds, then a 42-bit counter spread over ``rand_a`` and the
    top of ``rand_b`` (RFC 9562 method 1), then 32 random bits. The counter starts at a
    random value below 2**41 each millisecond; if the clock stands still or steps back,
    the previous millisecond is kept and the counter advances, so order never breaks.
    """
    global _uuid7_last_ms, _uuid7_counter
    with _uuid7_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _uuid7_last_ms:
            counter = _rng.getrandbits(41)
        else:
            now_ms = _uuid7_last_ms
            counter = _uuid7_counter + 1
            if counter > _COUNTER_MAX:
                now_ms += 1
                counter = _rng.getrandbits(41)
        _uuid7_last_ms = now_ms
        _uuid7_counter = counter
        tail = _rng.getrandbits(32)
    value = (
        ((now_ms & 0xFFFF_FFFF_FFFF) << 80)
        | ((counter >> 30) << 64)
        | ((counter & 0x3FFF_FFFF) << 32)
        | tail
        | _V7_FLAGS
    )
    # UUID(int=...) re-validates what we just built and is twice as slow.
    result = _new_uuid(UUID)
    _set_attr(result, "int", value)
    _set_attr(result, "is_safe", _UNKNOWN_SAFETY)
    return result


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------
# Registry


class _EventMeta(msgspec.StructMeta):
    """Registers every concrete ``Event`` subclass by tag as the class is created.

    A metaclass rather than ``__init_subclass__``: msgspec fills in ``__struct_config__``
    (and so the tag) only after ``__init_subclass__`` has run.
    """

    def __new__(
        mcls,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        /,
        *,
        abstract: bool = False,
        **kwargs: Any,
    ) -> "_EventMeta":
        # msgspec applies kw_only to the fields a class itself declares, not to inherited
        # ones: without this a subclass's fields would be positional, and a required
        # field could not follow an optional one.
        kwargs.setdefault("kw_only", True)
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        _refuse_shadowing_fields(cls)
        type.__setattr__(cls, "__event_abstract__", abstract)
        if not abstract:
            _register(cast("type[Event]", cls), explicit_tag="tag" in kwargs)
        return cls


# The methods the engine calls on an event. A field is a slot on the class, so a field
# with one of these names would replace the method and the engine would call its value.
_METHOD_NAMES: Final = ("validate", "cross_check", "_check", "partition_key")


def _refuse_shadowing_fields(cls: type) -> None:
    fields = cast("type[msgspec.Struct]", cls).__struct_fields__
    for name in _METHOD_NAMES:
        if name in fields:
            raise TypeError(
                f"{cls.__qualname__}: an event field may not be named {name!r}, since it would"
                f" hide the method Event.{name}; pick another name (msgspec.field(name=...)"
                " keeps the encoded name)"
            )


_registry_lock = threading.Lock()
_by_tag: dict[str, "type[Event]"] = {}
_decoder: msgspec.json.Decoder[Any] | None = None
_encoder: Final = msgspec.json.Encoder()


def _register(cls: "type[Event]", *, explicit_tag: bool) -> None:
    global _decoder
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str) or not tag or tag != tag.strip():
        raise TypeError(f"{cls.__qualname__}: an event tag must be a non-empty string, got {tag!r}")
    _check_decodable(cls)
    with _registry_lock:
        existing = _by_tag.get(tag)
        if existing is not None and not _same_definition(existing, cls):
            if not explicit_tag and issubclass(cls, existing):
                raise TypeError(
                    f"{cls.__qualname__} inherits the tag {tag!r} from {existing.__qualname__};"
                    f" give it its own: class {cls.__name__}({existing.__name__}, tag='...')"
                )
            raise TypeError(
                f"event tag {tag!r} of {cls.__module__}.{cls.__qualname__} is already used by"
                f" {existing.__module__}.{existing.__qualname__}; every event needs its own tag"
            )
        _by_tag[tag] = cls
        type.__setattr__(cls, "event_type", tag)
        _decoder = None


def _check_decodable(cls: "type[Event]") -> None:
    """Refuse a class msgspec cannot decode (``str | datetime``, an int bound beyond 64 bits).

    Every event is decoded by one decoder of the union of all registered classes: one such
    class registered would make every ``decode()`` fail, the relay's included.
    """
    try:
        msgspec.json.Decoder(cls)
    except NameError:
        # A forward reference (to the class itself, or to one defined below it) resolves
        # only once its module has run; the union decoder meets it later.
        return
    except Exception as exc:
        raise TypeError(f"{cls.__qualname__} cannot be decoded from JSON: {exc}") from exc


def _same_definition(old: "type[Event]", new: "type[Event]") -> bool:
    # A module reloaded or a test run twice defines the "same" class again: replace it.
    return old.__module__ == new.__module__ and old.__qualname__ == new.__qualname__


def registered_types() -> Mapping[str, "type[Event]"]:
    """A snapshot of the registered event classes by tag."""
    with _registry_lock:
        return types.MappingProxyType(dict(_by_tag))


def _current_decoder() -> msgspec.json.Decoder[Any]:
    global _decoder
    decoder = _decoder
    if decoder is not None:
        # No lock on the hot path: a decode racing a registration uses the decoder of
        # just before it, as it would had it started a moment earlier.
        return decoder
    with _registry_lock:
        if _decoder is None:
            classes = list(_by_tag.values())
            if not classes:
                raise EventDecodeError("no event types are registered")
            union = functools.reduce(operator.or_, classes)
            _decoder = msgspec.json.Decoder(union)
        return _decoder


# ---------------------------------------------------------------------------
# The base class


# dataclass_transform tells type checkers what _EventMeta does at run time: msgspec's
# own transform on Struct makes no field keyword-only and no subclass frozen by default.
@typing.dataclass_transform(
    kw_only_default=True, frozen_default=True, field_specifiers=(msgspec.field,)
)
class Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field="type",
    metaclass=_EventMeta,
    abstract=True,
):
    """Base of every event: frozen, keyword-only, tagged by ``type`` on the wire.

    A subclass names its tag: ``class OrderPlaced(Event, tag="order.placed")``. Tags are
    unique; a clash is a ``TypeError`` when the class is created. A base meant only to
    share fields or rules passes ``abstract=True`` and is not registered.

    Fields are checked by ``validate()``: declared types, ``msgspec.Meta`` constraints,
    the rules of each field's ``Check`` metadata, every UUID is not the nil UUID, every
    value can be encoded (integers within 64 bits, ``OUT_OF_RANGE``), then the cross-field
    rules of ``cross_check``. A class msgspec could not decode is refused when it is
    defined, and so is a field named after a method of ``Event`` (``validate``,
    ``cross_check``, ``_check``).
    """

    __event_abstract__: ClassVar[bool]
    event_type: ClassVar[str]
    """The tag, the ``type`` of the encoded event."""

    id: UUID = msgspec.field(default_factory=uuid7)
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True), Check(_must_be_utc)] = msgspec.field(
        default_factory=_utc_now
    )
    tenant_id: UUID | None = None
    actor_id: UUID | None = None
    correlation_id: UUID | None = None
    causation_id: UUID | None = None
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 1

    def validate(self) -> None:
        """Raise ``EventValidationError`` for the first broken rule, field by field."""
        validator = _validators.get(self.__class__)
        if validator is None:
            validator = _validator_for(self.__class__)
        validator(self)

    def partition_key(self) -> str:
        """What picks this event's stream partition in a cluster (the event id by default).

        Override it (``return self.order``) to keep the events of one key in order
        cluster-wide: events with the same key go to the same partition.
        """
        return str(self.id)

    def cross_check(self) -> None:
        """Cross-field rules: override, call ``super().cross_check()``, raise
        ``EventValidationError``.

        ``validate()`` runs it after every field passed its own checks, so it may rely on
        their types. Call ``validate()``, not this, to check an event.
        """

    def _check(self) -> None:
        """The former spelling of ``cross_check``, still honoured: override ``cross_check``.

        A class overriding ``_check`` (and calling ``super()._check()``) is validated as
        before, bases' rules first, its own next: this default runs the ``cross_check``
        chain, where the rules of bases written in the new spelling live.
        """
        self.cross_check()


# ---------------------------------------------------------------------------
# Validation plans


class _Invalid(Exception):
    """A broken rule found below the field level; ``validate`` adds the event and field."""

    __slots__ = ("kind", "message", "path", "type_mismatch")

    def __init__(
        self,
        kind: ValidationErrorKind,
        message: str,
        *,
        path: str = "",
        type_mismatch: bool = False,
    ) -> None:
        self.kind = kind
        self.message = message
        self.path = path
        # Lets a union tell "not this member" from "this member, but a broken constraint".
        self.type_mismatch = type_mismatch


_Checker: TypeAlias = Callable[[Any], None]
_FieldPlan: TypeAlias = tuple[str, mi.Type, _Checker, tuple[Rule, ...]]

_validators: dict[type, Callable[[Any], None]] = {}
_struct_checkers: dict[type, _Checker] = {}
_plan_lock = threading.RLock()


def _field_plans(cls: type[msgspec.Struct]) -> list[_FieldPlan]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    hints = typing.get_type_hints(cls, include_extras=True)
    return [
        (
            field.name,
            field.type,
            _compile(field.type),
            tuple(rule for check in _checks_in(hints[field.name]) for rule in check.rules),
        )
        for field in info.fields
    ]


def _validator_for(cls: type[Event]) -> Callable[[Any], None]:
    if cls.__dict__.get("__event_abstract__", True):
        raise TypeError(
            f"{cls.__qualname__} is abstract: only registered event subclasses can be validated"
        )
    with _plan_lock:
        validator = _validators.get(cls)
        if validator is None:
            validator = _generate_validator(cls)
            _validators[cls] = validator
        return validator


def _generate_validator(cls: type[Event]) -> Callable[[Any], None]:
    """One straight-line function per class, as dataclasses builds ``__init__``.

    ``validate()`` runs on every publish. A generic loop over per-field closures spends
    most of its time on the loop and the calls; here each field costs an attribute read
    and, for the common types, an inline test that only calls the full checker when the
    value might be wrong. Field names are identifiers (msgspec takes them from class
    annotations) and every other value reaches the code through its namespace, never
    through the source text.
    """
    event_type = cls.event_type
    namespace: dict[str, Any] = {"_UUID": UUID, "_datetime": datetime, "_UTC": UTC, "T": event_type}
    lines = ["def validate(self):"]
    for index, (name, info, checker, rules) in enumerate(_field_plans(cls)):
        if not name.isidentifier():  # pragma: no cover - msgspec refuses such fields
            raise TypeError(f"{cls.__qualname__}: field name {name!r} is not an identifier")
        lines.append(f"    v = self.{name}")
        namespace[f"c{index}"] = _reporting(event_type, name, checker)
        guard = _fast_guard(info)
        call = f"c{index}(v)"
        lines.append(f"    if {guard}: {call}" if guard else f"    {call}")
        if rules:
            lines.append("    if v is not None:")
            for number, rule in enumerate(rules):
                namespace[f"r{index}_{number}"] = rule
                # A rule with a known pass (a datetime already in UTC) is not called for it.
                passes = _RULE_PASSES.get(rule)
                when = f"if not ({passes}): " if passes else ""
                lines.append(f"        {when}r{index}_{number}(T, {name!r}, v)")
    hook = _cross_check_hook(cls)
    if hook is not None:
        lines.append(f"    self.{hook}()")
    lines.append("    return None")
    exec("\n".join(lines), namespace)
    validator: Callable[[Any], None] = namespace["validate"]
    validator.__qualname__ = f"{cls.__qualname__}.validate"
    return validator


def _cross_check_hook(cls: type[Event]) -> str | None:
    """The method ``validate()`` calls for cross-field rules, or None when no class below
    ``Event`` defines any (most events: their validator skips the call altogether).

    ``_check`` when some class still uses the former spelling: its override calls
    ``super()._check()``, which reaches ``Event._check`` and so the ``cross_check`` chain.
    """
    hook = None
    for klass in cls.__mro__:
        if klass is Event:
            break
        if "_check" in vars(klass):
            return "_check"
        if "cross_check" in vars(klass):
            hook = "cross_check"
    return hook


def _reporting(event_type: str, field: str, checker: _Checker) -> _Checker:
    """``checker`` raising ``EventValidationError`` for this field of this event type."""

    def check_field(value: Any) -> None:
        try:
            checker(value)
        except _Invalid as exc:
            raise EventValidationError(
                event_type, field + exc.path, exc.kind, exc.message
            ) from None

    return check_field


_GUARD_FAILING: Final = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


def _fast_guard(t: mi.Type) -> str | None:
    """A condition on ``v`` that is false only for values that certainly pass ``t``.

    When it is true the full checker runs and decides; ``None`` means always run it.
    """
    if isinstance(t, mi.UUIDType):
        return "v.__class__ is not _UUID or not v.int"
    if isinstance(t, mi.UnionType) and len(t.types) == 2 and isinstance(t.types[1], mi.NoneType):
        inner = _fast_guard(t.types[0])
        return f"v is not None and ({inner})" if inner else None
    if isinstance(t, mi.IntType) and t.multiple_of is None:
        guard = "v.__class__ is not int"
        for _, limit, symbol, _ in _int_bounds(t):
            guard += f" or v {_GUARD_FAILING[symbol]} {int(limit)!r}"
        return guard
    if (
        isinstance(t, mi.StrType)
        and t.min_length is None
        and t.max_length is None
        and not t.pattern
    ):
        return "v.__class__ is not str or not v.isascii()"
    if isinstance(t, mi.BoolType):
        return "v is not True and v is not False"
    if isinstance(t, mi.DateTimeType) and t.tz is not False:
        return "v.__class__ is not _datetime or v.tzinfo is not _UTC"
    if isinstance(t, mi.AnyType):
        return "v is not None"
    return None


def _checks_in(hint: Any) -> list[Check]:
    """``Check`` metadata on a field, also inside ``X | None`` (rules skip ``None``)."""
    found: list[Check] = []
    if typing.get_origin(hint) is Annotated:
        found.extend(meta for meta in hint.__metadata__ if isinstance(meta, Check))
        found.extend(_checks_in(typing.get_args(hint)[0]))
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        for member in typing.get_args(hint):
            found.extend(_checks_in(member))
    return found


def _wrong_type(expected: str, value: object) -> _Invalid:
    if value is None or value is msgspec.UNSET:
        return _Invalid(
            ValidationErrorKind.MISSING_FIELD,
            f"is required ({expected}), got {value!r}",
            type_mismatch=True,
        )
    return _Invalid(
        ValidationErrorKind.INVALID_VALUE,
        f"must be {expected}, got {type(value).__name__} {_preview(value)}",
        type_mismatch=True,
    )


def _fail(kind: ValidationErrorKind, message: str) -> NoReturn:
    raise _Invalid(kind, message)


def _compile(t: mi.Type) -> _Checker:
    """A checker for values of the inspected type.

    Every checker also refuses what the encoder cannot write faithfully, so an event that
    passed ``validate()`` encodes; ``Any`` means any value the encoder can write.
    """
    if isinstance(t, mi.AnyType):
        return _check_encodable
    if isinstance(t, mi.UUIDType):
        return _check_uuid
    if isinstance(t, mi.UnionType):
        return _compile_union(t)
    if isinstance(t, mi.NoneType):
        return _check_none
    if isinstance(t, mi.BoolType):
        return _check_bool
    if isinstance(t, mi.IntType):
        return _compile_int(t)
    if isinstance(t, mi.FloatType):
        return _compile_float(t)
    if isinstance(t, mi.StrType):
        return _compile_str(t)
    if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
        return _compile_bytes(t)
    if isinstance(t, mi.DateTimeType):
        return _compile_tz_aware(datetime, "datetime", t.tz)
    if isinstance(t, mi.TimeType):
        return _compile_tz_aware(dt_time, "time", t.tz)
    if isinstance(t, mi.DateType):
        return _check_date
    if isinstance(t, mi.TimeDeltaType):
        return _compile_instance(timedelta, "timedelta")
    if isinstance(t, mi.DecimalType):
        return _compile_instance(Decimal, "Decimal")
    if isinstance(t, mi.LiteralType):
        return _compile_literal(t)
    if isinstance(t, mi.EnumType):
        # msgspec refuses to decode enums and literals whose values JSON cannot carry.
        return _compile_instance(t.cls, t.cls.__name__)
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return _compile_collection(t)
    if isinstance(t, mi.TupleType):
        return _compile_tuple(t)
    if isinstance(t, mi.DictType | mi.FrozenDictType):
        return _compile_dict(t)
    if isinstance(t, mi.StructType | mi.DataclassType):
        return _compile_record(t.cls)
    if isinstance(t, mi.NamedTupleType):
        return _compile_named_tuple(t)
    if isinstance(t, mi.TypedDictType):
        return _compile_typed_dict(t)
    if isinstance(t, mi.RawType):
        return _compile_instance(msgspec.Raw, "msgspec.Raw")
    if isinstance(t, mi.CustomType):
        return _compile_custom(t.cls)
    # Types that cannot appear in JSON (msgpack Ext) or that msgspec adds later: whatever
    # the value, it must get through the encoder.
    return _check_encodable


def _check_uuid(value: Any) -> None:
    if value.__class__ is not UUID and not isinstance(value, UUID):
        raise _wrong_type("a UUID", value)
    if not value.int:
        raise _Invalid(ValidationErrorKind.NIL_UUID, "must not be the nil UUID")


def _check_optional_uuid(value: Any) -> None:
    if value is not None:
        _check_uuid(value)


def _check_none(value: Any) -> None:
    if value is not None:
        raise _wrong_type("None", value)


def _check_bool(value: Any) -> None:
    if value is not True and value is not False:
        raise _wrong_type("a bool", value)


def _check_date(value: Any) -> None:
    if not isinstance(value, date) or isinstance(value, datetime):
        raise _wrong_type("a date", value)


def _compile_union(t: mi.UnionType) -> _Checker:
    if any(isinstance(member, mi.AnyType) for member in t.types):
        return _check_encodable
    members = [_compile(member) for member in t.types]
    checkers = [member for member in members if member is not _check_none]
    optional = len(checkers) < len(members)
    if optional and checkers == [_check_uuid]:
        return _check_optional_uuid
    expected = " | ".join(_describe(member) for member in t.types)

    def check_union(value: Any) -> None:
        if value is None and optional:
            return
        for checker in checkers:
            try:
                checker(value)
            except _Invalid as exc:
                if not exc.type_mismatch:
                    raise
            else:
                return
        raise _wrong_type(expected, value)

    return check_union


def _describe(t: mi.Type) -> str:
    if isinstance(t, mi.NoneType):
        return "None"
    if isinstance(t, mi.UUIDType):
        return "UUID"
    if isinstance(t, mi.StructType | mi.EnumType | mi.CustomType | mi.DataclassType):
        return t.cls.__name__
    return type(t).__name__.removesuffix("Type").lower()


# ------------------------------------------------------------------ numbers

_Bound: TypeAlias = tuple[Callable[[Any, Any], bool], Any, str, str]
"""``(test, limit, symbol, why)``: ``test(value, limit)`` is true for a value within it."""


def _declared_bounds(t: mi.IntType | mi.FloatType) -> list[_Bound]:
    return [
        (test, limit, symbol, "")
        for limit, test, symbol in (
            (t.ge, operator.ge, ">="),
            (t.gt, operator.gt, ">"),
            (t.le, operator.le, "<="),
            (t.lt, operator.lt, "<"),
        )
        if limit is not None
    ]


def _int_bounds(t: mi.IntType) -> list[_Bound]:
    """The declared bounds, then the 64-bit range where they do not already imply it."""
    bounds = _declared_bounds(t)
    ge, gt, le, lt = t.ge, t.gt, t.le, t.lt
    if not ((ge is not None and ge >= _INT_MIN) or (gt is not None and gt >= _INT_MIN - 1)):
        bounds.append((operator.ge, _INT_MIN, ">=", _BEYOND_64_BITS))
    if not ((le is not None and le <= _INT_MAX) or (lt is not None and lt <= _INT_MAX + 1)):
        bounds.append((operator.le, _INT_MAX, "<=", _BEYOND_64_BITS))
    return bounds


def _out_of_range(symbol: str, limit: Any, why: str, value: Any) -> NoReturn:
    _fail(ValidationErrorKind.OUT_OF_RANGE, f"must be {symbol} {limit}{why}, got {_preview(value)}")


def _check_int_range(value: int) -> None:
    if value < _INT_MIN:
        _out_of_range(">=", _INT_MIN, _BEYOND_64_BITS, value)
    if value > _INT_MAX:
        _out_of_range("<=", _INT_MAX, _BEYOND_64_BITS, value)


def _check_finite(value: float) -> None:
    if not math.isfinite(value):
        # JSON has no NaN or infinity: msgspec would write null.
        _fail(ValidationErrorKind.INVALID_VALUE, f"must be a finite number, got {value!r}")


def _is_int(value: Any) -> bool:
    return value.__class__ is int or (isinstance(value, int) and not isinstance(value, bool))


def _is_float(value: Any) -> bool:
    if value.__class__ is float or isinstance(value, float):
        _check_finite(value)
        return True
    # msgspec decodes a JSON integer into a float field, so ints are floats here too; one
    # is written as an integer, so it has the range of one.
    if _is_int(value):
        _check_int_range(value)
        return True
    return False


def _compile_int(t: mi.IntType) -> _Checker:
    return _compile_number(_int_bounds(t), t.multiple_of, _is_int, "an int")


def _compile_float(t: mi.FloatType) -> _Checker:
    return _compile_number(_declared_bounds(t), t.multiple_of, _is_float, "a float")


def _compile_number(
    bounds: list[_Bound],
    multiple_of: float | None,
    is_type: Callable[[Any], bool],
    description: str,
) -> _Checker:
    if not bounds and multiple_of is None:

        def check_plain(value: Any) -> None:
            if not is_type(value):
                raise _wrong_type(description, value)

        return check_plain

    def check_number(value: Any) -> None:
        if not is_type(value):
            raise _wrong_type(description, value)
        for test, limit, symbol, why in bounds:
            if not test(value, limit):
                _out_of_range(symbol, limit, why, value)
        if multiple_of is not None and value % multiple_of:
            _fail(
                ValidationErrorKind.INVALID_VALUE,
                f"must be a multiple of {multiple_of}, got {_preview(value)}",
            )

    return check_number


# ------------------------------------------------------------- text, bytes, time


def _check_length(value: Any, min_length: int | None, max_length: int | None, unit: str) -> None:
    size = len(value)
    if max_length is not None and size > max_length:
        _fail(
            ValidationErrorKind.FIELD_TOO_LONG,
            f"must be at most {max_length} {unit}, got {size}: {_preview(value)}",
        )
    if min_length is not None and size < min_length:
        if size == 0:
            _fail(ValidationErrorKind.EMPTY_FIELD, "must not be empty")
        _fail(
            ValidationErrorKind.INVALID_VALUE,
            f"must be at least {min_length} {unit}, got {size}: {_preview(value)}",
        )


def _check_text(value: str) -> None:
    """Refuse a lone surrogate: UTF-8 cannot hold one, so msgspec cannot write it."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            _fail(
                ValidationErrorKind.INVALID_CHARACTERS,
                f"must be valid Unicode text, got a lone surrogate at {exc.start}",
            )


def _compile_str(t: mi.StrType) -> _Checker:
    min_length, max_length = t.min_length, t.max_length
    # msgspec matches patterns with re.search, so must this.
    search = re.compile(t.pattern).search if t.pattern is not None else None
    pattern = t.pattern

    def check_str(value: Any) -> None:
        if not isinstance(value, str):
            raise _wrong_type("a str", value)
        _check_text(value)
        if min_length is not None or max_length is not None:
            _check_length(value, min_length, max_length, "characters")
        if search is not None and search(value) is None:
            _fail(
                ValidationErrorKind.INVALID_VALUE,
                f"must match {pattern!r}, got {_preview(value)}",
            )

    return check_str


def _compile_bytes(t: mi.BytesType | mi.ByteArrayType | mi.MemoryViewType) -> _Checker:
    min_length, max_length = t.min_length, t.max_length
    accepted = (bytes, bytearray, memoryview)

    def check_bytes(value: Any) -> None:
        if not isinstance(value, accepted):
            raise _wrong_type("bytes", value)
        _check_length(value, min_length, max_length, "bytes")

    return check_bytes


def _check_offset(value: datetime | dt_time) -> None:
    offset = value.utcoffset()
    if offset is not None and offset % _MINUTE:
        # msgspec writes hours and minutes and drops the rest: the instant would move.
        _fail(
            ValidationErrorKind.INVALID_VALUE,
            f"must have a UTC offset of whole minutes, got {offset} in {value.isoformat()}",
        )


def _compile_tz_aware(cls: type[datetime | dt_time], expected: str, tz: bool | None) -> _Checker:
    need = "timezone-aware" if tz else "naive (no timezone)"

    def check_moment(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(f"a {expected}", value)
        if tz is not None and (value.utcoffset() is not None) is not tz:
            _fail(ValidationErrorKind.INVALID_VALUE, f"must be {need}, got {value.isoformat()}")
        _check_offset(value)

    return check_moment


def _compile_instance(cls: type, expected: str) -> _Checker:
    article = "" if expected.startswith(("a ", "an ")) else "a "

    def check_instance(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(f"{article}{expected}", value)

    return check_instance


def _compile_literal(t: mi.LiteralType) -> _Checker:
    # Keyed by type too: True == 1, yet Literal[1] must refuse True.
    allowed = frozenset((type(v), v) for v in t.values)
    shown = ", ".join(map(repr, t.values))

    def check_literal(value: Any) -> None:
        try:
            ok = (type(value), value) in allowed
        except TypeError:  # unhashable
            ok = False
        if not ok:
            raise _wrong_type(f"one of {shown}", value)

    return check_literal


# ------------------------------------------------------------------ containers


def _nested(exc: _Invalid, path: str) -> _Invalid:
    exc.path = path + exc.path
    # The container itself had the right type: a union must report this, not try another.
    exc.type_mismatch = False
    return exc


def _compile_collection(
    t: mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType,
) -> _Checker:
    cls: type[Any] = {
        mi.ListType: list,
        mi.VarTupleType: tuple,
        mi.SetType: set,
        mi.FrozenSetType: frozenset,
    }[type(t)]
    expected = f"a {cls.__name__}"
    item = _compile(t.item_type)
    min_length, max_length = t.min_length, t.max_length
    indexed = cls in (list, tuple)

    def check_collection(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(expected, value)
        _check_length(value, min_length, max_length, "items")
        for index, element in enumerate(value):
            try:
                item(element)
            except _Invalid as exc:
                raise _nested(exc, f"[{index}]" if indexed else "[*]") from None

    return check_collection


def _compile_tuple(t: mi.TupleType) -> _Checker:
    items = [_compile(member) for member in t.item_types]
    size = len(items)

    def check_tuple(value: Any) -> None:
        if not isinstance(value, tuple):
            raise _wrong_type("a tuple", value)
        if len(value) != size:
            _fail(
                ValidationErrorKind.INVALID_VALUE,
                f"must have exactly {size} items, got {len(value)}",
            )
        for index, (item, element) in enumerate(zip(items, value, strict=True)):
            try:
                item(element)
            except _Invalid as exc:
                raise _nested(exc, f"[{index}]") from None

    return check_tuple


def _compile_dict(t: mi.DictType | mi.FrozenDictType) -> _Checker:
    key, item = _compile(t.key_type), _compile(t.value_type)
    if key is _check_encodable:
        key = _check_key
    min_length, max_length = t.min_length, t.max_length
    # msgspec writes dicts (subclasses too) but no other mapping (mappingproxy, UserDict).
    cls: type[Any] = dict if isinstance(t, mi.DictType) else Mapping

    def check_dict(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type("a dict", value)
        _check_length(value, min_length, max_length, "items")
        for k, v in value.items():
            try:
                key(k)
                item(v)
            except _Invalid as exc:
                raise _nested(exc, f"[{_preview(k)}]") from None

    return check_dict


def _compile_named_tuple(t: mi.NamedTupleType) -> _Checker:
    fields = [(field.name, _compile(field.type)) for field in t.fields]
    cls: type[tuple[Any, ...]] = t.cls

    def check_named_tuple(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(f"a {cls.__name__}", value)
        for (name, check), item in zip(fields, value, strict=True):
            try:
                check(item)
            except _Invalid as exc:
                raise _nested(exc, f".{name}") from None

    return check_named_tuple


def _compile_typed_dict(t: mi.TypedDictType) -> _Checker:
    fields = [(field.name, _compile(field.type), field.required) for field in t.fields]
    known = frozenset(name for name, _, _ in fields)

    def check_typed_dict(value: Any) -> None:
        if not isinstance(value, dict):
            raise _wrong_type("a dict", value)
        for name, check, required in fields:
            try:
                if name in value:
                    check(value[name])
                elif required:
                    raise _wrong_type("a value", None)
            except _Invalid as exc:
                raise _nested(exc, f"[{name!r}]") from None
        if len(value) > len(known) or not known.issuperset(value):
            # Keys it does not declare are written too (and ignored when decoded).
            for k, v in value.items():
                if k not in known:
                    try:
                        _check_key(k)
                        _walk(v)
                    except _Invalid as exc:
                        raise _nested(exc, f"[{_preview(k)}]") from None

    return check_typed_dict


def _compile_record(cls: type) -> _Checker:
    """A struct or dataclass: its own class's fields, looked up on first use.

    On first use because a struct may refer to itself, directly or through others; by
    the value's own class because a subclass may add fields.
    """

    def check_record(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(f"a {cls.__name__}", value)
        checker = _struct_checkers.get(type(value))
        if checker is None:
            checker = _record_checker(type(value))
        checker(value)

    return check_record


def _record_checker(cls: type) -> _Checker:
    """Types and ``Meta`` constraints of a nested struct or dataclass (``Check`` rules
    belong to events)."""
    with _plan_lock:
        checker = _struct_checkers.get(cls)
        if checker is not None:
            return checker
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType | mi.DataclassType)
        names_and_checks = [(field.name, _compile(field.type)) for field in info.fields]
        is_struct = isinstance(info, mi.StructType)

        def check_fields(value: Any) -> None:
            values = (
                msgspec.structs.astuple(value)
                if is_struct
                else [getattr(value, name, msgspec.UNSET) for name, _ in names_and_checks]
            )
            for (name, check), field_value in zip(names_and_checks, values, strict=True):
                try:
                    check(field_value)
                except _Invalid as exc:
                    raise _nested(exc, f".{name}") from None

        _struct_checkers[cls] = check_fields
        return check_fields


def _compile_custom(cls: type) -> _Checker:
    def check_custom(value: Any) -> None:
        if not isinstance(value, cls):
            raise _wrong_type(f"a {cls.__name__}", value)
        _walk(value)

    return check_custom


# ------------------------------------------------------------------ Any

# Written as they are, whatever they hold.
_PLAIN_LEAVES: Final = (UUID, Decimal, date, timedelta, bytes, bytearray, memoryview, msgspec.Raw)
_ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def _check_encodable(value: Any) -> None:
    """A value of a field typed ``Any`` (or a type msgspec cannot check): it must encode.

    Walks what JSON is made of, so a broken value is named by its path and kind; anything
    else is handed to the encoder itself.
    """
    try:
        _walk(value)
    except RecursionError:
        _fail(ValidationErrorKind.INVALID_VALUE, "is nested too deeply (or holds itself)")


def _walk(value: Any) -> None:
    cls = value.__class__
    if value is None or cls is bool:
        return
    if cls is str:
        _check_text(value)
    elif cls is int:
        _check_int_range(value)
    elif cls is float:
        _check_finite(value)
    elif value is msgspec.UNSET:
        raise _wrong_type("a value", value)
    elif isinstance(value, str):
        _check_text(value)
    elif isinstance(value, int):
        _check_int_range(value)
    elif isinstance(value, float):
        _check_finite(value)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            try:
                _walk(item)
            except _Invalid as exc:
                raise _nested(exc, f"[{index}]") from None
    elif isinstance(value, dict):
        for k, item in value.items():
            try:
                _check_key(k)
                _walk(item)
            except _Invalid as exc:
                raise _nested(exc, f"[{_preview(k)}]") from None
    elif isinstance(value, set | frozenset):
        for item in value:
            try:
                _walk(item)
            except _Invalid as exc:
                raise _nested(exc, "[*]") from None
    elif isinstance(value, msgspec.Struct):
        for name, item in zip(value.__struct_fields__, msgspec.structs.astuple(value), strict=True):
            _walk_field(name, item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _walk_field(field.name, getattr(value, field.name, msgspec.UNSET))
    elif isinstance(value, datetime | dt_time):
        _check_offset(value)
    elif not isinstance(value, _PLAIN_LEAVES):
        _try_encoding(value)


def _walk_field(name: str, value: Any) -> None:
    if value is not msgspec.UNSET:  # msgspec leaves the field out
        try:
            _walk(value)
        except _Invalid as exc:
            raise _nested(exc, f".{name}") from None


def _check_key(key: Any) -> None:
    """A dict key of a loosely typed dict: msgspec writes only str-like and number-like ones."""
    _walk(key)
    if key.__class__ is not str and key.__class__ is not int:
        _try_encoding({key: None})


def _try_encoding(value: Any) -> None:
    try:
        _encoder.encode(value)
    except _ENCODE_ERRORS as exc:
        _fail(
            ValidationErrorKind.INVALID_VALUE,
            f"cannot be encoded as JSON: {_shorten(str(exc))}",
        )


# ---------------------------------------------------------------------------
# Codec


def encode(event: Event) -> bytes:
    """The event as JSON, ``type`` first. Call ``validate()`` first: encoding checks nothing."""
    if not isinstance(event, Event) or event.__event_abstract__:
        raise TypeError(f"expected an instance of a registered Event subclass, got {event!r}")
    return _encoder.encode(event)


def decode(data: bytes | bytearray | memoryview | str, *, validate: bool = False) -> Event:
    """The event encoded in ``data``, as an instance of its registered class.

    Types and ``Meta`` constraints are checked while decoding. ``validate=True`` also runs
    ``validate()`` (byte lengths, ``Check`` rules, cross-field rules) — for input from
    outside; events read back from our own outbox were validated before they were stored.
    Anything that is not a valid event raises ``EventDecodeError`` with the cause chained;
    input it echoes (an unknown tag) is cut to a short prefix, its length noted.
    """
    try:
        event = cast(Event, _current_decoder().decode(data))
    except EventDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        message = str(exc)
        short = _shorten(message)
        if short is not message:
            # The cause is printed with every traceback: a 10 MB tag would be logged whole.
            exc.args = (short,)
        raise EventDecodeError(f"not a valid encoded event: {short}") from exc
    if validate:
        try:
            event.validate()
        except EventValidationError as exc:
            raise EventDecodeError(f"decoded event is invalid: {_shorten(str(exc))}") from exc
    return event
