"""Tenant identifiers: validating and normalising the uuid, slug or hostname of a tenant.

Identifiers arrive from outside (HTTP headers, URLs, CLI arguments), so validation refuses
anything that is not plainly one of the documented forms, and runs in linear time: long
inputs are refused by their length before anything scans them, and the only regular
expression is a single anchored character class.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from ._counters import count_tenant_rejection
from ._errors import EngineError

__all__ = [
    "RESERVED_SLUGS",
    "TenantIdentifierValidator",
    "TenantKey",
    "TenantKeyKind",
    "TenantNotFound",
    "TenantValidationError",
    "TenantValidationErrorKind",
]


class TenantValidationErrorKind(enum.StrEnum):
    """Why a tenant identifier was refused."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    INVALID_CHARACTERS = "invalid_characters"
    RESERVED = "reserved"
    INVALID_UUID = "invalid_uuid"
    HOSTNAME_TOO_LONG = "hostname_too_long"
    INVALID_HOSTNAME = "invalid_hostname"


_PREVIEW_CHARS: Final = 40


def _preview(value: str) -> str:
    # repr escapes control characters, bidi marks and quotes: safe to log or show.
    text = repr(value)
    if len(text) <= _PREVIEW_CHARS:
        return text
    return f"{text[: _PREVIEW_CHARS - 1]}… ({len(value)} chars)"


class TenantValidationError(EngineError, ValueError):
    """A tenant identifier was refused; ``value`` is the input as given."""

    kind: TenantValidationErrorKind
    value: str
    message: str

    def __init__(self, kind: TenantValidationErrorKind, value: str, message: str) -> None:
        super().__init__(kind, value, message)
        self.kind = kind
        self.value = value
        self.message = message
        count_tenant_rejection(str(kind))

    def __str__(self) -> str:
        return f"{self.message}, got {_preview(self.value)} ({self.kind.name})"


