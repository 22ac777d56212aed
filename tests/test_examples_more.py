"""The supervision, backpressure, breaker, tenant and FastAPI examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_supervision_restarts_with_backoff_and_dead_letters_the_poison(backend: str) -> None:
    out = run_example("supervision.py", backend)
    assert "writer has ['A', 'B']" in out
    assert "ask raised after 3 attempts: cannot parse 'poison'" in out
    assert out.count("[parser] on_restart after ValueError: cannot parse 'poison'") == 3
    assert out.count("[writer] on_restart after ValueError: cannot parse 'poison'") == 3
    assert "[reader] on_restart" not in out
    assert "backoff grows: True" in out
    assert "writer has ['C']" in out
    assert "reader still answers: ping" in out
    assert "#1 parser: 'poison' failed, ValueError: cannot parse 'poison', attempts=3" in out
    assert "reader: restarts=0 processed=1 failed=0" in out
    assert "parser: restarts=3 processed=3 failed=3" in out
    assert "writer: restarts=3" in out
    assert out.rstrip().endswith("done")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_backpressure_walks_to_critical_and_back(backend: str) -> None:
    out = run_example("backpressure.py", backend)
    assert "after event 69: depth  70 -> NORMAL to WARNING" in out
    assert "after event 89: depth  90 -> WARNING to CRITICAL" in out
    assert "event 90 refused at depth 90: BackpressureError" in out
    assert "publish(timeout=0.001) gave up: BackpressureError" in out
    assert "publish(timeout=5) waited" in out
    assert "-> WARNING to NORMAL" in out
    assert "states seen: NORMAL -> WARNING -> CRITICAL -> WARNING -> NORMAL" in out
    assert "metrics: depth=0 peak_depth=90 accepted=91 rejected=2 transitions=4" in out
    assert "handled 91 of 91 published, in order: True" in out
    assert out.rstrip().endswith("done")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_circuit_breaker_opens_probes_and_closes(backend: str) -> None:
    out = run_example("circuit_breaker.py", backend)
    lines = [line.strip() for line in out.splitlines()]
    assert "0. breaker 'payments' starts CLOSED" in lines
    assert "o-5: failed: payment service down (call 5)" in lines
    assert lines.count("state: OPEN") == 2
    refused = [line for line in lines if line.startswith("o-6: CircuitOpenError, retry_after=0.")]
    assert refused, out
    assert refused[0].endswith(" s, service not called")
    assert "state: HALF_OPEN" in lines
    assert "o-9: ok: receipt-7 for o-9 (30 EUR)" in lines
    assert lines[-4:] == [
        "6. metrics: state=CLOSED requests=9 successes=4 failures=3 rejected=2 transitions=3",
        "success_rate=0.57 rejection_rate=0.22",
        "the service was called 7 times for 9 orders",
        "done",
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_tenant_middleware_answers_over_http(backend: str) -> None:
    out = run_example("tenants_asgi.py", backend)
    assert f"hypercorn ({backend}) serving" in out
    acme = '{"tenant": "acme", "name": "Acme Corp", "path": "/orders"}'
    assert f"by slug header: 200 {acme}" in out
    assert 'by Host: 200 {"tenant": "globex", "name": "Globex", "path": "/orders"}' in out
    assert f"by uuid header: 200 {acme}" in out
    assert 'reserved slug: 400 {"error": "invalid_tenant"' in out
    assert 'unknown slug: 404 {"error": "unknown_tenant"' in out
    assert "resolver: hits=1 misses=4 loads=4 entries=4" in out
    assert "4. server shut down" in out
    assert out.rstrip().endswith("done")


def test_fastapi_lifespan_runs_the_engine_and_its_subscription() -> None:
    out = run_example("fastapi_lifespan.py")
    assert "[lifespan] engine started" in out
    assert 'o-1: 201 {"order": "o-1", "status": "accepted"}' in out
    assert 'o-3: 422 {"detail": "amount must be > 0, got -5 (nothing written)"}' in out
    assert "[fulfilment] handled o-4 (8 EUR)" in out
    assert "3. the subscription handled ['o-1', 'o-2', 'o-4']" in out
    assert out.index("[lifespan] engine stopped") > out.index("4. shutting the server down")
    assert "5. in the database: orders ['o-1', 'o-2', 'o-4'], 3 events in the outbox" in out
    assert out.rstrip().endswith("done")


def test_fastapi_lifespan_refuses_trio() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "fastapi_lifespan.py"), "trio"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "asyncio only" in result.stderr
