"""The domain events of a multi-tenant CMS and shop (shared/CATALOG.md).

Lengths count UTF-8 bytes, so they are ``Check`` rules rather than ``msgspec.Meta``
(which counts characters). Every UUID field, optional ones included, refuses the nil
UUID through ``Event.validate()`` itself.
"""

from functools import partial
from typing import Annotated
from uuid import UUID

from msgspec import Meta

from ._events import Event, EventValidationError, ValidationErrorKind
from .validation import (
    Check,
    Rule,
    check_currency,
    check_email,
    check_identifier,
    check_max_bytes,
    check_mime_type,
    check_not_blank,
)

__all__ = [
    "BodyUpdated",
    "BuildRequested",
    "CategoryCreated",
    "CategoryDeleted",
    "CategoryUpdated",
    "CATALOG",
    "ForumReplyStatusChanged",
    "ForumTopicCreated",
    "ForumTopicPinned",
    "ForumTopicReplied",
    "ForumTopicStatusChanged",
    "INDEX_AFFECTING",
    "IndexUpdated",
    "InventoryLow",
    "InventoryUpdated",
    "LocaleDisabled",
    "LocaleEnabled",
    "MediaDeleted",
    "MediaUploaded",
    "NodeCreated",
    "NodeDeleted",
    "NodePublished",
    "NodeTranslationUpdated",
    "NodeUnpublished",
    "NodeUpdated",
    "OrderCancelled",
    "OrderCompleted",
    "OrderPlaced",
    "OrderStatusChanged",
    "PriceUpdated",
    "ProductCreated",
    "ProductDeleted",
    "ProductPublished",
    "ProductUpdated",
    "ReindexRequested",
    "TagAttached",
    "TagCreated",
    "TagDetached",
    "TenantCreated",
    "TenantUpdated",
    "UserDeleted",
    "UserLoggedIn",
    "UserRegistered",
    "UserUpdated",
    "VariantCreated",
    "VariantDeleted",
    "VariantUpdated",
    "affects_index",
]


def _text(max_bytes: int, *more: Rule) -> Check:
    """Non-empty after trimming, at most ``max_bytes`` UTF-8 bytes, then ``more``."""
    return Check(check_not_blank, partial(check_max_bytes, limit=max_bytes), *more)


_Kind = Annotated[str, _text(64, check_identifier)]
_ShortText = Annotated[str, _text(64)]
_Locale = Annotated[str, _text(10)]
_Status = Annotated[str, _text(50)]
_Title = Annotated[str, _text(255)]
_MimeType = Annotated[str, _text(255, check_mime_type)]
_Email = Annotated[str, _text(255, check_email)]
_Currency = Annotated[str, Check(check_currency)]
_Reason = Annotated[str, Check(partial(check_max_bytes, limit=500))]
# A signed 64-bit column (SQLite, most databases and languages) holds every count.
_MAX_COUNT = 2**63 - 1
_Count = Annotated[int, Meta(ge=0, le=_MAX_COUNT)]
"""Quantities, sizes and amounts in minor units."""


def _require_different(event: Event, old: str, new: str, field: str) -> None:
    # Statuses are compared as trimmed, the same way "non-empty" treats white space.
    if old.strip() == new.strip():
        raise EventValidationError(
            event.event_type,
            field,
            ValidationErrorKind.INVALID_VALUE,
            f"must differ from the old status, both are {old.strip()!r}",
        )


# Content


class NodeCreated(Event, tag="node.created"):
    node_id: UUID
    kind: _Kind
    author_id: UUID | None = None


class NodeUpdated(Event, tag="node.updated"):
    node_id: UUID
    kind: _ShortText


class NodeTranslationUpdated(Event, tag="node.translation_updated"):
    node_id: UUID
    locale: _Locale


class NodePublished(Event, tag="node.published"):
    node_id: UUID
    kind: _ShortText


class NodeUnpublished(Event, tag="node.unpublished"):
    node_id: UUID
    kind: _ShortText


class NodeDeleted(Event, tag="node.deleted"):
    node_id: UUID
    kind: _ShortText


class BodyUpdated(Event, tag="body.updated"):
    node_id: UUID
    locale: _Locale


class CategoryCreated(Event, tag="category.created"):
    category_id: UUID


class CategoryUpdated(Event, tag="category.updated"):
    category_id: UUID


class CategoryDeleted(Event, tag="category.deleted"):
    category_id: UUID


class TagCreated(Event, tag="tag.created"):
    tag_id: UUID


class TagAttached(Event, tag="tag.attached"):
    tag_id: UUID
    target_type: _ShortText
    target_id: UUID


class TagDetached(Event, tag="tag.detached"):
    tag_id: UUID
    target_type: _ShortText
    target_id: UUID


# Media


class MediaUploaded(Event, tag="media.uploaded"):
    media_id: UUID
    mime_type: _MimeType
    size: _Count


class MediaDeleted(Event, tag="media.deleted"):
    media_id: UUID


# Users


class UserRegistered(Event, tag="user.registered"):
    user_id: UUID
    email: _Email


class UserLoggedIn(Event, tag="user.logged_in"):
    user_id: UUID


class UserUpdated(Event, tag="user.updated"):
    user_id: UUID


class UserDeleted(Event, tag="user.deleted"):
    user_id: UUID


# Commerce


class ProductCreated(Event, tag="product.created"):
    product_id: UUID


class ProductUpdated(Event, tag="product.updated"):
    product_id: UUID


class ProductPublished(Event, tag="product.published"):
    product_id: UUID


class ProductDeleted(Event, tag="product.deleted"):
    product_id: UUID


