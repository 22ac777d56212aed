"""Tenant identifiers: the rules of CATALOG.md, normalisation, and hostile input."""

from __future__ import annotations

import pickle
import re
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine._errors import EngineError
from engine.tenancy import (
    RESERVED_SLUGS,
    TenantIdentifierValidator,
    TenantKey,
    TenantKeyKind,
    TenantNotFound,
    TenantValidationError,
    TenantValidationErrorKind,
)

Kind = TenantValidationErrorKind
validator = TenantIdentifierValidator()

# The documented forms of a normalised value.
SLUG_FORM = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_FORM = re.compile(rf"{HOST_LABEL}(?:\.{HOST_LABEL})*")
UUID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

CATALOG_RESERVED = [
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
]


def _id(value: object) -> str | None:
    """Short test ids: some parameters are a megabyte long."""
    if not isinstance(value, str):
        return None
    text = ascii(value)
    return text if len(text) <= 30 else f"{text[:24]}...{len(value)}"


def _kind(validate: object, value: str) -> Kind | None:
    assert callable(validate)
    try:
        validate(value)
    except TenantValidationError as error:
        caught = error
    else:
        return None
    assert caught.value == value
    return caught.kind


# Slugs


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  my-tenant  ", "my-tenant"),
        ("MyTenant123", "mytenant123"),
        ("acme", "acme"),
        ("a", "a"),
        ("0", "0"),
        ("tenant-", "tenant-"),
        ("a--b", "a--b"),
        ("\tacme\r\n", "acme"),
        ("a" * 64, "a" * 64),
        ("ADMIN1", "admin1"),
        ("apis", "apis"),
    ],
    ids=_id,
)
def test_slug_is_normalised(value: str, expected: str) -> None:
    assert validator.validate_slug(value) == expected


CATALOG_HOSTILE_SLUGS = [
    "'; DROP TABLE--",
    "1' OR '1'='1",
    "admin'--",
    "<script>alert(1)</script>",
    "javascript:alert(1)",
    "<img src=x>",
    "../../../etc/passwd",
    "..\\windows\\system32",
    "tenant@123",
    "tenant 123",
    "tenant_123",
    "tenant.123",
    "a" * 65,
]

OWN_HOSTILE = [
    # control characters, NUL, CR/LF (header and log injection)
    "acme\x00",
    "\x00acme",
    "ac\x00me",
    "acme\r\nX-Tenant-ID: other",
    "acme\nadmin",
    "acme\x1b[31m",
    "acme\x7f",
    "acme\x1f",
    "\x1cacme",
    "ac\tme",
    "acme\x0b\x0cother",
    # homoglyphs and full-width letters
    "\u0430cme",  # Cyrillic a
    "acm\u0435",  # Cyrillic e
    "\u03bfrg",  # Greek omicron
    "\uff41\uff43\uff4d\uff45",  # full-width acme
    "\u212aelvin",  # Kelvin sign, which lower-cases to ASCII k
    "\u0130stanbul",  # dotted capital I
    "acme\u0301",  # combining accent
    "\u2460",  # circled digit one
    "\uff11\uff12\uff13",  # full-width digits
    "\u0661\u0662",  # Arabic-Indic digits
    # invisible and bidirectional characters
    "ac\u200bme",
    "acme\u200d",
    "\ufeffacme",
    "acme\u202e",
    "\u202eemca",
    "\u2066acme\u2069",
    "acme\u00a0",
    "\u3000acme",
    "acme\u2028",
    "acme\u0085",
    # percent and other encodings
    "acme%00",
    "%61cme",
    "acme%2e%2e",
    "acme%0d%0a",
    "acme&#x41;",
    "acme\\u0041",
    # shell, template and query injection
    "$(whoami)",
    "`id`",
    "acme;rm -rf /",
    "acme|cat",
    "acme&&ls",
    "{{7*7}}",
    "${7*7}",
    "#{7*7}",
    "<%= 7*7 %>",
    "{% raw %}",
    "acme' --",
    'acme"',
    "acme)",
    "*",
    "acme*",
    "acme?",
    "acme#",
    "acme/",
    "/acme",
    "acme:8080",
    "-acme",
    "--",
    "-",
    # reserved names, in any case
    "admin",
    "ADMIN",
    " Api ",
    "localhost",
    # very long
    "a" * 1_000_000,
    "a" * 63 + "\u00e9",
]


