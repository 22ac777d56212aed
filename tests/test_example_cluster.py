"""examples/cluster.py runs as the README shows it: three workers, a producer, a kill.

It starts its own ``redis-server`` (or uses ``--redis``): skipped without the
binary, failed instead when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, redis_server_binary

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.py"
PARTITIONS = set(range(6))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env=env,
    )


def holdings(line: str) -> dict[str, list[int]]:
    """``{"w1": [0, 1], ...}`` from a line saying ``w1 holds [0, 1], ...``."""
    return {
        node: ast.literal_eval(partitions)
        for node, partitions in re.findall(r"(w\d) holds (\[[\d, ]*\])", line)
    }


def check_the_story(out: str) -> None:
    lines = out.splitlines()

    def line(prefix: str) -> str:
        found = [text for text in lines if text.startswith(prefix)]
        assert len(found) == 1, (prefix, out)
        return found[0]

    joined = holdings(line("1. three workers joined: "))
    assert sorted(joined) == ["w1", "w2", "w3"]
    assert all(len(held) == 2 for held in joined.values())
    assert {p for held in joined.values() for p in held} == PARTITIONS

    killed = line("3. ")
    assert re.fullmatch(
        r"3\. \d+ orders billed: killed w2 \(SIGKILL\) holding \[\d, \d\], after it billed \d+",
        killed,
    ), killed

    takeover = line("4. takeover: w2's partitions ")
    after = holdings(takeover.partition(": ")[2].partition("): ")[2])
    assert sorted(after) == ["w1", "w3"]
    assert all(len(held) == 3 for held in after.values())
    assert {p for held in after.values() for p in held} == PARTITIONS

    billed = {
        match[0]: int(match[1])
        for match in re.findall(r"^   (w\d)(?: \(killed\))?: (\d+) orders", out, re.M)
    }
    assert sorted(billed) == ["w1", "w2", "w3"]
    assert billed["w2"] >= 1  # it worked before it was killed
    summary = re.fullmatch(
        r"6\. every order billed: True \(60 of 60; billed twice: (\d+), as at-least-once allows\)",
        line("6. "),
    )
    assert summary, out
    assert sum(billed.values()) == 60 + int(summary[1])
    assert line("7. ") == "7. w1 and w3 left the cluster"
    assert lines[-1] == "done"


def test_with_its_own_redis_server_on_trio() -> None:
    redis_server_binary()
    result = run_example("trio")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith("started Redis server v=")
    assert "backend trio" in result.stdout
    check_the_story(result.stdout)


def test_on_a_given_redis_on_asyncio_leaving_nothing_behind(redis_server: RedisServer) -> None:
    result = run_example("asyncio", "--redis", redis_server.url)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith("using the Redis given with --redis\n")
    check_the_story(result.stdout)
    assert redis_server.keys() == set()


def test_without_redis_server_it_says_what_to_do(tmp_path: Path) -> None:
    result = run_example(env={**os.environ, "PATH": str(tmp_path)})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "examples/cluster.py: this example needs Redis: redis-server is not installed "
        "(Debian/Ubuntu: apt-get install redis-server), or pass --redis redis://host:port/0\n"
    )
