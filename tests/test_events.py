"""The event model: registration by tag, envelope, validate(), uuid7 and the JSON codec."""

from __future__ import annotations

import enum
import itertools
import json
import pickle
import threading
import time
import types
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from functools import partial
from typing import Annotated, Any, Literal, NamedTuple, TypedDict, cast
from uuid import UUID, uuid4

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine._events as events_module
from engine._errors import EngineError
from engine.catalog import InventoryLow
from engine.events import (
    Event,
    EventDecodeError,
    EventValidationError,
    ValidationErrorKind,
    decode,
    encode,
    registered_types,
    uuid7,
)
from engine.validation import Check, check_max_bytes, check_not_blank

Kind = ValidationErrorKind
NIL = UUID(int=0)


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Line(msgspec.Struct, frozen=True):
    sku: Annotated[str, msgspec.Meta(min_length=1)]
    quantity: Annotated[int, msgspec.Meta(ge=1)]


class Sample(Event, tag="test.sample"):
    """One field of every kind validate() knows about."""

    count: Annotated[int, msgspec.Meta(ge=0, le=10)]
    ratio: float = 0.5
    flag: bool = False
    name: Annotated[str, msgspec.Meta(max_length=5)] = "x"
    code: Annotated[str, msgspec.Meta(pattern="^[a-z]+$")] = "abc"
    label: Annotated[str, Check(check_not_blank, partial(check_max_bytes, limit=4))] = "ok"
    ref: UUID | None = None
    when: Annotated[datetime, msgspec.Meta(tz=False)] | None = None
    day: Any = None
    tags: Annotated[list[str], msgspec.Meta(max_length=3)] = msgspec.field(default_factory=list)
    lines: tuple[Line, ...] = ()
    scores: dict[str, int] = msgspec.field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    colour: Colour = Colour.RED
    either: int | str = 0
    price: Decimal = Decimal("1.5")
    pair: tuple[int, str] = (1, "a")
    even: Annotated[int, msgspec.Meta(multiple_of=2)] = 0
    blob: bytes = b""
    members: frozenset[int] = frozenset()


class Point(NamedTuple):
    x: int
    y: int


@dataclass
class Size:
    width: int


class Options(TypedDict):
    verbose: bool


class Rare(Event, tag="test.rare"):
    """The less common field types."""

    at: Annotated[dt_time, msgspec.Meta(tz=True)] = dt_time(12, tzinfo=UTC)
    on: date = date(2024, 1, 1)
    lasting: timedelta = timedelta(seconds=1)
    point: Point = Point(1, 2)
    size: Size | None = None
    options: Options | None = None
    raw: msgspec.Raw = msgspec.Raw(b"1")
    ref: UUID | int = 0
    anything: list[Any] = msgspec.field(default_factory=list)
    loose: dict[Any, Any] = msgspec.field(default_factory=dict)
    short: Annotated[str, msgspec.Meta(min_length=3)] = "abc"
    flags: Literal[1, 2] = 1


class Transfer(Event, tag="test.transfer"):
    """A user event with its own cross-field rule."""

    source: UUID
    target: UUID
    amount: Annotated[int, msgspec.Meta(gt=0)]

    def _check(self) -> None:
        super()._check()
        if self.source == self.target:
            raise EventValidationError(
                self.event_type, "target", Kind.INVALID_VALUE, "must differ from source"
            )


def _sample(**changes: Any) -> Sample:
    fields: dict[str, Any] = {"count": 1, **changes}
    return Sample(**fields)


def _broken(event: Event) -> EventValidationError:
    with pytest.raises(EventValidationError) as caught:
        event.validate()
    return caught.value


# Registration


def test_a_subclass_registers_under_its_tag() -> None:
    assert registered_types()["test.sample"] is Sample
    assert Sample.event_type == "test.sample"


def test_event_itself_is_abstract_and_unregistered() -> None:
    assert Event not in registered_types().values()
    with pytest.raises(TypeError, match="abstract"):
        Event().validate()
    with pytest.raises(TypeError, match="registered Event subclass"):
        encode(Event())


def test_a_duplicate_tag_is_refused_when_the_class_is_created() -> None:
    with pytest.raises(TypeError, match=r"'test\.sample'.*already used by.*Sample"):

        class Impostor(Event, tag="test.sample"):
            pass

    assert registered_types()["test.sample"] is Sample


def test_a_subclass_without_a_tag_of_its_own_is_told_to_give_one() -> None:
    with pytest.raises(TypeError, match=r"inherits the tag 'test\.transfer'"):

        class BigTransfer(Transfer):
            pass


def test_a_tag_must_be_a_non_empty_string() -> None:
    with pytest.raises(TypeError, match="non-empty string"):

        class Numbered(Event, tag=7):
            pass

    with pytest.raises(TypeError, match="non-empty string"):

        class Padded(Event, tag=" padded "):
            pass