@pytest.mark.parametrize(
    "value", CATALOG_HOSTILE_SLUGS + OWN_HOSTILE + ["", "   ", "\t\n"], ids=_id
)
def test_hostile_slug_is_rejected(value: str) -> None:
    assert _kind(validator.validate_slug, value) is not None


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("", Kind.EMPTY),
        ("   ", Kind.EMPTY),
        ("a" * 65, Kind.TOO_LONG),
        ("a" * 1_000_000, Kind.TOO_LONG),
        ("tenant_123", Kind.INVALID_CHARACTERS),
        ("-acme", Kind.INVALID_CHARACTERS),
        ("\u212aelvin", Kind.INVALID_CHARACTERS),
        ("acme\x00", Kind.INVALID_CHARACTERS),
        ("admin", Kind.RESERVED),
        ("Public", Kind.RESERVED),
    ],
    ids=_id,
)
def test_slug_error_kinds(value: str, kind: Kind) -> None:
    assert _kind(validator.validate_slug, value) is kind


def test_every_catalog_reserved_slug_is_reserved() -> None:
    assert len(CATALOG_RESERVED) == 41
    assert set(CATALOG_RESERVED) <= RESERVED_SLUGS
    for slug in CATALOG_RESERVED:
        assert _kind(validator.validate_slug, slug) is Kind.RESERVED
        assert _kind(validator.validate_slug, slug.upper()) is Kind.RESERVED


def test_reserved_slugs_can_be_extended() -> None:
    strict = TenantIdentifierValidator(reserved=RESERVED_SLUGS | {"Billing"})
    assert "billing" in strict.reserved
    assert _kind(strict.validate_slug, "billing") is Kind.RESERVED
    assert validator.validate_slug("billing") == "billing"
    assert _kind(strict.validate, "BILLING") is Kind.RESERVED


# UUIDs


@pytest.mark.parametrize("text", ["lower", "upper", "padded"], ids=_id)
def test_uuid_in_any_case(text: str) -> None:
    value = uuid4()
    raw = {"lower": str(value), "upper": str(value).upper(), "padded": f"  {value}\n"}[text]
    assert validator.validate_uuid(raw) == value
    assert validator.validate(raw) == TenantKey.uuid(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-uuid",
        "00000000-0000-0000-0000-000000000000",
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678123456781234567812345678",
        "12345678-1234-5678-1234-56781234567",
        "12345678-1234-5678-1234-5678123456789",
        "12345678-1234-5678-1234-56781234567g",
        "1234567_-1234-5678-1234-567812345678",
        "12345678+1234-5678-1234-567812345678",
        "\uff11" + "2345678-1234-5678-1234-567812345678",  # full-width digit
        "\u0661" + "2345678-1234-5678-1234-567812345678",  # Arabic-Indic digit
        "12345678-1234-5678-1234-567812345678\x00",
        "12345678-1234-5678-1234-5678123456\u200b78",
        "0x12345678-1234-5678-1234-5678123456",
        "1" * 1_000_000,
    ],
    ids=_id,
)
def test_malformed_uuid_is_rejected(value: str) -> None:
    assert _kind(validator.validate_uuid, value) in {Kind.INVALID_UUID, Kind.EMPTY}


# Hosts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  Example.COM  ", "example.com"),
        ("example.com", "example.com"),
        ("shop.example.co.uk", "shop.example.co.uk"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.e", "a-b.c-d.e"),
        ("localhost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
    ids=_id,
)
def test_host_is_normalised(value: str, expected: str) -> None:
    assert validator.validate_host(value) == expected


CATALOG_HOSTILE_HOSTS = [
    "",
    "invalid host",
    "example..com",
    "-example.com",
    "example-.com",
    "a" * 250 + ".com",
]

OWN_HOSTILE_HOSTS = [
    ".example.com",
    "example.com.",
    ".",
    "..",
    "a" * 64 + ".com",
    "example.com:8080",
    "user@example.com",
    "http://example.com",
    "example.com/path",
    "example.com\\path",
    "exa_mple.com",
    "example.com\r\nX-Injected: 1",
    "example.com\x00.evil.com",
    "example.com%00",
    "example%2ecom",
    "\u0435xample.com",  # Cyrillic e
    "\uff45xample.com",  # full-width e
    "example\u3002com",  # ideographic full stop
    "example\uff0ecom",  # full-width full stop
    "b\u00fccher.example",  # IDN must arrive as punycode
    "example.com\u202e",
    "ex\u200bample.com",
    "[::1]",
    "*.example.com",
    "$(id).example.com",
    "{{host}}.example.com",
    "example.com;ls",
    "a." * 127 + "a",  # 255 characters
    "a." * 500_000,
]


@pytest.mark.parametrize("value", CATALOG_HOSTILE_HOSTS + OWN_HOSTILE_HOSTS, ids=_id)
def test_hostile_host_is_rejected(value: str) -> None:
    assert _kind(validator.validate_host, value) is not None


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("", Kind.EMPTY),
        ("a" * 250 + ".com", Kind.HOSTNAME_TOO_LONG),
        (".".join(["a" * 63] * 3 + ["a" * 61]), None),
        ("invalid host", Kind.INVALID_HOSTNAME),
        ("example..com", Kind.INVALID_HOSTNAME),
        ("-example.com", Kind.INVALID_HOSTNAME),
        ("example-.com", Kind.INVALID_HOSTNAME),
        ("\u0435xample.com", Kind.INVALID_HOSTNAME),
    ],
    ids=_id,
)
def test_host_error_kinds(value: str, kind: Kind | None) -> None:
    assert _kind(validator.validate_host, value) is kind


