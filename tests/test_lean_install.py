"""``pip install actorbus`` without extras: the core runs, Redis features name their extra.

Each check runs in a child Python process where coredis cannot be imported: its
first statement sets ``sys.modules["coredis"] = None``, which makes every
``import coredis`` (and ``from coredis.x import y``) raise ``ImportError``, as on a
machine where it was never installed. Nothing of the package is mocked.
"""

from __future__ import annotations

import os
import sys
import textwrap
import tomllib
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXTRA = "pip install 'actorbus[redis]'"
CORE = {"anyio", "trio", "msgspec", "sqlite-utils"}

# First, before anything imports it: coredis is not there.
_PRELUDE = "import sys\nsys.modules['coredis'] = None\n"


async def run_lean(script: str, *args: str) -> tuple[int, str, str]:
    """Run ``script`` (dedented) in a child Python without coredis; its exit status,
    stdout and stderr."""
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(script), *args],
            check=False,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def lean_ok(script: str, *args: str) -> str:
    code, out, err = await run_lean(script, *args)
    assert code == 0, err
    return out


# ------------------------------------------------------------------- the core


async def test_the_public_modules_import_without_coredis() -> None:
    out = await lean_ok(
        """
        import engine, engine.cache, engine.cluster, engine.events, engine.catalog
        import engine.asgi, engine.tenancy, engine.validation, engine._cli, actors
        print(sys.modules['coredis'])
        """
    )
    assert out == "None\n"


async def test_an_in_memory_engine_runs_and_publishes_without_coredis(
    anyio_backend: str,
) -> None:
    out = await lean_ok(
        """
        import uuid
        import anyio
        from engine import Engine
        from engine.catalog import OrderPlaced

        async def main() -> None:
            seen = []
            async with Engine() as engine:
                done = anyio.Event()

                async def handle(event: OrderPlaced) -> None:
                    seen.append(event.total)
                    done.set()

                engine.subscribe(OrderPlaced, handler=handle, name="orders")
                await engine.publish(OrderPlaced(order_id=uuid.uuid4(), total=7, currency="EUR"))
                await done.wait()
            print(seen)

        anyio.run(main, backend=sys.argv[1])
        """,
        anyio_backend,
    )
    assert out == "[7]\n"


async def test_a_durable_engine_runs_and_publishes_without_coredis(
    anyio_backend: str, tmp_path: Path
) -> None:
    database = tmp_path / "app.db"
    script = """
        import uuid
        import anyio
        from engine import Engine
        from engine.catalog import OrderPlaced

        async def main() -> None:
            seen = []
            async with Engine(sys.argv[2]) as engine:
                done = anyio.Event()

                async def handle(event: OrderPlaced) -> None:
                    seen.append(event.total)
                    done.set()

                engine.subscribe(OrderPlaced, handler=handle, name="orders")
                await engine.transact(
                    lambda tx: tx.publish(
                        OrderPlaced(order_id=uuid.uuid4(), total=9, currency="EUR")
                    )
                )
                await done.wait()
            print(seen)

        anyio.run(main, backend=sys.argv[1])
        """
    assert await lean_ok(script, anyio_backend, str(database)) == "[9]\n"
    # The database commands of the CLI need nothing of Redis either.
    out = await lean_ok(
        "from engine._cli import main\nsys.exit(main(sys.argv[1:]))\n", "status", str(database)
    )
    assert "outbox          1 events, first seq 1, head 1" in out


async def test_the_quickstart_imports_nothing_of_redis(tmp_path: Path) -> None:
    # The README's first command: `pip install -e . && python3 examples/quickstart.py`.
    out = await lean_ok(
        """
        import runpy
        sys.argv = ["quickstart.py", "asyncio", sys.argv[1]]
        runpy.run_path("examples/quickstart.py", run_name="__main__")
        """,
        str(tmp_path / "shop.db"),
    )
    assert out.rstrip().endswith("done")


# ------------------------------------------------------- redis features refuse