def test_defining_the_same_class_again_replaces_it() -> None:
    def define() -> type[Event]:
        class Redefined(Event, tag="test.redefined"):
            n: int

        return Redefined

    first, second = define(), define()
    assert first is not second
    assert registered_types()["test.redefined"] is second
    assert type(decode(b'{"type":"test.redefined","n":1}')) is second


def test_an_abstract_base_shares_fields_without_registering() -> None:
    class Audited(Event, abstract=True):
        reason: Annotated[str, Check(check_not_blank)]

    class Archived(Audited, tag="test.archived"):
        item_id: UUID

    assert Audited not in registered_types().values()
    assert registered_types()["test.archived"] is Archived
    assert _broken(Archived(item_id=uuid4(), reason=" ")).field == "reason"
    with pytest.raises(TypeError, match="abstract"):
        Audited(reason="x").validate()


def test_registered_types_is_a_read_only_snapshot() -> None:
    snapshot = registered_types()
    with pytest.raises(TypeError):
        snapshot["x"] = Sample  # type: ignore[index]


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        (Annotated[int, msgspec.Meta(le=2**64)], "bounds"),
        (str | datetime, "str-like"),
        (Literal[2**64], "Integer values"),
    ],
)
def test_a_class_msgspec_cannot_decode_is_refused_when_defined(
    annotation: Any, reason: str
) -> None:
    with pytest.raises(TypeError, match=f"Undecodable cannot be decoded from JSON: .*{reason}"):

        class Undecodable(Event, tag="test.undecodable"):
            __annotations__ = {"value": annotation}  # the object, not the name

    assert "test.undecodable" not in registered_types()
    assert decode(encode(_sample())).event_type == "test.sample"


class Comment(Event, tag="test.comment"):
    """Refers to itself: its annotation resolves only once the module has run."""

    text: str
    reply: Comment | None = None


def test_an_event_may_refer_to_itself() -> None:
    event = Comment(text="a", reply=Comment(text="b"))
    event.validate()
    assert decode(encode(event)) == event


def test_a_new_type_is_decodable_after_the_decoder_was_built() -> None:
    decode(encode(_sample()))

    class Late(Event, tag="test.late"):
        n: int

    event = decode(b'{"type":"test.late","n":2}')
    assert isinstance(event, Late)
    assert event.n == 2


# The envelope


def test_envelope_fields_have_defaults() -> None:
    before = datetime.now(UTC)
    event = _sample()
    assert event.id.version == 7
    assert before <= event.occurred_at <= datetime.now(UTC)
    assert event.occurred_at.tzinfo is UTC
    assert event.tenant_id is event.actor_id is None
    assert event.correlation_id is event.causation_id is None
    assert event.schema_version == 1


def test_events_are_frozen_and_keyword_only() -> None:
    event = _sample()
    with pytest.raises(AttributeError):
        event.count = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Transfer(uuid4(), uuid4(), 1)  # type: ignore[call-arg, arg-type]


def test_a_valid_event_passes() -> None:
    _sample(
        ref=uuid4(),
        when=datetime(2024, 1, 1),
        tags=["a"],
        lines=(Line(sku="s", quantity=1),),
        scores={"a": 1},
        tenant_id=uuid4(),
        causation_id=uuid4(),
    ).validate()


@pytest.mark.parametrize(
    ("changes", "field", "kind"),
    [
        ({"id": NIL}, "id", Kind.NIL_UUID),
        ({"id": "0190a0c8-0000-7000-8000-000000000000"}, "id", Kind.INVALID_VALUE),
        ({"id": None}, "id", Kind.MISSING_FIELD),
        ({"tenant_id": NIL}, "tenant_id", Kind.NIL_UUID),
        ({"actor_id": NIL}, "actor_id", Kind.NIL_UUID),
        ({"correlation_id": NIL}, "correlation_id", Kind.NIL_UUID),
        ({"causation_id": NIL}, "causation_id", Kind.NIL_UUID),
        ({"causation_id": 1}, "causation_id", Kind.INVALID_VALUE),
        ({"occurred_at": datetime(2024, 1, 1)}, "occurred_at", Kind.INVALID_VALUE),
        (
            {"occurred_at": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))},
            "occurred_at",
            Kind.INVALID_VALUE,
        ),
        ({"occurred_at": "2024-01-01T00:00:00Z"}, "occurred_at", Kind.INVALID_VALUE),
        ({"schema_version": 0}, "schema_version", Kind.OUT_OF_RANGE),
        ({"schema_version": 2**31}, "schema_version", Kind.OUT_OF_RANGE),
        ({"schema_version": True}, "schema_version", Kind.INVALID_VALUE),
    ],
)
def test_envelope_rules(changes: dict[str, Any], field: str, kind: Kind) -> None:
    error = _broken(_sample(**changes))
    assert (error.field, error.kind) == (field, kind)