class VariantCreated(Event, tag="variant.created"):
    variant_id: UUID
    product_id: UUID


class VariantUpdated(Event, tag="variant.updated"):
    variant_id: UUID
    product_id: UUID


class VariantDeleted(Event, tag="variant.deleted"):
    variant_id: UUID
    product_id: UUID


class InventoryUpdated(Event, tag="inventory.updated"):
    variant_id: UUID
    product_id: UUID
    location_id: UUID
    old_quantity: _Count
    new_quantity: _Count


class InventoryLow(Event, tag="inventory.low"):
    variant_id: UUID
    product_id: UUID
    remaining: _Count
    threshold: _Count

    def cross_check(self) -> None:
        super().cross_check()
        if self.remaining >= self.threshold:
            raise EventValidationError(
                self.event_type,
                "remaining",
                ValidationErrorKind.INVALID_VALUE,
                f"must be below the threshold {self.threshold}, got {self.remaining}",
            )


class PriceUpdated(Event, tag="price.updated"):
    variant_id: UUID
    product_id: UUID
    currency: _Currency
    old_amount: _Count | None = None
    new_amount: _Count


class OrderPlaced(Event, tag="order.placed"):
    order_id: UUID
    customer_id: UUID | None = None
    total: _Count
    currency: _Currency


class OrderStatusChanged(Event, tag="order.status_changed"):
    order_id: UUID
    old_status: _Status
    new_status: _Status

    def cross_check(self) -> None:
        super().cross_check()
        _require_different(self, self.old_status, self.new_status, "new_status")


class OrderCompleted(Event, tag="order.completed"):
    order_id: UUID


class OrderCancelled(Event, tag="order.cancelled"):
    order_id: UUID
    reason: _Reason | None = None


# Search index


class ReindexRequested(Event, tag="index.reindex_requested"):
    target_type: _ShortText
    target_id: UUID | None = None


class IndexUpdated(Event, tag="index.updated"):
    index_name: _ShortText
    target_id: UUID


# Tenants and locales: ``tenant_id`` is the envelope field, made required here.


class TenantCreated(Event, tag="tenant.created"):
    tenant_id: UUID


class TenantUpdated(Event, tag="tenant.updated"):
    tenant_id: UUID


class LocaleEnabled(Event, tag="locale.enabled"):
    tenant_id: UUID
    locale: _Locale


class LocaleDisabled(Event, tag="locale.disabled"):
    tenant_id: UUID
    locale: _Locale


# Forum and builds


class ForumTopicCreated(Event, tag="forum.topic_created"):
    topic_id: UUID
    title: _Title
    author_id: UUID | None = None


class ForumTopicReplied(Event, tag="forum.topic_replied"):
    topic_id: UUID
    reply_id: UUID
    author_id: UUID | None = None


class ForumTopicStatusChanged(Event, tag="forum.topic_status_changed"):
    topic_id: UUID
    old_status: _Status
    new_status: _Status

    def cross_check(self) -> None:
        super().cross_check()
        _require_different(self, self.old_status, self.new_status, "new_status")


class ForumTopicPinned(Event, tag="forum.topic_pinned"):
    topic_id: UUID
    pinned: bool


class ForumReplyStatusChanged(Event, tag="forum.reply_status_changed"):
    reply_id: UUID
    old_status: _Status
    new_status: _Status

    def cross_check(self) -> None:
        super().cross_check()
        _require_different(self, self.old_status, self.new_status, "new_status")


class BuildRequested(Event, tag="build.requested"):
    build_id: UUID
    target: _ShortText


CATALOG: tuple[type[Event], ...] = (
    NodeCreated,
    NodeUpdated,
    NodeTranslationUpdated,
    NodePublished,
    NodeUnpublished,
    NodeDeleted,
    BodyUpdated,
    CategoryCreated,
    CategoryUpdated,
    CategoryDeleted,
    TagCreated,
    TagAttached,
    TagDetached,
    MediaUploaded,
    MediaDeleted,
    UserRegistered,
    UserLoggedIn,
    UserUpdated,
    UserDeleted,
    ProductCreated,
    ProductUpdated,
    ProductPublished,
    ProductDeleted,
    VariantCreated,
    VariantUpdated,
    VariantDeleted,
    InventoryUpdated,
    InventoryLow,
    PriceUpdated,
    OrderPlaced,
    OrderStatusChanged,
    OrderCompleted,
    OrderCancelled,
    ReindexRequested,
    IndexUpdated,
    TenantCreated,
    TenantUpdated,
    LocaleEnabled,
    LocaleDisabled,
    ForumTopicCreated,
    ForumTopicReplied,
    ForumTopicStatusChanged,
    ForumTopicPinned,
    ForumReplyStatusChanged,
    BuildRequested,
)
"""Every catalog event class, in the order of CATALOG.md."""

INDEX_AFFECTING: frozenset[type[Event]] = frozenset(
    {
        NodeCreated,
        NodeUpdated,
        NodeTranslationUpdated,
        NodePublished,
        NodeUnpublished,
        NodeDeleted,
        BodyUpdated,
        ProductCreated,
        ProductUpdated,
        ProductPublished,
        ProductDeleted,
        VariantUpdated,
        InventoryUpdated,
        PriceUpdated,
        TagAttached,
        TagDetached,
    }
)
"""The event classes after which the search index must be brought up to date."""


def affects_index(event: Event | type[Event]) -> bool:
    """Whether ``event`` (an instance or a class) should trigger re-indexing.

    A subclass of an index-affecting event affects the index too.
    """
    cls = event if isinstance(event, type) else type(event)
    return any(base in INDEX_AFFECTING for base in cls.__mro__)
