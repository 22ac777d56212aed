"""Every example runs as the README shows it, on both backends."""

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
def test_quickstart_shows_an_ask_a_crash_and_a_restart(backend: str) -> None:
    out = run_example("quickstart.py", backend)
    assert "count is 10" in out
    assert "ask raised the handler's error after 2 attempts: simulated crash" in out
    assert "[counter] on_restart after RuntimeError: simulated crash" in out
    assert "count is 0 (a fresh instance)" in out
    assert "#1 counter: 'crash' failed" in out
    assert "rolled back: order o-3: amount must be >= 0 (no row, no event)" in out
    assert "run 1: the mailer got ['o-1', 'o-2']" in out
    assert "run 2: the mailer got ['o-4']" in out
    assert "3 orders, revenue 50: each event applied once" in out
    assert out.rstrip().endswith("done")


def test_quickstart_keeps_its_database_where_asked(tmp_path: Path) -> None:
    database = tmp_path / "shop.db"
    run_example("quickstart.py", "asyncio", str(database))
    assert database.exists()
    again = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "trio", str(database)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    assert again.stderr == f"quickstart writes a new database; {database} exists already\n"


def test_readme_tour_runs_as_printed(tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    tour = readme.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "tour.py"
    script.write_text(tour)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["6", "ask raised boom", "RuntimeError: boom"]