def test_an_aware_utc_datetime_from_another_zone_object_is_accepted() -> None:
    _sample(occurred_at=datetime(2024, 1, 1, tzinfo=timezone(timedelta(0)))).validate()


# Declared types and Meta constraints


@pytest.mark.parametrize(
    ("changes", "field", "kind"),
    [
        ({"count": -1}, "count", Kind.OUT_OF_RANGE),
        ({"count": 11}, "count", Kind.OUT_OF_RANGE),
        ({"count": "1"}, "count", Kind.INVALID_VALUE),
        ({"count": 1.0}, "count", Kind.INVALID_VALUE),
        ({"count": True}, "count", Kind.INVALID_VALUE),
        ({"count": None}, "count", Kind.MISSING_FIELD),
        ({"count": msgspec.UNSET}, "count", Kind.MISSING_FIELD),
        ({"ratio": float("nan")}, "ratio", Kind.INVALID_VALUE),
        ({"ratio": float("inf")}, "ratio", Kind.INVALID_VALUE),
        ({"ratio": "0.5"}, "ratio", Kind.INVALID_VALUE),
        ({"flag": 1}, "flag", Kind.INVALID_VALUE),
        ({"name": "toolong"}, "name", Kind.FIELD_TOO_LONG),
        ({"name": b"x"}, "name", Kind.INVALID_VALUE),
        ({"name": "\ud800"}, "name", Kind.INVALID_CHARACTERS),
        ({"code": "ABC"}, "code", Kind.INVALID_VALUE),
        ({"label": " "}, "label", Kind.EMPTY_FIELD),
        ({"label": "ééé"}, "label", Kind.FIELD_TOO_LONG),
        ({"ref": NIL}, "ref", Kind.NIL_UUID),
        ({"when": datetime(2024, 1, 1, tzinfo=UTC)}, "when", Kind.INVALID_VALUE),
        ({"tags": ["a", "b", "c", "d"]}, "tags", Kind.FIELD_TOO_LONG),
        ({"tags": ("a",)}, "tags", Kind.INVALID_VALUE),
        ({"tags": ["a", 2]}, "tags[1]", Kind.INVALID_VALUE),
        ({"lines": (Line(sku="s", quantity=0),)}, "lines[0].quantity", Kind.OUT_OF_RANGE),
        ({"lines": (Line(sku="", quantity=1),)}, "lines[0].sku", Kind.EMPTY_FIELD),
        ({"lines": ({"sku": "s"},)}, "lines[0]", Kind.INVALID_VALUE),
        ({"scores": {"a": "1"}}, "scores['a']", Kind.INVALID_VALUE),
        ({"scores": {1: 1}}, "scores[1]", Kind.INVALID_VALUE),
        ({"mode": "c"}, "mode", Kind.INVALID_VALUE),
        ({"colour": "red"}, "colour", Kind.INVALID_VALUE),
        ({"either": 1.5}, "either", Kind.INVALID_VALUE),
        ({"either": None}, "either", Kind.MISSING_FIELD),
        ({"price": 1.5}, "price", Kind.INVALID_VALUE),
        ({"pair": (1, "a", 2)}, "pair", Kind.INVALID_VALUE),
        ({"pair": (1, 2)}, "pair[1]", Kind.INVALID_VALUE),
        ({"even": 3}, "even", Kind.INVALID_VALUE),
        ({"blob": "x"}, "blob", Kind.INVALID_VALUE),
        ({"members": frozenset({"a"})}, "members[*]", Kind.INVALID_VALUE),
    ],
)
def test_declared_types_and_constraints_are_checked(
    changes: dict[str, Any], field: str, kind: Kind
) -> None:
    error = _broken(_sample(**changes))
    assert (error.field, error.kind) == (field, kind)


@pytest.mark.parametrize(
    ("changes", "field", "kind"),
    [
        ({"at": dt_time(12)}, "at", Kind.INVALID_VALUE),
        ({"at": "12:00"}, "at", Kind.INVALID_VALUE),
        ({"on": datetime(2024, 1, 1)}, "on", Kind.INVALID_VALUE),
        ({"lasting": 1.0}, "lasting", Kind.INVALID_VALUE),
        ({"point": (1, 2)}, "point", Kind.INVALID_VALUE),
        ({"size": {"width": 1}}, "size", Kind.INVALID_VALUE),
        ({"options": [("verbose", True)]}, "options", Kind.INVALID_VALUE),
        ({"raw": b"1"}, "raw", Kind.INVALID_VALUE),
        ({"ref": UUID(int=0)}, "ref", Kind.NIL_UUID),
        ({"ref": "x"}, "ref", Kind.INVALID_VALUE),
        ({"anything": (1,)}, "anything", Kind.INVALID_VALUE),
        ({"loose": [1]}, "loose", Kind.INVALID_VALUE),
        ({"short": "ab"}, "short", Kind.INVALID_VALUE),
        ({"short": ""}, "short", Kind.EMPTY_FIELD),
        ({"flags": True}, "flags", Kind.INVALID_VALUE),
        ({"flags": [1]}, "flags", Kind.INVALID_VALUE),
    ],
)
def test_less_common_types_are_checked(changes: dict[str, Any], field: str, kind: Kind) -> None:
    error = _broken(Rare(**changes))
    assert (error.field, error.kind) == (field, kind)