# validate(): uuid, else host when dotted, else slug


@pytest.mark.parametrize(
    ("value", "kind", "normalised"),
    [
        ("  my-tenant  ", TenantKeyKind.SLUG, "my-tenant"),
        ("MyTenant123", TenantKeyKind.SLUG, "mytenant123"),
        ("  Example.COM  ", TenantKeyKind.HOST, "example.com"),
        ("tenant.123", TenantKeyKind.HOST, "tenant.123"),
        (
            "123E4567-E89B-12D3-A456-426614174000",
            TenantKeyKind.UUID,
            UUID("123e4567-e89b-12d3-a456-426614174000"),
        ),
        # Not hex, so not a uuid: a slug that happens to have the same shape.
        (
            "123e4567-e89b-12d3-a456-42661417400g",
            TenantKeyKind.SLUG,
            "123e4567-e89b-12d3-a456-42661417400g",
        ),
    ],
    ids=_id,
)
def test_validate_picks_the_kind(value: str, kind: TenantKeyKind, normalised: object) -> None:
    key = validator.validate(value)
    assert (key.kind, key.value) == (kind, normalised)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("00000000-0000-0000-0000-000000000000", Kind.INVALID_UUID),
        ("example..com", Kind.INVALID_HOSTNAME),
        ("admin", Kind.RESERVED),
        ("", Kind.EMPTY),
        ("a" * 1_000_000, Kind.TOO_LONG),
        ("a." * 500_000, Kind.HOSTNAME_TOO_LONG),
    ],
    ids=_id,
)
def test_validate_reports_the_kind_of_the_form_it_picked(value: str, kind: Kind) -> None:
    assert _kind(validator.validate, value) is kind


@pytest.mark.parametrize(
    ("value", "kind", "normalised"),
    [
        # A dotted value named as a slug is a malformed slug, not a host.
        ("acme.example", TenantKeyKind.HOST, "acme.example"),
        ("  Acme  ", TenantKeyKind.SLUG, "acme"),
        ("acme", "host", "acme"),
        # The uuid shape named as a slug stays a slug.
        (
            "123e4567-e89b-12d3-a456-426614174000",
            "slug",
            "123e4567-e89b-12d3-a456-426614174000",
        ),
        (
            " 123E4567-E89B-12D3-A456-426614174000 ",
            TenantKeyKind.UUID,
            UUID("123e4567-e89b-12d3-a456-426614174000"),
        ),
    ],
    ids=_id,
)
def test_validate_with_a_kind_takes_that_form(
    value: str, kind: TenantKeyKind | str, normalised: object
) -> None:
    key = validator.validate(value, kind=kind)
    assert (key.kind, key.value) == (TenantKeyKind(kind), normalised)
    assert key == TenantKey(TenantKeyKind(kind), value)


@pytest.mark.parametrize(
    ("value", "kind", "error"),
    [
        ("acme.example", TenantKeyKind.SLUG, Kind.INVALID_CHARACTERS),
        ("acme", TenantKeyKind.UUID, Kind.INVALID_UUID),
        ("acme..example", "host", Kind.INVALID_HOSTNAME),
        ("admin", "slug", Kind.RESERVED),
        ("", TenantKeyKind.HOST, Kind.EMPTY),
    ],
    ids=_id,
)
def test_validate_with_a_kind_refuses_other_forms(
    value: str, kind: TenantKeyKind | str, error: Kind
) -> None:
    with pytest.raises(TenantValidationError) as caught:
        validator.validate(value, kind=kind)
    assert caught.value.kind is error


