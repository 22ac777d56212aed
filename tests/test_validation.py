"""The reusable validators of engine.validation, one behaviour at a time."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.validation import (
    Check,
    EventValidationError,
    ValidationErrorKind,
    check_currency,
    check_email,
    check_identifier,
    check_locale,
    check_max_bytes,
    check_mime_type,
    check_not_blank,
    check_optional_uuid_not_nil,
    check_range,
    check_uuid_not_nil,
)

Kind = ValidationErrorKind
Validator = Callable[[str, str, Any], None]


def _kind_of(validator: Validator, value: Any) -> Kind | None:
    try:
        validator("test.event", "field", value)
    except EventValidationError as error:
        caught = error
    else:
        return None
    assert (caught.event_type, caught.field) == ("test.event", "field")
    return caught.kind


def test_validation_error_kinds_are_the_seven_of_the_design() -> None:
    assert [kind.name for kind in Kind] == [
        "EMPTY_FIELD",
        "FIELD_TOO_LONG",
        "NIL_UUID",
        "INVALID_VALUE",
        "MISSING_FIELD",
        "OUT_OF_RANGE",
        "INVALID_CHARACTERS",
    ]


@pytest.mark.parametrize("value", ["a", " a ", "\u00e9", "0"])
def test_not_blank_accepts_text(value: str) -> None:
    assert _kind_of(check_not_blank, value) is None


@pytest.mark.parametrize("value", ["", " ", "\t\n", "\u3000", "\u00a0 \u2003"])
def test_not_blank_refuses_empty_and_white_space(value: str) -> None:
    assert _kind_of(check_not_blank, value) is Kind.EMPTY_FIELD


@pytest.mark.parametrize(
    ("value", "limit", "ok"),
    [
        ("", 0, True),
        ("a" * 10, 10, True),
        ("a" * 11, 10, False),
        ("\u00e9" * 5, 10, True),  # 2 bytes each
        ("\u00e9" * 6, 10, False),
        ("\u20ac" * 3, 9, True),  # 3 bytes each
        ("\u20ac" * 3, 8, False),
        ("\U0001f600" * 2, 8, True),  # 4 bytes each
        ("\U0001f600" * 2, 7, False),
        ("\ud800", 3, True),  # a lone surrogate counts as 3; the type check refuses it
        ("\ud800", 2, False),
    ],
)
def test_max_bytes_counts_utf8_bytes(value: str, limit: int, ok: bool) -> None:
    kind = _kind_of(partial(check_max_bytes, limit=limit), value)
    assert kind is (None if ok else Kind.FIELD_TOO_LONG)


def test_max_bytes_message_gives_the_limit_and_the_size() -> None:
    with pytest.raises(EventValidationError, match=r"at most 4 bytes \(UTF-8\), got 6"):
        check_max_bytes("e", "f", "\u00e9\u00e9\u00e9", 4)


def test_uuid_validators() -> None:
    nil = UUID(int=0)
    assert _kind_of(check_uuid_not_nil, uuid4()) is None
    assert _kind_of(check_uuid_not_nil, nil) is Kind.NIL_UUID
    assert _kind_of(check_optional_uuid_not_nil, None) is None
    assert _kind_of(check_optional_uuid_not_nil, uuid4()) is None
    assert _kind_of(check_optional_uuid_not_nil, nil) is Kind.NIL_UUID


@pytest.mark.parametrize(
    ("value", "ge", "le", "ok"),
    [
        (0, 0, None, True),
        (-1, 0, None, False),
        (10, None, 10, True),
        (11, None, 10, False),
        (5, 1, 5, True),
        (0.5, 1, 5, False),
        (5.5, 1, 5, False),
        (-(10**30), None, None, True),
    ],
)
def test_range_is_inclusive(value: float, ge: float | None, le: float | None, ok: bool) -> None:
    kind = _kind_of(partial(check_range, ge=ge, le=le), value)
    assert kind is (None if ok else Kind.OUT_OF_RANGE)


@pytest.mark.parametrize(
    ("ge", "le", "text"),
    [(1, 5, "between 1 and 5, got 9"), (10, None, ">= 10, got 9")],
)
def test_range_message_names_the_bounds(ge: float, le: float | None, text: str) -> None:
    with pytest.raises(EventValidationError, match=text):
        check_range("e", "f", 9, ge=ge, le=le)


def test_range_message_with_an_upper_bound_only() -> None:
    with pytest.raises(EventValidationError, match="<= 1, got 9"):
        check_range("e", "f", 9, le=1)


def test_range_message_of_an_integer_too_long_to_print() -> None:
    # str() of an int past 4300 digits raises ValueError: the message must not.
    with pytest.raises(EventValidationError) as caught:
        check_range("e", "f", 10**5000, le=1)
    assert caught.value.message == "must be <= 1, got <int of 16610 bits>"


@pytest.mark.parametrize("value", ["", "article", "blog-post", "page_2", "A-Z_0-9"])
def test_identifier_accepts_letters_digits_dash_underscore(value: str) -> None:
    assert _kind_of(check_identifier, value) is None


@pytest.mark.parametrize(
    "value",
    [
        "blog post",
        "blog.post",
        "blog/post",
        "a\x00b",
        "a\nb",
        "caf\u00e9",
        "\u0430rticle",  # Cyrillic a
        "\uff41rticle",  # full-width a
        "article\u200b",  # zero-width space
        "a%20b",
        "$(id)",
        "{{7*7}}",
    ],
)
def test_identifier_refuses_anything_else(value: str) -> None:
    assert _kind_of(check_identifier, value) is Kind.INVALID_CHARACTERS


def test_identifier_message_points_at_the_first_bad_character() -> None:
    with pytest.raises(EventValidationError, match=r"got ' ' at 4"):
        check_identifier("e", "f", "blog post")


@pytest.mark.parametrize("value", ["EUR", "USD", "JPY", "XAU"])
def test_currency_accepts_three_uppercase_letters(value: str) -> None:
    assert _kind_of(check_currency, value) is None


@pytest.mark.parametrize(
    "value", ["", "eur", "Eur", "EU", "EURO", "E1R", "\u00c9UR", "\uff25\uff35\uff32", "EU ", "US$"]
)
def test_currency_refuses_other_shapes(value: str) -> None:
    assert _kind_of(check_currency, value) is Kind.INVALID_VALUE


@pytest.mark.parametrize(
    "value",
    [
        "image/png",
        "text/plain",
        "application/vnd.api+json",
        "application/x-www-form-urlencoded",
        "IMAGE/PNG",
        "video/mp4",
    ],
)
def test_mime_type_accepts_type_slash_subtype(value: str) -> None:
    assert _kind_of(check_mime_type, value) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "image",
        "image/",
        "/png",
        "image/png/x",
        "image png",
        "image/png; charset=utf-8",
        "image/png\n",
        "-image/png",
        "im\u00e4ge/png",
        "a" * 128 + "/png",
    ],
)
def test_mime_type_refuses_other_shapes(value: str) -> None:
    assert _kind_of(check_mime_type, value) is Kind.INVALID_VALUE


@pytest.mark.parametrize(
    "value",
    [
        "user@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.ie",
        "x@a-b.io",
        "jos\u00e9@exampl\u00e9.fr",
        "a" * 64 + "@example.com",
    ],
)
def test_email_accepts_plausible_addresses(value: str) -> None:
    assert _kind_of(check_email, value) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plainaddress",
        "@example.com",
        "user@",
        "user@localhost",
        "user@@example.com",
        "user@exa@mple.com",
        "user@example..com",
        "user@.example.com",
        "user@example.com.",
        "user@-example.com",
        "user@example-.com",
        "user@example.123",
        "user@[192.168.0.1]",
        ".user@example.com",
        "user.@example.com",
        "us..er@example.com",
        "us er@example.com",
        '"user"@example.com',
        "user@exam ple.com",
        "user@example.com\r\nBcc: victim@example.com",
        "user\x00@example.com",
        "user@example.com\u202e",
        "a" * 65 + "@example.com",
        "user@" + "a" * 64 + ".com",
        "<script>@example.com",
    ],
)
def test_email_refuses_implausible_addresses(value: str) -> None:
    assert _kind_of(check_email, value) is Kind.INVALID_VALUE


@pytest.mark.parametrize("value", ["en", "de", "pt-BR", "en_GB", "zh-Hant", "zh-Hant-TW", "es-419"])
def test_locale_accepts_language_script_region(value: str) -> None:
    assert _kind_of(check_locale, value) is None


@pytest.mark.parametrize(
    "value", ["", "e", "english", "en-", "en-USA1", "en--US", "en-US-x", "1en", "en US", "\u00e9n"]
)
def test_locale_refuses_other_shapes(value: str) -> None:
    assert _kind_of(check_locale, value) is Kind.INVALID_VALUE


HUGE = [
    "a" * 1_000_000,
    "-" * 1_000_000,
    "a/" * 500_000,
    "a@" * 500_000,
    "a." * 500_000 + "@",
    "a@" + "b." * 500_000,
    "en-" * 333_333,
    " " * 1_000_000,
    "\u00e9" * 1_000_000,
]
VALIDATORS: list[Validator] = [
    check_not_blank,
    partial(check_max_bytes, limit=255),
    check_identifier,
    check_currency,
    check_mime_type,
    check_email,
    check_locale,
]


@pytest.mark.parametrize("validator", VALIDATORS)
def test_validators_finish_on_megabyte_inputs(validator: Validator) -> None:
    # No timing is asserted: a backtracking pattern would simply not finish in the
    # test timeout, which is the failure this guards against.
    for value in HUGE:
        _kind_of(validator, value)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_validators_raise_only_event_validation_error(value: str) -> None:
    for validator in VALIDATORS:
        _kind_of(validator, value)


def test_check_takes_only_callables() -> None:
    with pytest.raises(TypeError, match="callables"):
        Check("not a rule")  # type: ignore[arg-type]
    check = Check(check_not_blank)
    assert check.rules == (check_not_blank,)
    assert "check_not_blank" in repr(check)