def test_less_common_types_pass_and_round_trip() -> None:
    event = Rare(
        size=Size(2),
        options={"verbose": True},
        ref=uuid4(),
        anything=[1, "a", None],
        loose={"a": [1]},
    )
    event.validate()
    Rare(ref=5).validate()
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "changes",
    [
        {"count": 0},
        {"count": 10},
        {"ratio": 1},
        {"either": "text"},
        {"day": {"any": [1, "json", None, 2.5]}},
        {"label": "éé"},
        {"name": "ééééé"},
        {"ref": UUID("0190a0c8-0000-7000-8000-000000000001")},
    ],
)
def test_values_at_the_limits_pass(changes: dict[str, Any]) -> None:
    _sample(**changes).validate()


def test_the_first_broken_field_is_reported() -> None:
    assert _broken(_sample(count=-1, name="toolong")).field == "count"


def test_cross_field_rules_run_after_the_fields_passed() -> None:
    same = uuid4()
    assert _broken(Transfer(source=same, target=same, amount=1)).field == "target"
    assert _broken(Transfer(source=same, target=same, amount=0)).field == "amount"
    Transfer(source=uuid4(), target=uuid4(), amount=1).validate()


# Cross-field rules: the cross_check hook, and _check, its former spelling still honoured

ran: list[str] = []


class Window(Event, tag="test.window"):
    """Cross-field rules in the documented spelling."""

    start: int
    end: int

    def cross_check(self) -> None:
        super().cross_check()
        ran.append("Window")
        if self.end <= self.start:
            raise EventValidationError(
                self.event_type, "end", Kind.INVALID_VALUE, "must be after start"
            )


class LaterWindow(Window, tag="test.later_window"):
    """A user class still written in the former spelling, below one in the new."""

    def _check(self) -> None:
        super()._check()
        ran.append("LaterWindow")
        if self.start < 0:
            raise EventValidationError(
                self.event_type, "start", Kind.OUT_OF_RANGE, "must not be negative"
            )


class EvenLaterWindow(LaterWindow, tag="test.even_later_window"):
    """The new spelling again, below a class in the former one."""

    def cross_check(self) -> None:
        super().cross_check()
        ran.append("EvenLaterWindow")
        if self.start % 2:
            raise EventValidationError(self.event_type, "start", Kind.INVALID_VALUE, "odd")


class LowAtLocation(InventoryLow, tag="test.low_at_location"):
    """A user's catalog event with a rule of its own, in the former spelling."""

    def _check(self) -> None:
        super()._check()
        if self.threshold > 100:
            raise EventValidationError(
                self.event_type, "threshold", Kind.OUT_OF_RANGE, "must be at most 100"
            )


class Unchained(Window, tag="test.unchained"):
    """A former-spelling override that leaves out its bases' rules, as it always could."""

    def _check(self) -> None:
        ran.append("Unchained")


def _ran(event: Event) -> list[str]:
    ran.clear()
    try:
        event.validate()
    finally:
        result = list(ran)
        ran.clear()
    return result


def test_cross_check_rules_are_validated() -> None:
    assert _ran(Window(start=1, end=2)) == ["Window"]
    error = _broken(Window(start=2, end=2))
    assert (error.event_type, error.field, error.kind) == ("test.window", "end", Kind.INVALID_VALUE)


def test_the_former_spelling_of_the_hook_still_validates() -> None:
    # Transfer overrides _check and calls super()._check(), as user classes did.
    same = uuid4()
    assert _broken(Transfer(source=same, target=same, amount=1)).field == "target"
    Transfer(source=uuid4(), target=uuid4(), amount=1).validate()


def test_a_former_spelling_below_the_new_runs_each_rule_once_bases_first() -> None:
    assert _ran(LaterWindow(start=1, end=5)) == ["Window", "LaterWindow"]
    error = _broken(LaterWindow(start=-1, end=5))
    assert (error.field, error.kind) == ("start", Kind.OUT_OF_RANGE)
    # Both rules broken: the base's is reported, as when every class used _check.
    error = _broken(LaterWindow(start=-1, end=-5))
    assert (error.field, error.kind) == ("end", Kind.INVALID_VALUE)


