"""Reusable field validators for events.

Each validator is a small function ``check_x(event_type, field, value, ...)`` that returns
``None`` or raises ``EventValidationError`` with the kind CATALOG.md gives for that rule.
They serve in ``Check`` metadata (parameterised ones through ``functools.partial``)::

    kind: Annotated[str, Check(check_not_blank, partial(check_max_bytes, limit=64))]

and in an event's ``cross_check`` for cross-field rules. Every one runs in linear time: none
uses a regular expression that can backtrack.
"""

from __future__ import annotations

import re
from typing import Final
from uuid import UUID

from ._events import Check, EventValidationError, Rule, ValidationErrorKind, _preview

__all__ = [
    "Check",
    "EventValidationError",
    "Rule",
    "ValidationErrorKind",
    "check_currency",
    "check_email",
    "check_identifier",
    "check_locale",
    "check_max_bytes",
    "check_mime_type",
    "check_not_blank",
    "check_optional_uuid_not_nil",
    "check_range",
    "check_uuid_not_nil",
]

_Kind = ValidationErrorKind


def check_not_blank(event_type: str, field: str, value: str) -> None:
    """Not empty once white space is trimmed (``EMPTY_FIELD``)."""
    # Same white space as str.strip(), without building the stripped copy.
    if not value or value.isspace():
        shown = "" if not value else f", got {_preview(value)}"
        raise EventValidationError(
            event_type, field, _Kind.EMPTY_FIELD, f"must not be empty{shown}"
        )


def check_max_bytes(event_type: str, field: str, value: str, limit: int) -> None:
    """At most ``limit`` bytes once encoded as UTF-8 (``FIELD_TOO_LONG``)."""
    length = len(value)
    # A code point takes 1 to 4 bytes: most strings are settled without encoding them.
    if length * 4 <= limit or (length <= limit and value.isascii()):
        return
    # surrogatepass: a lone surrogate is the type check's business, not a crash here.
    size = length if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise EventValidationError(
            event_type,
            field,
            _Kind.FIELD_TOO_LONG,
            f"must be at most {limit} bytes (UTF-8), got {size}: {_preview(value)}",
        )


def check_uuid_not_nil(event_type: str, field: str, value: UUID) -> None:
    """Not the nil UUID ``00000000-0000-0000-0000-000000000000`` (``NIL_UUID``)."""
    if value.int == 0:
        raise EventValidationError(event_type, field, _Kind.NIL_UUID, "must not be the nil UUID")


def check_optional_uuid_not_nil(event_type: str, field: str, value: UUID | None) -> None:
    """Absent, or not the nil UUID (``NIL_UUID``)."""
    if value is not None:
        check_uuid_not_nil(event_type, field, value)


def check_range(
    event_type: str,
    field: str,
    value: float,
    *,
    ge: float | None = None,
    le: float | None = None,
) -> None:
    """``ge <= value <= le``, either bound optional (``OUT_OF_RANGE``)."""
    if (ge is not None and value < ge) or (le is not None and value > le):
        if ge is not None and le is not None:
            rule = f"between {ge} and {le}"
        elif ge is not None:
            rule = f">= {ge}"
        else:
            rule = f"<= {le}"
        raise EventValidationError(
            event_type, field, _Kind.OUT_OF_RANGE, f"must be {rule}, got {_preview(value)}"
        )


_IDENTIFIER: Final = re.compile(r"[A-Za-z0-9_-]*")
_IDENTIFIER_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
)


def check_identifier(event_type: str, field: str, value: str) -> None:
    """Only ASCII letters, digits, ``-`` and ``_`` (``INVALID_CHARACTERS``).

    ASCII only: a Cyrillic letter can look exactly like a Latin one and would make two
    kinds that read the same.
    """
    if _IDENTIFIER.fullmatch(value) is None:
        position, char = next((i, c) for i, c in enumerate(value) if c not in _IDENTIFIER_CHARS)
        raise EventValidationError(
            event_type,
            field,
            _Kind.INVALID_CHARACTERS,
            "may contain only ASCII letters, digits, '-' and '_',"
            f" got {char!r} at {position} in {_preview(value)}",
        )


def check_currency(event_type: str, field: str, value: str) -> None:
    """Shaped like an ISO 4217 code: three uppercase ASCII letters (``INVALID_VALUE``)."""
    if not (len(value) == 3 and value.isascii() and value.isalpha() and value.isupper()):
        raise EventValidationError(
            event_type,
            field,
            _Kind.INVALID_VALUE,
            f"must be 3 uppercase ASCII letters (ISO 4217), got {_preview(value)}",
        )


# RFC 6838 section 4.2 restricted names; parameters ("; charset=...") are not part of it.
_MIME_NAME: Final = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MIME_TYPE: Final = re.compile(f"{_MIME_NAME}/{_MIME_NAME}")


def check_mime_type(event_type: str, field: str, value: str) -> None:
    """A media type ``type/subtype`` without parameters, e.g. ``image/png`` (``INVALID_VALUE``)."""
    if _MIME_TYPE.fullmatch(value) is None:
        raise EventValidationError(
            event_type,
            field,
            _Kind.INVALID_VALUE,
            f"must be a media type of the form type/subtype, got {_preview(value)}",
        )


# Characters that only a quoted local part may hold; quoted local parts are refused.
_EMAIL_LOCAL_FORBIDDEN: Final = frozenset('()<>[]:;,\\"@')


def check_email(event_type: str, field: str, value: str) -> None:
    """A plausible address ``local@domain.tld`` (``INVALID_VALUE``).

    Plausible, not deliverable: one ``@``, a local part of at most 64 bytes without
    white space, control characters, quotes or leading, trailing or doubled dots, and a
    domain of at least two dot-separated labels of letters, digits and inner hyphens
    (non-ASCII letters allowed for internationalised addresses) whose last is not numeric.
    """
    if not _plausible_email(value):
        raise EventValidationError(
            event_type,
            field,
            _Kind.INVALID_VALUE,
            f"must be an email address like name@example.com, got {_preview(value)}",
        )


def _plausible_email(value: str) -> bool:
    local, at, domain = value.partition("@")
    if not at or not local or not domain or not value.isprintable():
        return False
    if len(local.encode("utf-8", "surrogatepass")) > 64:
        return False
    if local[0] == "." or local[-1] == "." or ".." in local:
        return False
    if any(c.isspace() or c in _EMAIL_LOCAL_FORBIDDEN for c in local):
        return False
    labels = domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    for label in labels:
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not label.replace("-", "").isalnum():
            return False
    return True


# language, optional script, optional region: en, pt-BR, zh-Hant-TW, es-419, en_GB.
_LOCALE: Final = re.compile(
    r"[A-Za-z]{2,3}(?:[-_][A-Za-z]{4})?(?:[-_](?:[A-Za-z]{2}|[0-9]{3}))?", re.ASCII
)


def check_locale(event_type: str, field: str, value: str) -> None:
    """A locale tag: language, optional script, optional region (``INVALID_VALUE``).

    The common subset of BCP 47 (``en``, ``pt-BR``, ``zh-Hant-TW``, ``es-419``), with
    ``_`` accepted as a separator as POSIX locales write it (``en_GB``).
    """
    if _LOCALE.fullmatch(value) is None:
        raise EventValidationError(
            event_type,
            field,
            _Kind.INVALID_VALUE,
            f"must be a locale tag like en or pt-BR, got {_preview(value)}",
        )
