"""Scenario: the cost of an event on the way in and out of the bus.

Per event, in microseconds (median over several repetitions): ``validate()`` then
``encode()`` as a publisher pays it, and ``decode()`` as the relay pays it, for a small
catalog event (``TagCreated``: one id) and a large one (``InventoryUpdated``: five ids, two
quantities, the envelope filled in). Beside them, the raw msgspec limit: encoding with no
validation, and decoding with a decoder of that one type instead of the union of every
registered event. Timings depend on the machine and its load; compare figures from the
same run only.

    python benchmarks/scenario_events.py [n]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from uuid import uuid4

import msgspec

from engine.catalog import InventoryUpdated, TagCreated
from engine.events import Event, decode, encode

__all__ = ["run"]

REPETITIONS = 7


def _events() -> dict[str, Event]:
    return {
        "small": TagCreated(tag_id=uuid4()),
        "large": InventoryUpdated(
            variant_id=uuid4(),
            product_id=uuid4(),
            location_id=uuid4(),
            old_quantity=12,
            new_quantity=7,
            tenant_id=uuid4(),
            actor_id=uuid4(),
            correlation_id=uuid4(),
            causation_id=uuid4(),
        ),
    }


def _median_us(step: Callable[[], object], n: int) -> float:
    """Median over the repetitions of the mean time of one step, in microseconds."""
    step()  # warm up: the first validate() builds the class's validator
    samples = []
    for _ in range(REPETITIONS):
        start = time.perf_counter_ns()
        for _ in range(n):
            step()
        samples.append((time.perf_counter_ns() - start) / n / 1000)
    return statistics.median(samples)


def _validate_and_encode(event: Event) -> Callable[[], object]:
    def step() -> bytes:
        event.validate()
        return encode(event)

    return step


def _decoding(data: bytes) -> Callable[[], object]:
    def step() -> Event:
        return decode(data)

    return step


def _raw_encoding(event: Event) -> Callable[[], object]:
    encoder = msgspec.json.Encoder()

    def step() -> bytes:
        return encoder.encode(event)

    return step


def _raw_decoding(cls: type[Event], data: bytes) -> Callable[[], object]:
    decoder = msgspec.json.Decoder(cls)

    def step() -> Event:
        return decoder.decode(data)

    return step


def run(n: int) -> dict[str, float]:
    """Median µs per event, keyed ``<small|large>_<measure>_us``.

    Measures: ``validate_encode`` and ``decode`` (ours), ``raw_encode`` and ``raw_decode``
    (msgspec alone).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    results: dict[str, float] = {}
    for size, event in _events().items():
        data = encode(event)
        if decode(data) != event:  # pragma: no cover - a broken codec must not be timed
            raise AssertionError(f"{type(event).__name__} does not survive a round trip")
        results[f"{size}_validate_encode_us"] = _median_us(_validate_and_encode(event), n)
        results[f"{size}_decode_us"] = _median_us(_decoding(data), n)
        results[f"{size}_raw_encode_us"] = _median_us(_raw_encoding(event), n)
        results[f"{size}_raw_decode_us"] = _median_us(_raw_decoding(type(event), data), n)
    return results


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else 20_000
    for name, value in run(n).items():
        print(f"{name:28s} {value:8.2f}")
    for size, event in _events().items():
        print(f"{size}: {type(event).__name__}, {len(encode(event))} bytes encoded")


if __name__ == "__main__":
    main(sys.argv)