def test_the_new_spelling_below_the_former_runs_every_rule_once() -> None:
    assert sorted(_ran(EvenLaterWindow(start=2, end=5))) == [
        "EvenLaterWindow",
        "LaterWindow",
        "Window",
    ]
    assert _broken(EvenLaterWindow(start=3, end=5)).message == "odd"
    assert _broken(EvenLaterWindow(start=-2, end=5)).kind is Kind.OUT_OF_RANGE
    assert _broken(EvenLaterWindow(start=4, end=2)).field == "end"


def test_a_user_subclass_of_a_catalog_event_keeps_the_catalog_rule_first() -> None:
    def low(remaining: int, threshold: int) -> LowAtLocation:
        return LowAtLocation(
            variant_id=uuid4(), product_id=uuid4(), remaining=remaining, threshold=threshold
        )

    low(1, 5).validate()
    assert _broken(low(1, 500)).field == "threshold"
    assert _broken(low(9, 5)).field == "remaining"
    # Both broken: the catalog's rule ran first, as it did before it took the new spelling.
    assert _broken(low(900, 500)).field == "remaining"


def test_an_override_that_skips_super_skips_its_bases_rules_as_before() -> None:
    assert _ran(Unchained(start=5, end=1)) == ["Unchained"]


@pytest.mark.parametrize("name", ["validate", "cross_check", "_check"])
def test_a_field_may_not_hide_a_method_validate_relies_on(name: str) -> None:
    namespace = {"__annotations__": {name: int}}
    with pytest.raises(TypeError, match=rf"Hiding: an event field may not be named '{name}'"):
        types.new_class(
            "Hiding",
            (Event,),
            {"tag": f"test.hiding_{name}"},
            lambda ns: ns.update(namespace),
        )
    assert f"test.hiding_{name}" not in registered_types()


def test_check_rules_do_not_run_on_a_value_of_the_wrong_type() -> None:
    error = _broken(_sample(label=5))
    assert (error.field, error.kind) == ("label", Kind.INVALID_VALUE)


# The error


def test_the_validation_error_names_type_field_rule_and_value() -> None:
    error = _broken(_sample(count=42))
    assert isinstance(error, ValueError)
    assert isinstance(error, EngineError)
    assert (error.event_type, error.field, error.kind) == (
        "test.sample",
        "count",
        Kind.OUT_OF_RANGE,
    )
    assert str(error) == "test.sample count: must be <= 10, got 42 (OUT_OF_RANGE)"


def test_the_validation_error_shortens_huge_values() -> None:
    error = _broken(_sample(name="y" * 1_000_000))
    assert len(str(error)) < 200
    assert "1000000" in str(error)


def test_the_validation_error_survives_pickling() -> None:
    error = _broken(_sample(count=-1))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.event_type, copy.field, copy.kind, copy.message) == (
        error.event_type,
        error.field,
        error.kind,
        error.message,
    )
    assert str(copy) == str(error)


# uuid7


def test_uuid7_has_version_7_and_the_rfc_variant() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == "specified in RFC 4122"
    assert UUID(str(value)) == value


def test_uuid7_carries_the_current_unix_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_uuid7_is_strictly_increasing_within_a_process() -> None:
    values = [uuid7() for _ in range(20_000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert all(str(a) < str(b) for a, b in itertools.pairwise(values))


def test_uuid7_is_unique_across_threads() -> None:
    results: list[list[UUID]] = [[] for _ in range(4)]

    def work(out: list[UUID]) -> None:
        out.extend(uuid7() for _ in range(5_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for out in results for value in out]
    assert len(set(every)) == len(every)
    for out in results:
        assert out == sorted(out)


def test_uuid7_keeps_order_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = uuid7()
    monkeypatch.setattr(time, "time_ns", lambda: 0)
    assert first < uuid7() < uuid7()


def test_uuid7_moves_to_the_next_millisecond_when_the_counter_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = uuid7()
    monkeypatch.setattr(events_module, "_uuid7_counter", (1 << 42) - 1)
    monkeypatch.setattr(time, "time_ns", lambda: 0)
    second = uuid7()
    assert second > first
    assert second.int >> 80 == (first.int >> 80) + 1


# The codec


def test_encode_writes_the_tag_as_type() -> None:
    document = json.loads(encode(_sample()))
    assert document["type"] == "test.sample"
    assert document["occurred_at"].endswith("Z")


def test_round_trip() -> None:
    event = _sample(
        tenant_id=uuid4(),
        ref=uuid4(),
        tags=["a", "b"],
        lines=(Line(sku="s", quantity=2),),
        scores={"k": 3},
        mode="b",
        colour=Colour.BLUE,
        either="s",
        members=frozenset({1, 2}),
    )
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            bytearray(b'{"type":"test.transfer","source":"%s","target":"%s","amount":1}'),
            id="bytearray",
        ),
        pytest.param(
            memoryview(b'{"type":"test.transfer","source":"%s","target":"%s","amount":1}'),
            id="memoryview",
        ),
        pytest.param('{"type":"test.transfer","source":"%s","target":"%s","amount":1}', id="str"),
    ],
)
def test_decode_takes_buffers_and_str(data: Any) -> None:
    source, target = uuid4(), uuid4()
    if isinstance(data, str):
        data = data % (source, target)
    else:
        data = bytes(data) % (str(source).encode(), str(target).encode())
    event = decode(data)
    assert isinstance(event, Transfer)
    assert (event.source, event.target) == (source, target)


