"""The benchmarks package: scenarios share one common module and the harness finds them.

No scenario imports the harness or another scenario; ``benchmarks._common``
imports nothing from the package; the harness discovers every ``scenario_*``
module and runs them in their declared order, and refuses a module that does
not say what it runs or a scenario name given twice.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks import _harness
from benchmarks._common import Measurement, Scenario, by_name

PACKAGE = Path(__file__).resolve().parent.parent / "benchmarks"

# The order the harness has always run them in (and the README lists them in).
RUN_ORDER = [
    "try_tell_burst",
    "tell_stream",
    "ask_roundtrip",
    "actors_scale",
    "publish_1",
    "publish_1_otel",
    "fanout_8",
    "partitions_4",
    "fanout_scale",
    "durable_transact_full",
    "durable_transact_normal",
    "durable_commit_to_handler_full",
    "durable_commit_to_handler_normal",
    "breaker_overhead",
    "resolver_cached",
    "resolver_cold_1000",
    "peers_tell",
    "peers_ask",
    "peers_durable_1",
    "cluster_forward",
    "cluster_commit_to_handler",
    "cluster_scaling",
    "cluster_takeover",
]


def _package_imports(path: Path) -> set[str]:
    """The modules of the benchmarks package that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module)
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("benchmarks."):
                found.add(node.module.removeprefix("benchmarks."))
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("benchmarks.")
                for alias in node.names
                if alias.name.startswith("benchmarks.")
            )
    return found


def test_scenarios_import_only_the_common_module_and_it_imports_none() -> None:
    scenario_files = sorted(PACKAGE.glob("scenario_*.py"))
    assert len(scenario_files) >= 7

    imports = {path.stem: _package_imports(path) for path in scenario_files}

    assert {name: deps - {"_common"} for name, deps in imports.items()} == {
        name: set() for name in imports
    }
    assert _package_imports(PACKAGE / "_common.py") == set()
    assert _package_imports(PACKAGE / "_harness.py") == {"_common"}


def test_harness_finds_every_scenario_module_but_the_events_one() -> None:
    modules = _harness.scenario_modules()

    assert modules == sorted(
        f"benchmarks.{path.stem}"
        for path in PACKAGE.glob("scenario_*.py")
        if path.stem != "scenario_events"
    )


def test_harness_runs_the_scenarios_in_their_modules_order() -> None:
    assert list(_harness.scenarios()) == RUN_ORDER


async def _run(n: int, repeats: int) -> Measurement:
    return Measurement(ours=1.0, limit=1.0, pair_ratios=[1.0])


def _scenario(name: str) -> Scenario:
    return Scenario(
        name=name,
        run=_run,
        unit="x/s",
        higher_is_better=True,
        target=None,
        n={"full": 1, "quick": 1, "smoke": 1},
    )


# A scenario module of its own, as a file: ``scenario(name)`` builds one Scenario.
_SCENARIO = """
from tests.test_benchmarks_layout import _scenario as scenario
from benchmarks._common import by_name
"""

Write = Callable[[str, str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Write]:
    """``write(name, body)``: a real module ``name`` on sys.path; forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, body: str) -> str:
        (tmp_path / f"{name}.py").write_text(_SCENARIO + body, encoding="utf-8")
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_harness_orders_modules_by_order_not_by_name(
    write_module: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_module("bench_fake_zz", 'ORDER = 1\nSCENARIOS = by_name(scenario("zz"))\n')
    second = write_module("bench_fake_aa", 'ORDER = 2\nSCENARIOS = by_name(scenario("aa"))\n')
    monkeypatch.setattr(_harness, "scenario_modules", lambda: sorted([first, second]))

    assert list(_harness.scenarios()) == ["zz", "aa"]


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ('SCENARIOS = by_name(scenario("a"))\n', "bench_fake_bad.ORDER must be an int, got None"),
        ('ORDER = "1"\nSCENARIOS = by_name(scenario("a"))\n', "ORDER must be an int, got '1'"),
        ("ORDER = 1\n", "bench_fake_bad.SCENARIOS must map each Scenario's name to it, got None"),
        (
            'ORDER = 1\nSCENARIOS = {"a": scenario("b")}\n',
            "bench_fake_bad.SCENARIOS must map each Scenario's name to it",
        ),
    ],
)
def test_harness_refuses_a_module_that_does_not_say_what_it_runs(
    write_module: Write, monkeypatch: pytest.MonkeyPatch, tail: str, message: str
) -> None:
    name = write_module("bench_fake_bad", tail)
    monkeypatch.setattr(_harness, "scenario_modules", lambda: [name])

    with pytest.raises(TypeError, match=re.escape(message)):
        _harness.scenarios()


def test_harness_refuses_one_scenario_name_in_two_modules(
    write_module: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [
        write_module(f"bench_fake_{i}", f'ORDER = {i}\nSCENARIOS = by_name(scenario("same"))\n')
        for i in (1, 2)
    ]
    monkeypatch.setattr(_harness, "scenario_modules", lambda: names)

    with pytest.raises(
        ValueError,
        match="scenario names must be unique, got 'same' in bench_fake_1 and in bench_fake_2",
    ):
        _harness.scenarios()


def test_a_module_cannot_name_two_scenarios_alike() -> None:
    with pytest.raises(ValueError, match="scenario names must be unique, got 'a' twice"):
        by_name(_scenario("a"), _scenario("b"), _scenario("a"))