class TenantNotFound(EngineError):
    """No tenant has this identifier."""

    def __init__(self, key: TenantKey | str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no tenant for {self.key}"


RESERVED_SLUGS: Final[frozenset[str]] = frozenset(
    {
        "api",
        "admin",
        "www",
        "app",
        "cdn",
        "assets",
        "static",
        "health",
        "metrics",
        "docs",
        "swagger",
        "mail",
        "smtp",
        "pop",
        "imap",
        "ftp",
        "sftp",
        "ssh",
        "vpn",
        "auth",
        "login",
        "logout",
        "register",
        "signup",
        "signin",
        "dev",
        "test",
        "staging",
        "prod",
        "production",
        "localhost",
        "db",
        "database",
        "cache",
        "redis",
        "postgres",
        "root",
        "system",
        "internal",
        "private",
        "public",
    }
)
"""Slugs no tenant may take: they name infrastructure, or would in a subdomain."""

_MAX_SLUG_LENGTH: Final = 64
_MAX_HOST_LENGTH: Final = 253
_MAX_LABEL_LENGTH: Final = 63

# Only ASCII white space is trimmed: str.strip() would also drop the ASCII separator
# controls \x1c-\x1f and Unicode spaces, which have no business in an identifier.
_WHITESPACE: Final = " \t\n\r\x0b\x0c"
# Applied only to ASCII input of at most 253 characters; one class, no nesting.
_SLUG: Final = re.compile(r"[a-z0-9][a-z0-9-]*")
_HOST_CHARS: Final = re.compile(r"[a-z0-9.-]+")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_UUID_HYPHENS: Final = (8, 13, 18, 23)
_UUID_LENGTH: Final = 36


def _looks_like_uuid(text: str) -> bool:
    """The 8-4-4-4-12 hex shape, any case; ``int(x, 16)`` would take ``_`` and non-ASCII digits."""
    if len(text) != _UUID_LENGTH:
        return False
    for position, char in enumerate(text):
        if position in _UUID_HYPHENS:
            if char != "-":
                return False
        elif char not in _HEX:
            return False
    return True


class TenantKeyKind(enum.StrEnum):
    """Which form of identifier a ``TenantKey`` holds."""

    UUID = "uuid"
    SLUG = "slug"
    HOST = "host"


class TenantIdentifierValidator:
    """Validates and normalises tenant identifiers (shared/CATALOG.md, "Tenant identifiers").

    Input is trimmed of ASCII white space and lower-cased first. Non-ASCII input is
    refused before lower-casing, since ``"\\u212a".lower()`` (the Kelvin sign) is ``"k"``.
    """

    __slots__ = ("_reserved",)

    def __init__(self, *, reserved: frozenset[str] = RESERVED_SLUGS) -> None:
        self._reserved = frozenset(slug.lower() for slug in reserved)

    @property
    def reserved(self) -> frozenset[str]:
        return self._reserved

    def validate_slug(self, value: str) -> str:
        """A slug, normalised: ``[a-z0-9][a-z0-9-]*``, at most 64 characters, not reserved."""
        text = _trimmed(value)
        if not text:
            raise TenantValidationError(
                TenantValidationErrorKind.EMPTY, value, "tenant slug must not be empty"
            )
        if len(text) > _MAX_SLUG_LENGTH:
            raise TenantValidationError(
                TenantValidationErrorKind.TOO_LONG,
                value,
                f"tenant slug must be at most {_MAX_SLUG_LENGTH} characters, got {len(text)}",
            )
        if not text.isascii() or _SLUG.fullmatch(slug := text.lower()) is None:
            raise TenantValidationError(
                TenantValidationErrorKind.INVALID_CHARACTERS,
                value,
                "tenant slug may contain only ASCII letters, digits and '-', and may not"
                " start with '-'",
            )
        if slug in self._reserved:
            raise TenantValidationError(
                TenantValidationErrorKind.RESERVED, value, f"tenant slug {slug!r} is reserved"
            )
        return slug

    def validate_uuid(self, value: str) -> UUID:
        """A UUID in the hyphenated 8-4-4-4-12 hex form, any case, not the nil UUID."""
        text = _trimmed(value)
        if not text:
            raise TenantValidationError(
                TenantValidationErrorKind.EMPTY, value, "tenant uuid must not be empty"
            )
        if not _looks_like_uuid(text):
            raise TenantValidationError(
                TenantValidationErrorKind.INVALID_UUID,
                value,
                "tenant uuid must be 32 hex digits grouped 8-4-4-4-12 by hyphens",
            )
        uuid = UUID(text)
        if not uuid.int:
            raise TenantValidationError(
                TenantValidationErrorKind.INVALID_UUID,
                value,
                "tenant uuid must not be the nil UUID",
            )
        return uuid

    def validate_host(self, value: str) -> str:
        """A hostname, normalised: ASCII letters, digits, ``.`` and ``-``, at most 253 characters,
        dot-separated labels of 1 to 63 characters that do not start or end with ``-``.

        No port (strip it first) and no trailing dot.
        """
        text = _trimmed(value)
        if not text:
            raise TenantValidationError(
                TenantValidationErrorKind.EMPTY, value, "tenant host must not be empty"
            )
        if len(text) > _MAX_HOST_LENGTH:
            raise TenantValidationError(
                TenantValidationErrorKind.HOSTNAME_TOO_LONG,
                value,
                f"tenant host must be at most {_MAX_HOST_LENGTH} characters, got {len(text)}",
            )
        if not text.isascii() or _HOST_CHARS.fullmatch(host := text.lower()) is None:
            raise TenantValidationError(
                TenantValidationErrorKind.INVALID_HOSTNAME,
                value,
                "tenant host may contain only ASCII letters, digits, '.' and '-'",
            )
        for label in host.split("."):
            if not label or len(label) > _MAX_LABEL_LENGTH:
                raise TenantValidationError(
                    TenantValidationErrorKind.INVALID_HOSTNAME,
                    value,
                    f"every label of a tenant host must be 1 to {_MAX_LABEL_LENGTH} characters",
                )
            if label[0] == "-" or label[-1] == "-":
                raise TenantValidationError(
                    TenantValidationErrorKind.INVALID_HOSTNAME,
                    value,
                    "no label of a tenant host may start or end with '-'",
                )
        return host

    def validate(self, value: str, *, kind: TenantKeyKind | str | None = None) -> TenantKey:
        """The key ``value`` names: a uuid if it has the uuid shape (any case), else a host
        if it contains a dot, else a slug.

        With ``kind``, ``value`` must be an identifier of that kind (an ``X-Tenant-Slug``
        header names a slug even if it holds a dot). The key carries what this validator
        accepted, its own reserved slugs included, where ``TenantKey.slug(...)`` applies
        ``RESERVED_SLUGS``.
        """
        if kind is None:
            text = _trimmed(value)
            if _looks_like_uuid(text):
                kind = TenantKeyKind.UUID
            elif "." in text:
                kind = TenantKeyKind.HOST
            else:
                kind = TenantKeyKind.SLUG
        else:
            kind = _key_kind(kind)
        if kind is TenantKeyKind.UUID:
            return _validated_key(kind, self.validate_uuid(value))
        if kind is TenantKeyKind.HOST:
            return _validated_key(kind, self.validate_host(value))
        return _validated_key(kind, self.validate_slug(value))


def _key_kind(kind: object) -> TenantKeyKind:
    if isinstance(kind, TenantKeyKind):
        return kind
    if isinstance(kind, str):
        try:
            return TenantKeyKind(kind)
        except ValueError:
            pass
    raise ValueError(
        f"a tenant key kind must be one of {', '.join(repr(k.value) for k in TenantKeyKind)},"
        f" got {kind!r}"
    )


def _trimmed(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a tenant identifier must be a str, got {type(value).__name__}")
    return value.strip(_WHITESPACE)


_default_validator: Final = TenantIdentifierValidator()


@dataclass(frozen=True, slots=True)
class TenantKey:
    """A validated, normalised tenant identifier: a uuid, a slug or a host.

    Build one with ``TenantKey.uuid(...)``, ``.slug(...)``, ``.host(...)`` or
    ``TenantIdentifierValidator().validate(...)``; the constructor validates too, so every
    ``TenantKey`` holds a valid value (a ``UUID`` for uuid keys, a ``str`` otherwise).
    Equal keys name the same tenant, so a key serves as a cache key; ``str(key)`` is
    ``"slug:acme"``.
    """

    kind: TenantKeyKind
    value: UUID | str

    def __post_init__(self) -> None:
        kind = TenantKeyKind(self.kind)
        value = self.value
        if kind is TenantKeyKind.UUID:
            normalised: UUID | str = _checked_uuid(value)
        elif isinstance(value, str):
            normalised = (
                _default_validator.validate_slug(value)
                if kind is TenantKeyKind.SLUG
                else _default_validator.validate_host(value)
            )
        else:
            raise TypeError(f"a {kind} tenant key needs a str, got {type(value).__name__}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", normalised)

    @classmethod
    def uuid(cls, value: UUID | str) -> TenantKey:
        """A uuid key from a ``UUID`` or its hyphenated text (any case)."""
        return cls(TenantKeyKind.UUID, value)

    @classmethod
    def slug(cls, value: str) -> TenantKey:
        """A slug key; ``value`` is validated and normalised."""
        return cls(TenantKeyKind.SLUG, value)

    @classmethod
    def host(cls, value: str) -> TenantKey:
        """A host key; ``value`` is validated and normalised."""
        return cls(TenantKeyKind.HOST, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def _validated_key(kind: TenantKeyKind, value: UUID | str) -> TenantKey:
    """A key for a value a validator just accepted, perhaps with its own reserved slugs:
    the constructor would check it again, against ``RESERVED_SLUGS``.

    Module-private on purpose: a public unchecked constructor would let a caller build a
    key holding anything.
    """
    key = object.__new__(TenantKey)
    object.__setattr__(key, "kind", kind)
    object.__setattr__(key, "value", value)
    return key


def _checked_uuid(value: UUID | str) -> UUID:
    if not isinstance(value, UUID):
        return _default_validator.validate_uuid(value)
    if not value.int:
        raise TenantValidationError(
            TenantValidationErrorKind.INVALID_UUID,
            str(value),
            "tenant uuid must not be the nil UUID",
        )
    return value