GOOD = (
    b'{"type":"test.transfer","source":"0190a0c8-0000-7000-8000-000000000001",'
    b'"target":"0190a0c8-0000-7000-8000-000000000002","amount":1}'
)
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(GOOD[:-1], id="truncated-end"),
        pytest.param(GOOD[: len(GOOD) // 2], id="truncated-half"),
        pytest.param(GOOD + b"}", id="trailing-garbage"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no-type"),
        pytest.param(b'{"type":"no.such.type"}', id="unknown-type"),
        pytest.param(b'{"type":"Event"}', id="abstract-base"),
        pytest.param(b'{"type":7}', id="type-not-str"),
        pytest.param(b'{"type":"test.transfer"}', id="missing-fields"),
        pytest.param(GOOD.replace(b'"amount":1', b'"amount":"1"'), id="wrong-field-type"),
        pytest.param(GOOD.replace(b'"amount":1', b'"amount":0'), id="meta-constraint"),
        pytest.param(
            GOOD.replace(b'"amount":1', b'"amount":1,"schema_version":0'), id="envelope-constraint"
        ),
        pytest.param(
            GOOD.replace(b'"amount":1', b'"amount":1,"occurred_at":"2024-01-01T00:00:00"'),
            id="naive-timestamp",
        ),
        pytest.param(GOOD.replace(b'"amount":1', b'"amount":1,"id":"not-a-uuid"'), id="bad-uuid"),
        pytest.param(DEEP, id="deeply-nested"),
        pytest.param(
            b'{"type":"test.sample","count":1,"day":' + DEEP + b"}", id="deeply-nested-any"
        ),
    ],
)
def test_bad_input_raises_event_decode_error_with_the_cause(data: bytes) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode(data)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("data", [None, 1, 1.5, ["x"], {"type": "test.sample"}, object()])
def test_input_that_is_not_bytes_or_str_raises_event_decode_error(data: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode(data)


def test_decode_validate_reports_rules_the_decoder_cannot_see() -> None:
    data = encode(_sample(label="ééé"))
    assert decode(data).label == "ééé"  # type: ignore[attr-defined]
    with pytest.raises(EventDecodeError) as caught:
        decode(data, validate=True)
    assert isinstance(caught.value.__cause__, EventValidationError)


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    data = GOOD.replace(b'"amount":1', b'"amount":1,"added_later":{"x":[1,2]}')
    assert isinstance(decode(data), Transfer)


def test_an_old_payload_decodes_after_an_optional_field_was_added() -> None:
    class Shipped(Event, tag="test.shipped"):
        parcel_id: UUID

    old = encode(Shipped(parcel_id=uuid4()))

    class Shipped(Event, tag="test.shipped"):  # type: ignore[no-redef]
        parcel_id: UUID
        carrier: str | None = None

    event = decode(old)
    assert type(event) is Shipped
    assert getattr(event, "carrier") is None  # noqa: B009 - mypy knows only the first Shipped
    event.validate()


def test_a_payload_without_optional_envelope_fields_decodes() -> None:
    data = b'{"type":"test.transfer","source":"%s","target":"%s","amount":3}' % (
        str(uuid4()).encode(),
        str(uuid4()).encode(),
    )
    event = decode(data)
    assert event.schema_version == 1
    assert event.tenant_id is None
    assert event.id.version == 7


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.uuids().map(str)
)
JSON = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_event_decode_error(data: bytes) -> None:
    try:
        event = decode(data)
    except EventDecodeError:
        return
    assert isinstance(event, Event)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(registered_types())),
    st.dictionaries(
        st.sampled_from(["id", "count", "source", "amount", "tenant_id", "label", "x", "lines"]),
        JSON,
    ),
)
def test_arbitrary_documents_of_registered_types_raise_only_event_decode_error(
    tag: str, fields: dict[str, Any]
) -> None:
    data = json.dumps({"type": tag, **fields}).encode()
    try:
        event = decode(data)
    except EventDecodeError:
        return
    assert type(event).event_type == tag


def test_decode_without_any_registered_type_raises_event_decode_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events_module, "_by_tag", {})
    monkeypatch.setattr(events_module, "_decoder", None)
    with pytest.raises(EventDecodeError, match="no event types"):
        decode(GOOD)