@pytest.mark.parametrize("kind", ["tenant", "SLUG", "", 1, []])
def test_validate_refuses_an_unknown_kind(kind: object) -> None:
    rule = rf"one of 'uuid', 'slug', 'host', got {re.escape(repr(kind))}$"
    with pytest.raises(ValueError, match=rule):
        validator.validate("acme", kind=kind)  # type: ignore[arg-type]


def test_a_validator_with_its_own_reserved_slugs_builds_keys_the_constructor_refuses() -> None:
    # RESERVED_SLUGS holds "api"; this validator reserves only "billing". Its keys carry
    # what it accepted, without the constructor's second check against RESERVED_SLUGS.
    lenient = TenantIdentifierValidator(reserved=frozenset({"billing"}))
    for key in (lenient.validate("API"), lenient.validate("api", kind=TenantKeyKind.SLUG)):
        assert (key.kind, key.value) == (TenantKeyKind.SLUG, "api")
    with pytest.raises(TenantValidationError):
        TenantKey.slug("api")
    assert _kind(lenient.validate, "billing") is Kind.RESERVED


def _documented(key: TenantKey) -> bool:
    if key.kind is TenantKeyKind.UUID:
        return isinstance(key.value, UUID) and key.value.int != 0
    assert isinstance(key.value, str)
    if key.kind is TenantKeyKind.SLUG:
        return SLUG_FORM.fullmatch(key.value) is not None and key.value not in RESERVED_SLUGS
    return HOST_FORM.fullmatch(key.value) is not None and len(key.value) <= 253


@pytest.mark.parametrize(
    "value",
    CATALOG_HOSTILE_SLUGS + OWN_HOSTILE + CATALOG_HOSTILE_HOSTS + OWN_HOSTILE_HOSTS,
    ids=_id,
)
def test_validate_refuses_hostile_input_or_returns_a_documented_key(value: str) -> None:
    try:
        key = validator.validate(value)
    except TenantValidationError:
        return
    assert _documented(key)


@pytest.mark.parametrize(
    "value",
    [
        "a" * 1_000_000,
        "-" * 1_000_000,
        "." * 1_000_000,
        "a." * 500_000,
        "a-" * 500_000,
        "0" * 1_000_000,
        "f" * 8 + "-" + "f" * 1_000_000,
        " " * 1_000_000,
        " " * 500_000 + "acme" + " " * 500_000,
        "\u00e9" * 1_000_000,
        "\x00" * 1_000_000,
        "%41" * 333_333,
    ],
    ids=_id,
)
def test_megabyte_inputs_are_settled(value: str) -> None:
    # Never a timing assertion: what matters is that each call returns at all. The
    # validators refuse by length before scanning, so a backtracking pattern or a
    # quadratic scan would show up as this test hanging into its timeout.
    for validate in (
        validator.validate_slug,
        validator.validate_uuid,
        validator.validate_host,
        validator.validate,
    ):
        _kind(validate, value)


def test_non_string_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        validator.validate(b"acme")  # type: ignore[arg-type]


# Property tests

IDENTIFIER_TEXT = st.one_of(
    st.text(),
    st.text(alphabet="abcdefABCDEF0123456789-. _\t\n\x00", max_size=70),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,80}", fullmatch=True),
    st.uuids().map(str).map(str.upper),
)


@settings(max_examples=400, deadline=None)
@given(IDENTIFIER_TEXT)
def test_any_text_as_slug_is_refused_or_normalised(value: str) -> None:
    kind = _kind(validator.validate_slug, value)
    if kind is not None:
        return
    slug = validator.validate_slug(value)
    assert SLUG_FORM.fullmatch(slug)
    assert slug not in RESERVED_SLUGS
    assert validator.validate_slug(slug) == slug


@settings(max_examples=400, deadline=None)
@given(IDENTIFIER_TEXT)
def test_any_text_as_uuid_is_refused_or_parsed(value: str) -> None:
    kind = _kind(validator.validate_uuid, value)
    if kind is not None:
        return
    parsed = validator.validate_uuid(value)
    assert UUID_FORM.fullmatch(str(parsed))
    assert str(parsed) == value.strip().lower()


