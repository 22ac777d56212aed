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
def test_quickstart_runs_the_shop_on_sqlite(backend: str) -> None:
    out = run_example("quickstart.py", backend)
    assert "   placed o-1: 2 x mug" in out
    assert "   refused o-5: not enough mug in stock (nothing written, nothing published)" in out
    assert "payment service unreachable" in out
    assert "for mailer: ValueError: cannot mail 'not-an-email'" in out
    assert "   inventory {'mug': 7, 'tee': 2} (each order applied exactly once)" in out
    assert "   outbox head 4, lag {'billing': 0, 'inventory': 0, 'mailer': 0}" in out
    assert "   dead letters left: 1 (the mailer's poison)" in out
    assert "   every order billed once: True" in out
    assert "   mailed after the restart: [] (positions survived)" in out
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