def test_event_decode_error_is_an_engine_error() -> None:
    assert issubclass(EventDecodeError, EngineError)


# What validates encodes: an event that passed validate() gets through the encoder

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
HUGE = 10**5000  # past Python's int-to-str limit: msgspec raises a raw ValueError on it


class Inner(msgspec.Struct, frozen=True):
    n: int


@dataclass
class Box:
    n: int


class Pair(NamedTuple):
    a: int
    b: str


class Settings(TypedDict, total=False):
    level: int
    name: str


class Wide(Event, tag="test.wide"):
    """A user event with an integer in every place an integer can hide."""

    n: int = 0
    ratio: float = 0.0
    numbers: list[int] = msgspec.field(default_factory=list)
    by_number: dict[int, str] = msgspec.field(default_factory=dict)
    inner: Inner | None = None
    box: Box | None = None
    pair: Pair | None = None
    settings: Settings | None = None
    at: datetime | None = None
    loose: Any = None


def _cyclic() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


@pytest.mark.parametrize(
    ("changes", "field", "kind"),
    [
        ({"n": INT_MAX + 1}, "n", Kind.OUT_OF_RANGE),
        ({"n": INT_MIN - 1}, "n", Kind.OUT_OF_RANGE),
        ({"n": HUGE}, "n", Kind.OUT_OF_RANGE),
        ({"n": -HUGE}, "n", Kind.OUT_OF_RANGE),
        ({"ratio": INT_MAX + 1}, "ratio", Kind.OUT_OF_RANGE),
        ({"ratio": 10**400}, "ratio", Kind.OUT_OF_RANGE),
        ({"numbers": [1, INT_MAX + 1]}, "numbers[1]", Kind.OUT_OF_RANGE),
        ({"by_number": {HUGE: "x"}}, "by_number[<int of 16610 bits>]", Kind.OUT_OF_RANGE),
        ({"inner": Inner(n=HUGE)}, "inner.n", Kind.OUT_OF_RANGE),
        ({"box": Box(n=HUGE)}, "box.n", Kind.OUT_OF_RANGE),
        ({"box": Box(n="1")}, "box.n", Kind.INVALID_VALUE),  # type: ignore[arg-type]
        ({"pair": Pair(HUGE, "b")}, "pair.a", Kind.OUT_OF_RANGE),
        ({"pair": Pair(1, "\ud800")}, "pair.b", Kind.INVALID_CHARACTERS),
        ({"settings": {"level": HUGE}}, "settings['level']", Kind.OUT_OF_RANGE),
        ({"settings": {"extra": object()}}, "settings['extra']", Kind.INVALID_VALUE),
        ({"loose": HUGE}, "loose", Kind.OUT_OF_RANGE),
        ({"loose": {"a": [1, {"b": INT_MAX + 1}]}}, "loose['a'][1]['b']", Kind.OUT_OF_RANGE),
        ({"loose": (INT_MIN - 1,)}, "loose[0]", Kind.OUT_OF_RANGE),
        ({"loose": {HUGE}}, "loose[*]", Kind.OUT_OF_RANGE),
        ({"loose": Inner(n=HUGE)}, "loose.n", Kind.OUT_OF_RANGE),
        ({"loose": Box(n=HUGE)}, "loose.n", Kind.OUT_OF_RANGE),
        ({"loose": "\ud800"}, "loose", Kind.INVALID_CHARACTERS),
        ({"loose": {"\udfff": 1}}, "loose['\\udfff']", Kind.INVALID_CHARACTERS),
        ({"loose": float("nan")}, "loose", Kind.INVALID_VALUE),
        ({"loose": [float("-inf")]}, "loose[0]", Kind.INVALID_VALUE),
        ({"loose": object()}, "loose", Kind.INVALID_VALUE),
        ({"loose": 1j}, "loose", Kind.INVALID_VALUE),
        ({"loose": [msgspec.UNSET]}, "loose[0]", Kind.MISSING_FIELD),
        ({"loose": {(1, 2): "tuple key"}}, "loose[(1, 2)]", Kind.INVALID_VALUE),
        ({"loose": {True: "bool key"}}, "loose[True]", Kind.INVALID_VALUE),
        ({"loose": types.MappingProxyType({})}, "loose", Kind.INVALID_VALUE),
        ({"loose": _cyclic()}, "loose", Kind.INVALID_VALUE),
        (
            {"at": datetime(2024, 1, 1, tzinfo=timezone(timedelta(seconds=30)))},
            "at",
            Kind.INVALID_VALUE,
        ),
        (
            {"loose": [dt_time(1, tzinfo=timezone(timedelta(hours=1, seconds=1)))]},
            "loose[0]",
            Kind.INVALID_VALUE,
        ),
    ],
)
def test_what_the_encoder_cannot_write_is_refused_by_validate(
    changes: dict[str, Any], field: str, kind: Kind
) -> None:
    event = Wide(**changes)
    error = _broken(event)
    assert (error.field, error.kind) == (field, kind)
    assert len(str(error)) < 300