def assert_names_the_extra(out: str, feature: str) -> None:
    """The child printed the error's type, whether it is an ImportError, its message
    and its cause's type, one per line."""
    kind, is_import_error, message, cause = out.splitlines()
    assert kind == "MissingExtra"
    assert is_import_error == "True"
    assert message == f"{feature} needs coredis: {EXTRA}"
    assert cause == "ModuleNotFoundError"


_REPORT = """
def report(exc: BaseException) -> None:
    print(type(exc).__name__, isinstance(exc, ImportError), exc, type(exc.__cause__).__name__,
          sep="\\n")
"""


async def test_redis_cache_names_the_extra() -> None:
    out = await lean_ok(
        _REPORT
        + """
from engine.cache import RedisCache
try:
    RedisCache("redis://127.0.0.1:1")
except ImportError as exc:
    report(exc)
"""
    )
    assert_names_the_extra(out, "RedisCache")


async def test_a_cluster_engine_names_the_extra_when_it_starts(
    anyio_backend: str, tmp_path: Path
) -> None:
    out = await lean_ok(
        _REPORT
        + """
import anyio
from engine import Engine
from engine.cluster import RedisStreams

async def main() -> None:
    # Building the engine is not using Redis yet: starting it is.
    engine = Engine(sys.argv[2], cluster=RedisStreams("redis://127.0.0.1:1", namespace="x"))
    try:
        async with engine:
            print("started")
    except ImportError as exc:
        report(exc)

anyio.run(main, backend=sys.argv[1])
""",
        anyio_backend,
        str(tmp_path / "node.db"),
    )
    assert_names_the_extra(out, "cluster mode (cluster=RedisStreams(...))")


async def test_cluster_status_is_a_one_line_error_naming_the_extra() -> None:
    code, out, err = await run_lean(
        """
        import runpy
        sys.argv = ["engine", *sys.argv[1:]]
        runpy.run_module("engine", run_name="__main__")
        """,
        "cluster",
        "status",
        "redis://127.0.0.1:1",
        "--namespace",
        "x",
    )
    assert (code, out) == (1, "")
    assert err == f"error: python -m engine cluster status needs coredis: {EXTRA}\n"


# ------------------------------------------------------------------ metadata


def test_the_core_dependencies_are_four_and_redis_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            requirement.split(">")[0].split("<")[0].split("[")[0] for requirement in requirements
        }

    assert names(project["dependencies"]) == CORE
    extras = project["optional-dependencies"]
    assert extras["redis"] == ["coredis>=6.9,<7"]
    assert extras["otel"] == ["opentelemetry-api>=1.20"]  # the API only: users bring the SDK
    assert {"opentelemetry-api", "opentelemetry-sdk"} <= names(extras["dev"])
    assert "coredis>=6.9,<7" in extras["dev"]  # CI installs '.[dev]' and runs the Redis tests
    assert "coredis" in names(extras["bench"])  # the cluster benchmarks


async def test_without_opentelemetry_nothing_is_traced_and_a_provider_names_the_extra() -> None:
    out = await lean_ok(
        """
        sys.modules["opentelemetry"] = None  # the otel extra is not installed either
        import anyio
        from engine import Engine, Event, MissingExtra

        class Ping(Event, tag="lean.otel.ping"):
            n: int

        class Provider:
            def get_tracer(self, name):
                raise AssertionError("never asked")

        async def main():
            seen = []

            async def handle(event):
                seen.append(event.n)

            async with Engine() as engine:
                engine.subscribe(Ping, handler=handle, name="untraced")
                await engine.publish(Ping(n=1))
                await engine.idle()
            print(seen)
            try:
                Engine(tracer_provider=Provider())
            except MissingExtra as exc:
                print(isinstance(exc, ImportError), exc)

        anyio.run(main)
        """
    )
    assert out.splitlines() == [
        "[1]",
        "True Engine(tracer_provider=...) needs opentelemetry-api: pip install 'actorbus[otel]'",
    ]