@settings(max_examples=400, deadline=None)
@given(IDENTIFIER_TEXT)
def test_any_text_as_host_is_refused_or_normalised(value: str) -> None:
    kind = _kind(validator.validate_host, value)
    if kind is not None:
        return
    host = validator.validate_host(value)
    assert HOST_FORM.fullmatch(host)
    assert len(host) <= 253
    assert validator.validate_host(host) == host


@settings(max_examples=400, deadline=None)
@given(IDENTIFIER_TEXT)
def test_any_text_to_validate_is_refused_or_a_documented_key(value: str) -> None:
    try:
        key = validator.validate(value)
    except TenantValidationError:
        return
    assert _documented(key)
    assert validator.validate(str(key.value)) == key


@settings(max_examples=400, deadline=None)
@given(st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True))
def test_every_accepted_slug_round_trips_unchanged(slug: str) -> None:
    if slug in RESERVED_SLUGS:
        assert _kind(validator.validate_slug, slug) is Kind.RESERVED
        return
    assert validator.validate_slug(slug) == slug
    assert TenantKey.slug(slug).value == slug
    if not UUID_FORM.fullmatch(slug):
        assert validator.validate(slug) == TenantKey.slug(slug)


# TenantKey


def test_tenant_key_constructors_validate_and_normalise() -> None:
    value = uuid4()
    assert TenantKey.uuid(value).value == value
    assert TenantKey.uuid(str(value).upper()).value == value
    assert TenantKey.slug(" Acme ") == TenantKey(TenantKeyKind.SLUG, "acme")
    assert TenantKey.host("Shop.Example.COM").value == "shop.example.com"
    assert TenantKey("slug", "acme").kind is TenantKeyKind.SLUG  # type: ignore[arg-type]
    with pytest.raises(TenantValidationError):
        TenantKey.slug("admin")
    with pytest.raises(TenantValidationError):
        TenantKey.host("bad host")
    with pytest.raises(TenantValidationError):
        TenantKey.uuid(UUID(int=0))
    with pytest.raises(TenantValidationError):
        TenantKey(TenantKeyKind.SLUG, "a b")
    with pytest.raises(TypeError):
        TenantKey(TenantKeyKind.SLUG, uuid4())
    with pytest.raises(ValueError, match="'bogus' is not a valid TenantKeyKind"):
        TenantKey("bogus", "acme")  # type: ignore[arg-type]


def test_tenant_keys_compare_hash_and_print() -> None:
    assert TenantKey.slug("ACME") == TenantKey.slug("acme")
    assert len({TenantKey.slug("acme"), TenantKey.slug(" acme"), TenantKey.host("acme.io")}) == 2
    assert TenantKey.slug("acme") != TenantKey.host("acme")
    assert str(TenantKey.slug("acme")) == "slug:acme"
    assert str(TenantKey.host("acme.io")) == "host:acme.io"
    value = uuid4()
    assert str(TenantKey.uuid(value)) == f"uuid:{value}"


def test_tenant_keys_are_frozen() -> None:
    key = TenantKey.slug("acme")
    with pytest.raises(AttributeError):
        key.value = "other"  # type: ignore[misc]


# Errors


def test_tenant_validation_error_carries_kind_and_value() -> None:
    with pytest.raises(TenantValidationError) as caught:
        validator.validate_slug("Admin")
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, EngineError)
    assert (error.kind, error.value) == (Kind.RESERVED, "Admin")
    assert str(error) == "tenant slug 'admin' is reserved, got 'Admin' (RESERVED)"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.value, str(copy)) == (error.kind, error.value, str(error))


def test_tenant_validation_error_message_is_short_and_escaped() -> None:
    with pytest.raises(TenantValidationError) as caught:
        validator.validate_slug("x\r\n" + "y" * 10_000)
    text = str(caught.value)
    assert len(text) < 200
    assert "\r" not in text
    assert "\n" not in text


def test_tenant_validation_error_kinds() -> None:
    assert [kind.name for kind in Kind] == [
        "EMPTY",
        "TOO_LONG",
        "INVALID_CHARACTERS",
        "RESERVED",
        "INVALID_UUID",
        "HOSTNAME_TOO_LONG",
        "INVALID_HOSTNAME",
    ]


def test_tenant_not_found_names_the_key() -> None:
    error = TenantNotFound(TenantKey.slug("acme"))
    assert isinstance(error, EngineError)
    assert error.key == TenantKey.slug("acme")
    assert str(error) == "no tenant for slug:acme"
