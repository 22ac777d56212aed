"""engine.catalog against shared/CATALOG.md: names, tags, fields, rules and affects_index."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.catalog as catalog
from engine.catalog import CATALOG, INDEX_AFFECTING, affects_index
from engine.events import (
    Event,
    EventDecodeError,
    EventValidationError,
    ValidationErrorKind,
    decode,
    encode,
)

Kind = ValidationErrorKind
NIL = UUID(int=0)
ENVELOPE = {
    "id",
    "occurred_at",
    "tenant_id",
    "actor_id",
    "correlation_id",
    "causation_id",
    "schema_version",
}

# The tables of CATALOG.md, one row per class: (tag, fields). `?` marks an optional
# field; `*_id` fields are UUIDs, `: int` and `: bool` say so, the rest are str.
SPEC: dict[str, tuple[str, str]] = {
    "NodeCreated": ("node.created", "node_id, kind, author_id?"),
    "NodeUpdated": ("node.updated", "node_id, kind"),
    "NodeTranslationUpdated": ("node.translation_updated", "node_id, locale"),
    "NodePublished": ("node.published", "node_id, kind"),
    "NodeUnpublished": ("node.unpublished", "node_id, kind"),
    "NodeDeleted": ("node.deleted", "node_id, kind"),
    "BodyUpdated": ("body.updated", "node_id, locale"),
    "CategoryCreated": ("category.created", "category_id"),
    "CategoryUpdated": ("category.updated", "category_id"),
    "CategoryDeleted": ("category.deleted", "category_id"),
    "TagCreated": ("tag.created", "tag_id"),
    "TagAttached": ("tag.attached", "tag_id, target_type, target_id"),
    "TagDetached": ("tag.detached", "tag_id, target_type, target_id"),
    "MediaUploaded": ("media.uploaded", "media_id, mime_type, size: int"),
    "MediaDeleted": ("media.deleted", "media_id"),
    "UserRegistered": ("user.registered", "user_id, email"),
    "UserLoggedIn": ("user.logged_in", "user_id"),
    "UserUpdated": ("user.updated", "user_id"),
    "UserDeleted": ("user.deleted", "user_id"),
    "ProductCreated": ("product.created", "product_id"),
    "ProductUpdated": ("product.updated", "product_id"),
    "ProductPublished": ("product.published", "product_id"),
    "ProductDeleted": ("product.deleted", "product_id"),
    "VariantCreated": ("variant.created", "variant_id, product_id"),
    "VariantUpdated": ("variant.updated", "variant_id, product_id"),
    "VariantDeleted": ("variant.deleted", "variant_id, product_id"),
    "InventoryUpdated": (
        "inventory.updated",
        "variant_id, product_id, location_id, old_quantity: int, new_quantity: int",
    ),
    "InventoryLow": ("inventory.low", "variant_id, product_id, remaining: int, threshold: int"),
    "PriceUpdated": (
        "price.updated",
        "variant_id, product_id, currency, old_amount?: int, new_amount: int",
    ),
    "OrderPlaced": ("order.placed", "order_id, customer_id?, total: int, currency"),
    "OrderStatusChanged": ("order.status_changed", "order_id, old_status, new_status"),
    "OrderCompleted": ("order.completed", "order_id"),
    "OrderCancelled": ("order.cancelled", "order_id, reason?"),
    "ReindexRequested": ("index.reindex_requested", "target_type, target_id?"),
    "IndexUpdated": ("index.updated", "index_name, target_id"),
    "TenantCreated": ("tenant.created", "tenant_id"),
    "TenantUpdated": ("tenant.updated", "tenant_id"),
    "LocaleEnabled": ("locale.enabled", "tenant_id, locale"),
    "LocaleDisabled": ("locale.disabled", "tenant_id, locale"),
    "ForumTopicCreated": ("forum.topic_created", "topic_id, title, author_id?"),
    "ForumTopicReplied": ("forum.topic_replied", "topic_id, reply_id, author_id?"),
    "ForumTopicStatusChanged": (
        "forum.topic_status_changed",
        "topic_id, old_status, new_status",
    ),
    "ForumTopicPinned": ("forum.topic_pinned", "topic_id, pinned: bool"),
    "ForumReplyStatusChanged": (
        "forum.reply_status_changed",
        "reply_id, old_status, new_status",
    ),
    "BuildRequested": ("build.requested", "build_id, target"),
}

INDEXED = {
    "NodeCreated",
    "NodeUpdated",
    "NodeTranslationUpdated",
    "NodePublished",
    "NodeUnpublished",
    "NodeDeleted",
    "BodyUpdated",
    "ProductCreated",
    "ProductUpdated",
    "ProductPublished",
    "ProductDeleted",
    "VariantUpdated",
    "InventoryUpdated",
    "PriceUpdated",
    "TagAttached",
    "TagDetached",
}


def _fields(name: str) -> dict[str, tuple[str, bool]]:
    """field -> (type, optional) for one row of SPEC."""
    fields = {}
    for item in SPEC[name][1].split(", "):
        field, _, declared = item.partition(": ")
        optional = field.endswith("?")
        field = field.rstrip("?")
        kind = declared or ("UUID" if field.endswith("_id") else "str")
        fields[field] = (kind, optional)
    return fields


TEXT_DEFAULTS: dict[str, str] = {
    "kind": "article",
    "locale": "en-GB",
    "target_type": "product",
    "mime_type": "image/png",
    "email": "ada@example.com",
    "currency": "EUR",
    "old_status": "pending",
    "new_status": "paid",
    "reason": "changed my mind",
    "index_name": "products",
    "title": "Hello forum",
    "target": "site",
}
INT_DEFAULTS: dict[str, int] = {"remaining": 2, "threshold": 5}


def _valid(cls: type[Event], *, optional: bool = False, **changes: Any) -> Event:
    """A valid instance; with ``optional`` the optional fields are filled in too."""
    kwargs: dict[str, Any] = {}
    for field, (kind, is_optional) in _fields(cls.__name__).items():
        if is_optional and not optional:
            continue
        if kind == "UUID":
            kwargs[field] = uuid4()
        elif kind == "int":
            kwargs[field] = INT_DEFAULTS.get(field, 7)
        elif kind == "bool":
            kwargs[field] = True
        else:
            kwargs[field] = TEXT_DEFAULTS[field]
    kwargs.update(changes)
    return cls(**kwargs)


def _broken(cls: type[Event], **changes: Any) -> EventValidationError:
    event = _valid(cls, **changes)
    with pytest.raises(EventValidationError) as caught:
        event.validate()
    return caught.value


def _name(cls: type[Event]) -> str:
    return cls.__name__


# Shape


def test_the_catalog_has_every_class_of_the_spec_in_order() -> None:
    assert [cls.__name__ for cls in CATALOG] == list(SPEC)


def test_all_lists_the_classes_and_helpers() -> None:
    assert set(catalog.__all__) == {*SPEC, "CATALOG", "INDEX_AFFECTING", "affects_index"}
    for name in catalog.__all__:
        assert hasattr(catalog, name)


@pytest.mark.parametrize("cls", CATALOG, ids=_name)
def test_class_has_the_tag_and_fields_of_the_spec(cls: type[Event]) -> None:
    tag, _ = SPEC[cls.__name__]
    assert cls.event_type == tag
    assert cls.__struct_config__.tag == tag
    expected = _fields(cls.__name__)
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    actual = {field.name: field for field in info.fields}
    assert set(actual) - ENVELOPE == set(expected) - ENVELOPE
    names = {"UUID": mi.UUIDType, "str": mi.StrType, "int": mi.IntType, "bool": mi.BoolType}
    for name, (kind, optional) in expected.items():
        field = actual[name]
        if optional:
            assert not field.required
            assert field.default is None
            assert isinstance(field.type, mi.UnionType)
            members = field.type.types
            assert {type(m) for m in members} == {names[kind], mi.NoneType}
        else:
            assert field.required, name
            assert isinstance(field.type, names[kind]), name


def test_tenant_events_require_the_tenant_id() -> None:
    with pytest.raises(TypeError, match="tenant_id"):
        catalog.TenantCreated()  # type: ignore[call-arg]
    with pytest.raises(EventDecodeError):
        decode(b'{"type":"tenant.created"}')


# Valid events


@pytest.mark.parametrize("cls", CATALOG, ids=_name)
def test_a_valid_instance_passes(cls: type[Event]) -> None:
    _valid(cls).validate()
    _valid(cls, optional=True).validate()


@pytest.mark.parametrize("cls", CATALOG, ids=_name)
def test_round_trip(cls: type[Event]) -> None:
    event = _valid(
        cls,
        optional=True,
        actor_id=uuid4(),
        correlation_id=uuid4(),
        causation_id=uuid4(),
        schema_version=3,
        **({} if "tenant_id" in _fields(cls.__name__) else {"tenant_id": uuid4()}),
    )
    data = encode(event)
    assert json.loads(data)["type"] == cls.event_type
    assert decode(data) == event
    assert decode(data, validate=True) == event
    assert decode(data.decode()) == event


@pytest.mark.parametrize(
    ("cls", "changes"),
    [
        (catalog.NodeCreated, {"kind": "a" * 64}),
        (catalog.NodeCreated, {"kind": "Blog_Post-2"}),
        (catalog.NodeUpdated, {"kind": "\u20ac" * 21}),  # 63 bytes
        (catalog.NodeUpdated, {"kind": "any text, even spaces"}),
        (catalog.BodyUpdated, {"locale": "zh-Hant-TW"}),
        (catalog.BodyUpdated, {"locale": "\u00fc" * 5}),  # 10 bytes
        (catalog.MediaUploaded, {"size": 0}),
        (catalog.MediaUploaded, {"mime_type": "application/vnd.oasis.opendocument.text"}),
        (catalog.UserRegistered, {"email": "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + ".de"}),
        (catalog.InventoryUpdated, {"old_quantity": 0, "new_quantity": 0}),
        (catalog.InventoryLow, {"remaining": 0, "threshold": 1}),
        (catalog.PriceUpdated, {"old_amount": 0, "new_amount": 0}),
        (catalog.OrderPlaced, {"total": 0}),
        (catalog.OrderStatusChanged, {"old_status": "a" * 50, "new_status": "b" * 50}),
        (catalog.OrderStatusChanged, {"old_status": "paid", "new_status": "Paid"}),
        (catalog.OrderCancelled, {"reason": ""}),
        (catalog.OrderCancelled, {"reason": "r" * 500}),
        (catalog.ForumTopicCreated, {"title": "t" * 255}),
        (catalog.ForumTopicPinned, {"pinned": False}),
    ],
)
def test_values_at_the_limits_pass(cls: type[Event], changes: dict[str, Any]) -> None:
    _valid(cls, **changes).validate()


# Each rule broken once

TOO_LONG_64 = "a" * 65
TOO_LONG_64_BYTES = "\u00e9" * 33  # 33 characters, 66 bytes
RULES: list[tuple[type[Event], dict[str, Any], str, Kind]] = [
    (catalog.NodeCreated, {"kind": ""}, "kind", Kind.EMPTY_FIELD),
    (catalog.NodeCreated, {"kind": " \t "}, "kind", Kind.EMPTY_FIELD),
    (catalog.NodeCreated, {"kind": TOO_LONG_64}, "kind", Kind.FIELD_TOO_LONG),
    (catalog.NodeCreated, {"kind": "blog post"}, "kind", Kind.INVALID_CHARACTERS),
    (catalog.NodeCreated, {"kind": "caf\u00e9"}, "kind", Kind.INVALID_CHARACTERS),
    (catalog.NodeCreated, {"kind": "blog.post"}, "kind", Kind.INVALID_CHARACTERS),
    (catalog.NodeCreated, {"author_id": NIL}, "author_id", Kind.NIL_UUID),
    *(
        (cls, {"kind": value}, "kind", kind)
        for cls in (
            catalog.NodeUpdated,
            catalog.NodePublished,
            catalog.NodeUnpublished,
            catalog.NodeDeleted,
        )
        for value, kind in (
            ("", Kind.EMPTY_FIELD),
            ("   ", Kind.EMPTY_FIELD),
            (TOO_LONG_64, Kind.FIELD_TOO_LONG),
            (TOO_LONG_64_BYTES, Kind.FIELD_TOO_LONG),
        )
    ),
    *(
        (cls, {"locale": value}, "locale", kind)
        for cls in (
            catalog.NodeTranslationUpdated,
            catalog.BodyUpdated,
            catalog.LocaleEnabled,
            catalog.LocaleDisabled,
        )
        for value, kind in (
            ("", Kind.EMPTY_FIELD),
            ("\n", Kind.EMPTY_FIELD),
            ("en-GB-oxend", Kind.FIELD_TOO_LONG),
            ("\u00fc" * 6, Kind.FIELD_TOO_LONG),
        )
    ),
    *(
        (cls, {"target_type": value}, "target_type", kind)
        for cls in (catalog.TagAttached, catalog.TagDetached, catalog.ReindexRequested)
        for value, kind in (("", Kind.EMPTY_FIELD), (TOO_LONG_64, Kind.FIELD_TOO_LONG))
    ),
    (catalog.ReindexRequested, {"target_id": NIL}, "target_id", Kind.NIL_UUID),
    (catalog.MediaUploaded, {"mime_type": ""}, "mime_type", Kind.EMPTY_FIELD),
    (catalog.MediaUploaded, {"mime_type": "a/" + "b" * 254}, "mime_type", Kind.FIELD_TOO_LONG),
    (catalog.MediaUploaded, {"mime_type": "png"}, "mime_type", Kind.INVALID_VALUE),
    (catalog.MediaUploaded, {"mime_type": "image/png x"}, "mime_type", Kind.INVALID_VALUE),
    (catalog.MediaUploaded, {"size": -1}, "size", Kind.OUT_OF_RANGE),
    (catalog.MediaUploaded, {"size": "1"}, "size", Kind.INVALID_VALUE),
    (catalog.UserRegistered, {"email": ""}, "email", Kind.EMPTY_FIELD),
    (catalog.UserRegistered, {"email": "a@" + "b" * 250 + ".com"}, "email", Kind.FIELD_TOO_LONG),
    (catalog.UserRegistered, {"email": "ada.example.com"}, "email", Kind.INVALID_VALUE),
    (catalog.UserRegistered, {"email": "ada@example"}, "email", Kind.INVALID_VALUE),
    (catalog.InventoryUpdated, {"old_quantity": -1}, "old_quantity", Kind.OUT_OF_RANGE),
    (catalog.InventoryUpdated, {"new_quantity": -1}, "new_quantity", Kind.OUT_OF_RANGE),
    (catalog.InventoryLow, {"remaining": -1}, "remaining", Kind.OUT_OF_RANGE),
    (catalog.InventoryLow, {"threshold": -1}, "threshold", Kind.OUT_OF_RANGE),
    (catalog.InventoryLow, {"remaining": 5, "threshold": 5}, "remaining", Kind.INVALID_VALUE),
    (catalog.InventoryLow, {"remaining": 6, "threshold": 5}, "remaining", Kind.INVALID_VALUE),
    (catalog.PriceUpdated, {"currency": "eur"}, "currency", Kind.INVALID_VALUE),
    (catalog.PriceUpdated, {"currency": "EURO"}, "currency", Kind.INVALID_VALUE),
    (catalog.PriceUpdated, {"currency": ""}, "currency", Kind.INVALID_VALUE),
    (catalog.PriceUpdated, {"old_amount": -1}, "old_amount", Kind.OUT_OF_RANGE),
    (catalog.PriceUpdated, {"new_amount": -1}, "new_amount", Kind.OUT_OF_RANGE),
    (catalog.PriceUpdated, {"new_amount": 1.5}, "new_amount", Kind.INVALID_VALUE),
    (catalog.OrderPlaced, {"total": -1}, "total", Kind.OUT_OF_RANGE),
    (catalog.OrderPlaced, {"currency": "E1R"}, "currency", Kind.INVALID_VALUE),
    (catalog.OrderPlaced, {"customer_id": NIL}, "customer_id", Kind.NIL_UUID),
    *(
        (cls, changes, field, kind)
        for cls in (
            catalog.OrderStatusChanged,
            catalog.ForumTopicStatusChanged,
            catalog.ForumReplyStatusChanged,
        )
        for changes, field, kind in (
            ({"old_status": ""}, "old_status", Kind.EMPTY_FIELD),
            ({"new_status": " "}, "new_status", Kind.EMPTY_FIELD),
            ({"old_status": "s" * 51}, "old_status", Kind.FIELD_TOO_LONG),
            ({"new_status": "\u00e9" * 26}, "new_status", Kind.FIELD_TOO_LONG),
            ({"old_status": "paid", "new_status": "paid"}, "new_status", Kind.INVALID_VALUE),
            ({"old_status": "paid", "new_status": " paid "}, "new_status", Kind.INVALID_VALUE),
        )
    ),
    (catalog.OrderCancelled, {"reason": "r" * 501}, "reason", Kind.FIELD_TOO_LONG),
    (catalog.OrderCancelled, {"reason": "\u00e9" * 251}, "reason", Kind.FIELD_TOO_LONG),
    (catalog.IndexUpdated, {"index_name": ""}, "index_name", Kind.EMPTY_FIELD),
    (catalog.IndexUpdated, {"index_name": TOO_LONG_64}, "index_name", Kind.FIELD_TOO_LONG),
    (catalog.ForumTopicCreated, {"title": ""}, "title", Kind.EMPTY_FIELD),
    (catalog.ForumTopicCreated, {"title": "t" * 256}, "title", Kind.FIELD_TOO_LONG),
    (catalog.ForumTopicCreated, {"author_id": NIL}, "author_id", Kind.NIL_UUID),
    (catalog.ForumTopicReplied, {"author_id": NIL}, "author_id", Kind.NIL_UUID),
    (catalog.ForumTopicPinned, {"pinned": "yes"}, "pinned", Kind.INVALID_VALUE),
    (catalog.ForumTopicPinned, {"pinned": 1}, "pinned", Kind.INVALID_VALUE),
    (catalog.BuildRequested, {"target": ""}, "target", Kind.EMPTY_FIELD),
    (catalog.BuildRequested, {"target": TOO_LONG_64}, "target", Kind.FIELD_TOO_LONG),
]


@pytest.mark.parametrize(
    ("cls", "changes", "field", "kind"),
    RULES,
    ids=[f"{cls.__name__}-{field}-{kind.name}" for cls, _, field, kind in RULES],
)
def test_each_rule_broken_once(
    cls: type[Event], changes: dict[str, Any], field: str, kind: Kind
) -> None:
    error = _broken(cls, **changes)
    assert (error.event_type, error.field, error.kind) == (cls.event_type, field, kind)


def _fields_of_type(kind: str, *, optional: bool | None = None) -> list[tuple[type[Event], str]]:
    return [
        (cls, field)
        for cls in CATALOG
        for field, (declared, is_optional) in _fields(cls.__name__).items()
        if declared == kind and (optional is None or is_optional == optional)
    ]


UUID_FIELDS = _fields_of_type("UUID")


@pytest.mark.parametrize(
    ("cls", "field"), UUID_FIELDS, ids=[f"{c.__name__}-{f}" for c, f in UUID_FIELDS]
)
def test_every_id_field_refuses_the_nil_uuid(cls: type[Event], field: str) -> None:
    error = _broken(cls, **{field: NIL})
    assert (error.field, error.kind) == (field, Kind.NIL_UUID)


REQUIRED = [
    (cls, field)
    for cls in CATALOG
    for field, (_, optional) in _fields(cls.__name__).items()
    if not optional
]


@pytest.mark.parametrize(("cls", "field"), REQUIRED, ids=[f"{c.__name__}-{f}" for c, f in REQUIRED])
def test_every_required_field_refuses_none(cls: type[Event], field: str) -> None:
    error = _broken(cls, **{field: None})
    assert (error.field, error.kind) == (field, Kind.MISSING_FIELD)


# Schema evolution


@pytest.mark.parametrize(
    ("payload", "cls", "absent"),
    [
        ('{"type":"order.cancelled","order_id":"%s"}', catalog.OrderCancelled, "reason"),
        (
            '{"type":"price.updated","variant_id":"%s","product_id":"%s","currency":"EUR",'
            '"new_amount":5}',
            catalog.PriceUpdated,
            "old_amount",
        ),
        (
            '{"type":"node.created","node_id":"%s","kind":"page"}',
            catalog.NodeCreated,
            "author_id",
        ),
    ],
)
def test_an_old_payload_without_an_optional_field_decodes(
    payload: str, cls: type[Event], absent: str
) -> None:
    data = payload % tuple(str(uuid4()) for _ in range(payload.count("%s")))
    event = decode(data)
    assert type(event) is cls
    assert getattr(event, absent) is None
    assert event.causation_id is None
    assert event.schema_version == 1
    event.validate()


def test_a_payload_written_with_every_envelope_field_decodes() -> None:
    document = {
        "type": "tag.created",
        "tag_id": str(uuid4()),
        "id": str(uuid4()),
        "occurred_at": "2024-05-01T10:00:00Z",
        "tenant_id": None,
        "actor_id": None,
        "correlation_id": None,
        "causation_id": None,
        "schema_version": 1,
    }
    event = decode(json.dumps(document))
    assert event.occurred_at == datetime(2024, 5, 1, 10, tzinfo=UTC)


# affects_index


def _int_type(t: mi.Type) -> mi.IntType | None:
    if isinstance(t, mi.UnionType):  # optional
        [t] = [member for member in t.types if not isinstance(member, mi.NoneType)]
    return t if isinstance(t, mi.IntType) else None


def _declared_ints(cls: type[Event]) -> dict[str, mi.IntType]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    found = {field.name: _int_type(field.type) for field in info.fields}
    return {name: t for name, t in found.items() if t is not None and name not in ENVELOPE}


INT_FIELDS = _fields_of_type("int")
INT64_MAX = 2**63 - 1


def test_the_int_fields_of_the_classes_are_those_of_the_spec() -> None:
    actual = [(cls, field) for cls in CATALOG for field in _declared_ints(cls)]
    assert actual == INT_FIELDS
    assert len(INT_FIELDS) == 8


@pytest.mark.parametrize(
    ("cls", "field"), INT_FIELDS, ids=[f"{c.__name__}-{f}" for c, f in INT_FIELDS]
)
def test_every_int_field_declares_the_upper_bound_it_refuses_beyond(
    cls: type[Event], field: str
) -> None:
    declared = _declared_ints(cls)[field]
    assert (declared.ge, declared.le) == (0, INT64_MAX)
    changes: dict[str, Any] = {field: INT64_MAX}
    if cls is catalog.InventoryLow:  # remaining < threshold
        changes = {"remaining": INT64_MAX - 1, "threshold": INT64_MAX}
    event = _valid(cls, **changes)
    event.validate()
    assert decode(encode(event)) == event
    for beyond in (INT64_MAX + 1, 10**5000):
        error = _broken(cls, **{field: beyond})
        assert (error.field, error.kind) == (field, Kind.OUT_OF_RANGE)
        assert f"must be <= {INT64_MAX}, got " in error.message
        assert len(str(error)) < 200


def test_a_media_upload_of_a_size_no_encoder_can_write_is_refused_by_validate() -> None:
    event = catalog.MediaUploaded(media_id=uuid4(), mime_type="image/png", size=10**5000)
    with pytest.raises(EventValidationError) as caught:
        event.validate()
    assert str(caught.value) == (
        "media.uploaded size: must be <= 9223372036854775807, got <int of 16610 bits>"
        " (OUT_OF_RANGE)"
    )


def test_affects_index_follows_the_spec() -> None:
    assert {cls.__name__ for cls in INDEX_AFFECTING} == INDEXED
    for cls in CATALOG:
        expected = cls.__name__ in INDEXED
        assert affects_index(cls) is expected
        assert affects_index(_valid(cls)) is expected


def test_a_subclass_of_an_index_affecting_event_affects_the_index() -> None:
    class FeaturedProductCreated(catalog.ProductCreated, tag="test.featured_product.created"):
        pass

    class AuditNote(Event, tag="test.audit_note"):
        pass

    assert affects_index(FeaturedProductCreated)
    assert not affects_index(AuditNote())


# Arbitrary values: only EventValidationError, and valid events survive the codec

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(),
    st.builds(pow, st.just(10), st.sampled_from([19, 20, 5000])),
    st.floats(),
    st.text(max_size=300),
    st.uuids(),
    st.just(NIL),
    st.datetimes(timezones=st.sampled_from([UTC, None])),
    st.lists(st.integers(), max_size=3),
    st.binary(max_size=5),
)
# Cross-field rules report on one field whichever of the two was changed.
CROSS_FIELD = {
    "InventoryLow": {"remaining"},
    "OrderStatusChanged": {"new_status"},
    "ForumTopicStatusChanged": {"new_status"},
    "ForumReplyStatusChanged": {"new_status"},
}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CATALOG), st.data())
def test_any_value_in_any_field_gives_a_validation_error_or_a_round_trip(
    cls: type[Event], data: st.DataObject
) -> None:
    fields = sorted(set(_fields(cls.__name__)) | ENVELOPE)
    field = data.draw(st.sampled_from(fields))
    value = data.draw(ANY_VALUE)
    event = _valid(cls, optional=data.draw(st.booleans()), **{field: value})
    try:
        event.validate()
    except EventValidationError as error:
        caught = error
    else:
        assert decode(encode(event)) == event
        return
    assert caught.field in {field} | CROSS_FIELD.get(cls.__name__, set())
    assert caught.event_type == cls.event_type


def test_validation_errors_render_briefly() -> None:
    error = _broken(catalog.UserRegistered, email="x" * 10_000)
    assert str(error).startswith("user.registered email: must be at most 255 bytes")
    assert len(str(error)) < 200
    assert isinstance(msgspec.json.encode(error.kind), bytes)
