"""What validates encodes, through the engine: an event the encoder cannot write is
refused by ``publish``, ``try_publish`` and ``tx.publish`` with ``EventValidationError``,
with and without a database, and nothing of it is stored or dispatched."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import uuid4

import msgspec
import pytest

from engine import Engine, Event, EventValidationError, ValidationErrorKind
from engine.catalog import MediaUploaded, TagCreated
from engine.events import decode

pytestmark = pytest.mark.anyio

Kind = ValidationErrorKind


class Reading(Event, tag="test.encodable.reading"):
    """A user event: plain ints, ints in a list, and a loosely typed payload."""

    value: int = 0
    history: list[int] = msgspec.field(default_factory=list)
    extra: Any = None


UNENCODABLE: list[Any] = [
    pytest.param(
        lambda: MediaUploaded(media_id=uuid4(), mime_type="image/png", size=10**5000),
        "size",
        Kind.OUT_OF_RANGE,
        id="catalog-size-of-5000-digits",
    ),
    pytest.param(
        lambda: MediaUploaded(media_id=uuid4(), mime_type="image/png", size=2**63),
        "size",
        Kind.OUT_OF_RANGE,
        id="catalog-size-past-its-bound",
    ),
    pytest.param(lambda: Reading(value=2**64), "value", Kind.OUT_OF_RANGE, id="user-int"),
    pytest.param(
        lambda: Reading(history=[1, -(2**63) - 1]),
        "history[1]",
        Kind.OUT_OF_RANGE,
        id="user-int-in-a-list",
    ),
    pytest.param(
        lambda: Reading(extra={"n": 10**5000}), "extra['n']", Kind.OUT_OF_RANGE, id="any-int"
    ),
    pytest.param(
        lambda: Reading(extra=["\ud800"]), "extra[0]", Kind.INVALID_CHARACTERS, id="any-surrogate"
    ),
    pytest.param(lambda: Reading(extra=object()), "extra", Kind.INVALID_VALUE, id="any-object"),
]


def outbox(path: str) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        return [bytes(row[0]).decode() for row in conn.execute("SELECT payload FROM outbox")]


@pytest.mark.parametrize("durable", [False, True], ids=["in-memory", "sqlite"])
@pytest.mark.parametrize(("make", "field", "kind"), UNENCODABLE)
async def test_publish_try_publish_and_tx_publish_refuse_what_cannot_be_encoded(
    tmp_path: Path,
    durable: bool,
    make: Callable[[], Event],
    field: str,
    kind: Kind,
) -> None:
    path = str(tmp_path / "app.db")
    seen: list[Event] = []

    async def handle(event: Event) -> None:
        seen.append(event)

    good = TagCreated(tag_id=uuid4())
    async with Engine(path if durable else None) as engine:
        engine.subscribe(Event, handler=handle, name="everything")
        bad = make()
        errors = []
        with pytest.raises(EventValidationError) as caught:
            await engine.publish(bad)
        errors.append(caught.value)
        with pytest.raises(EventValidationError) as caught:
            engine.try_publish(bad)
        errors.append(caught.value)
        if durable:

            def write(tx: Any) -> None:
                tx.publish(good)  # rolled back with the rest of the transaction
                tx.publish(bad)

            with pytest.raises(EventValidationError) as caught:
                await engine.transact(write)
            errors.append(caught.value)
        for error in errors:
            assert (error.event_type, error.field, error.kind) == (bad.event_type, field, kind)
            assert len(str(error)) < 300
        bp = engine.metrics().backpressure
        assert (bp.depth, bp.accepted, bp.rejected) == (0, 0, 0)
        await engine.publish(good)
    assert seen == [good]
    assert engine.dead_letters.count() == 0
    if durable:
        assert [decode(payload) for payload in outbox(path)] == [good]