def test_a_typed_dict_field_refuses_a_mapping_the_encoder_cannot_write() -> None:
    error = _broken(_sample(scores=types.MappingProxyType({"a": 1})))
    assert (error.field, error.kind) == ("scores", Kind.INVALID_VALUE)


def test_an_integer_beyond_64_bits_is_refused_naming_the_field_and_the_limit() -> None:
    error = _broken(Wide(n=HUGE))
    assert str(error) == (
        "test.wide n: must be <= 18446744073709551615 (events carry 64-bit integers),"
        " got <int of 16610 bits> (OUT_OF_RANGE)"
    )
    assert _broken(Wide(n=-HUGE)).message.endswith("got <negative int of 16610 bits>")
    low = _broken(Wide(numbers=[INT_MIN - 1]))
    assert low.message == (
        "must be >= -9223372036854775808 (events carry 64-bit integers), got -9223372036854775809"
    )


def test_integers_at_the_64_bit_limits_pass_and_round_trip() -> None:
    event = Wide(
        n=INT_MAX,
        numbers=[INT_MIN, INT_MAX],
        by_number={INT_MIN: "min", INT_MAX: "max"},
        inner=Inner(n=INT_MIN),
        box=Box(n=INT_MAX),
        pair=Pair(INT_MAX, "é"),
        settings={"level": INT_MIN, "name": "x"},
        at=datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        loose={"max": INT_MAX, "min": INT_MIN, "nested": [INT_MAX, {"x": 1.5}]},
    )
    event.validate()
    assert decode(encode(event)) == event
    as_float = Wide(ratio=INT_MAX)
    as_float.validate()
    assert cast(Wide, decode(encode(as_float))).ratio == float(INT_MAX)


def _power_of_ten(exponent: int, negative: bool) -> int:
    value: int = 10**exponent
    return -value if negative else value


INTEGERS = (
    st.integers()
    | st.integers(min_value=INT_MIN - 3, max_value=INT_MIN + 3)
    | st.integers(min_value=INT_MAX - 3, max_value=INT_MAX + 3)
    # Built, not listed: hypothesis shows its strategies, and repr() of 10**5000 raises.
    | st.builds(_power_of_ten, st.sampled_from([20, 4299, 4300, 5000]), st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(INTEGERS)
def test_an_int_field_passes_validate_exactly_when_it_fits_64_bits(value: int) -> None:
    event = Wide(n=value, numbers=[value], loose=[value])
    fits = INT_MIN <= value <= INT_MAX
    if fits:
        event.validate()
        assert decode(encode(event)) == event
    else:
        assert _broken(event).kind is Kind.OUT_OF_RANGE


ANY_LEAVES = (
    st.none()
    | st.booleans()
    | INTEGERS
    | st.floats()
    | st.text(st.characters() | st.characters(categories=["Cs"]), max_size=4)  # lone surrogates
    | st.uuids()
    | st.decimals(allow_nan=False)
    | st.binary(max_size=4)
    | st.builds(
        datetime,
        st.integers(2000, 2030),
        st.just(1),
        st.just(1),
        tzinfo=st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23))),
    )
    | st.sampled_from([object(), 1j, msgspec.UNSET, Colour.RED, Inner(n=1), Box(n=2**70)])
)
ANY_VALUES = st.recursive(
    ANY_LEAVES,
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3) | INTEGERS | st.booleans(), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(ANY_VALUES)
def test_whatever_an_any_field_holds_validate_refuses_it_or_it_encodes(value: Any) -> None:
    event = Wide(loose=value)
    try:
        event.validate()
    except EventValidationError:
        return
    decode(encode(event))


# Decode errors echo little of hostile input


def test_a_decode_error_cuts_a_10_mb_tag_and_notes_its_length() -> None:
    tag = "x" * 10_000_000
    with pytest.raises(EventDecodeError) as caught:
        decode(b'{"type":"%s"}' % tag.encode())
    message = str(caught.value)
    assert len(message) < 200
    assert message.startswith("not a valid encoded event: Invalid value 'xxx")
    assert "(10000030 chars)" in message  # msgspec's own message around the tag
    assert message.endswith("- at `$.type`")
    # The chained cause is printed with every traceback, so it is cut too.
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)
    assert len(str(caught.value.__cause__)) < 200


def test_a_short_decode_error_is_kept_whole() -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode(b'{"type":"no.such.type"}')
    assert str(caught.value) == (
        "not a valid encoded event: Invalid value 'no.such.type' - at `$.type`"
    )
