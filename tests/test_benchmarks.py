"""The benchmark harness runs end to end and writes JSON of the documented shape.

Only the plumbing is checked: timings are never asserted, they depend on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = {
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
}
CLUSTER = {
    "cluster_forward",
    "cluster_commit_to_handler",
    "cluster_scaling",
    "cluster_takeover",
}
"""Scenarios that start a redis-server of their own: they need one installed."""
BACKENDS = ("asyncio", "trio")


def _redis_server_installed() -> bool:
    return os.access(shutil.which("redis-server") or "/usr/bin/redis-server", os.X_OK)


def _run_harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


# Every scenario in a fresh process: the local ones on both backends (about 55 s
# here), the cluster group, with its redis-server and worker processes, on trio
# alone (about 40 s; tests/test_cluster.py runs cluster mode itself on both). Two
# parts, so that a parallel run puts them on two workers; the default 60 s would
# leave a slower or busier CI machine too little room.
PARTS = {
    "local": (("--skip", "cluster"), SCENARIOS, BACKENDS),
    "cluster": (("--only", "cluster", "--backend", "trio"), CLUSTER, ("trio",)),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("part", list(PARTS))
def test_harness_writes_json_with_every_scenario_on_both_backends(
    tmp_path: Path, part: str
) -> None:
    args, names, backends = PARTS[part]
    path = tmp_path / "nested" / "x.json"
    redis = _redis_server_installed()
    if part == "cluster" and not redis and os.environ.get("CI"):
        pytest.fail("redis-server is not installed: CI must run the cluster scenarios")

    done = _run_harness("--quick", "--smoke", *args, "--json", str(path))

    # Without redis-server the cluster scenarios fail, each naming it; the others run.
    assert done.returncode == (0 if redis or part == "local" else 1), done.stderr
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert set(document["machine"]) >= {"platform", "cpu_count", "python"}
    assert set(document["versions"]) >= {"anyio", "trio", "msgspec"}
    results = document["results"]
    if part == "cluster" and not redis:
        failed = [r for r in results if "error" in r]
        assert {(r["scenario"], r["backend"]) for r in failed} == {
            (name, backend) for name in CLUSTER for backend in backends
        }
        assert all("redis-server" in r["error"] for r in failed)
        results = [r for r in results if "error" not in r]
        names = set()
    assert {(r["scenario"], r["backend"]) for r in results} == {
        (name, backend) for name in names for backend in backends
    }
    for result in results:
        assert set(result) >= {
            "scenario",
            "backend",
            "unit",
            "ours",
            "limit",
            "ratio",
            "target",
            "met",
            "extra",
        }
        assert result["ours"] > 0
        assert result["limit"] > 0
        assert result["ratio"] == pytest.approx(result["ours"] / result["limit"])
        # A scenario without a target from the issue reports neither target nor verdict.
        if result["target"] == "-":
            assert result["met"] is None
        else:
            assert isinstance(result["met"], bool)
    ask = [r for r in results if r["scenario"] == "ask_roundtrip"]
    assert all({"ours_p99", "limit_p99"} <= set(r["extra"]) for r in ask)
    assert all(r["target"] == "<= 0.6" for r in ask)
    publish = [r for r in results if r["scenario"] in ("publish_1", "partitions_4")]
    assert {(r["scenario"], r["target"]) for r in publish} <= {
        ("publish_1", ">= 0.35"),
        ("partitions_4", ">= 0.3"),
    }
    units = {r["scenario"]: r["unit"] for r in results}
    if part == "local":
        assert units["fanout_8"] == "deliveries/s"
        assert units["fanout_scale"] == "ns/delivery"
        assert units["actors_scale"] == "msgs/s"
    for scale in (r for r in results if r["scenario"] == "fanout_scale"):
        rows = scale["extra"]["rows"]
        assert [row["subscriptions"] for row in rows] == [8, 100, 1000]
        assert all(row["ours"] > 0 and row["limit"] > 0 for row in rows)
        assert "fanout_scale @1000" in done.stdout
    for scale in (r for r in results if r["scenario"] == "actors_scale"):
        rows = scale["extra"]["rows"]
        # Smoke N covers 10 and 100 actors; quick adds 1,000, full 10,000.
        assert [row["actors"] for row in rows] == [10, 100]
        assert all(row["ours"] > 0 and row["limit"] > 0 for row in rows)
        assert all(row["messages"] == scale["n"] for row in rows)
        assert (scale["target"], scale["met"]) == ("-", None)
        assert scale["extra"]["label"] == "actors_scale ours @100 vs ours @10"
        assert "actors_scale @100" in done.stdout
    for durable in (r for r in results if r["scenario"].startswith("durable_")):
        extra = durable["extra"]
        durability = extra["durability"]
        assert durable["scenario"].endswith(durability)
        # The disk the figures depend on is measured beside them.
        assert extra["fsync_ms"] > 0
        assert extra["fsync_p99_ms"] >= extra["fsync_ms"]
        assert extra["fsync_samples"] > 0
        assert all(row["ours"] > 0 and row["limit"] > 0 for row in extra["rows"])
        if durable["scenario"].startswith("durable_transact_"):
            assert durable["unit"] == "events/s"
            assert durable["target"] == {"full": ">= 8", "normal": ">= 4"}[durability]
            # A bare thread round trip is measured beside the disk.
            assert extra["thread_roundtrip_us"] > 0
            assert extra["thread_roundtrip_p90_us"] >= extra["thread_roundtrip_us"]
            assert extra["thread_roundtrip_samples"] >= 200
            hop, single, group = extra["rows"]
            assert hop["label"] == f"transact_1 vs raw SQL + 1 thread round trip ({durability})"
            # Issue 14 sets the fair single writer's target for full durability only.
            if durability == "full":
                assert hop["target"] == ">= 0.95"
                assert isinstance(hop["met"], bool)
            else:
                assert (hop["target"], hop["met"]) == ("-", None)
            assert len(extra["raw_thread_1_rates"]) == durable["repeats"]
            assert hop["ours"] == single["ours"]
            assert single["label"].startswith("transact_1 vs raw batch 1")
            assert (single["target"], single["met"]) == ("-", None)
            assert group["label"].startswith("transact_100 vs raw batch")
            assert group["target"] == ">= 0.6"
            assert isinstance(group["met"], bool)
            assert extra["batch_size"] >= 1
            assert extra["events_100"] % extra["writers"] == 0
        else:
            assert durable["unit"] == "ms"
            # An absolute target: on ours' p99 itself, not on the ratio.
            assert durable["target"] == "< 10 ms"
            assert durable["met"] == (durable["ours"] < 10)
            assert durable["ours"] == extra["p99_ours"]
            assert [row["label"] for row in extra["rows"]] == [
                f"commit_to_handler p50 ({durability})"
            ]
    for breaker in (r for r in results if r["scenario"] == "breaker_overhead"):
        extra = breaker["extra"]
        assert breaker["unit"] == "ns/call"
        assert breaker["target"] == "<= 0.25"
        assert extra["label"] == "breaker vs aiobreaker"
        assert extra["ratio_aiobreaker"] == pytest.approx(breaker["ratio"])
        # Every adapter ran on both backends; the sync pybreaker has a bare sync loop of its own.
        assert set(extra["ns_per_call"]) >= {
            "bare",
            "ours",
            "ours_call_timeout",
            "cancel_scope",
            "aiobreaker",
            "pybreaker",
        }
        assert all(cost > 0 for cost in extra["ns_per_call"].values())
        assert extra["pybreaker_mode"].startswith(("async", "sync"))
        labels = [row["label"] for row in extra["rows"]]
        assert labels[0] == "breaker call vs bare await"
        assert labels[1].startswith("breaker vs pybreaker (")
        assert labels[2:] == [
            "breaker call_timeout vs cancel scope",
            "breaker call_timeout vs cancel scope + 0.5 µs",
        ]
        assert all(row["unit"] == "ns/call" for row in extra["rows"])
        # Only the call_timeout budget row carries a target of its own.
        assert [(row.get("target"), row.get("met") is None) for row in extra["rows"]] == [
            (None, True),
            (None, True),
            (None, True),
            ("<= 1", False),
        ]
    for cached in (r for r in results if r["scenario"] == "resolver_cached"):
        extra = cached["extra"]
        assert cached["unit"] == "resolves/s"
        assert (cached["target"], cached["met"]) == ("-", None)
        assert extra["label"] == "resolver_cached TenantKey vs dict lookup"
        assert extra["ratio_key"] == pytest.approx(cached["ratio"])
        assert set(extra["ns_per_call"]) == {"dict_lookup", "ours_key", "ours_str"}
        assert all(cost > 0 for cost in extra["ns_per_call"].values())
        (by_str,) = extra["rows"]
        assert by_str["label"] == "resolver_cached str (validated) vs dict lookup"
        assert by_str["unit"] == "resolves/s"
        assert by_str["limit"] == pytest.approx(cached["limit"])
        assert extra["ratio_str"] == pytest.approx(by_str["ours"] / by_str["limit"])
        assert "target" not in by_str
    for cold in (r for r in results if r["scenario"] == "resolver_cold_1000"):
        extra = cold["extra"]
        assert cold["unit"] == "ms"
        assert (cold["target"], cold["met"]) == ("-", None)
        assert extra["label"] == "resolver_cold_1000 vs the loader alone (5 ms sleep)"
        assert extra["concurrent"] == cold["n"] == 1000
        # One load per repetition, and every other caller joined it or found it cached.
        assert extra["loader_calls"] == [1] * cold["repeats"]
        assert len(extra["coalesced"]) == len(extra["late_hits"]) == cold["repeats"]
        assert all(
            joined + hits == 999
            for joined, hits in zip(extra["coalesced"], extra["late_hits"], strict=True)
        )
        calls, joined_row, single_flight = extra["rows"]
        assert calls["label"] == "resolver_cold_1000 loader calls"
        assert (calls["ours"], calls["limit"], calls["target"], calls["met"]) == (
            1.0,
            1.0,
            "== 1",
            True,
        )
        assert joined_row["label"] == "resolver_cold_1000 coalesced waiters (of 999)"
        assert joined_row["limit"] == 999
        assert single_flight["label"] == "resolver_cold_1000 vs single flight on one anyio.Event"
        assert single_flight["unit"] == "ms"
        assert single_flight["ours"] == pytest.approx(cold["ours"])
        assert all(key not in single_flight for key in ("target", "met"))
        assert len(extra["load_start_ms"]) == cold["repeats"]
    for peers in (r for r in results if r["scenario"].startswith("peers_")):
        extra = peers["extra"]
        # Issue 14's targets: the durable writer against eventsourcing in a worker
        # thread, ask's p50 against pykka's; tell is reported.
        targets = {"peers_durable_1": ">= 1.2", "peers_ask": "<= 0.6"}
        if peers["scenario"] in targets:
            assert peers["target"] == targets[peers["scenario"]]
            assert isinstance(peers["met"], bool)
        else:
            assert (peers["target"], peers["met"]) == ("-", None)
        # Every peer ran on asyncio; the asyncio.Queue floor only there.
        expected = {
            "peers_tell": {"pykka", "thespian", "asyncio_queue"},
            "peers_ask": {"pykka", "thespian", "asyncio_queue"},
            "peers_durable_1": {"eventsourcing", "eventsourcing_thread"},
        }[peers["scenario"]]
        if peers["backend"] == "trio":
            expected -= {"asyncio_queue"}
        assert set(extra["peers"]) == expected
        assert all(row["ours"] > 0 and row["limit"] > 0 for row in extra.get("rows", ()))
        if peers["scenario"] == "peers_tell":
            assert peers["unit"] == "msgs/s"
            assert extra["label"] == "peers_tell vs pykka"
            assert extra["ratios"]["pykka"] == pytest.approx(peers["ratio"])
        elif peers["scenario"] == "peers_ask":
            assert peers["unit"] == "µs"
            assert set(extra["p99_us"]) == expected | {"ours"}
            assert extra["ours_p99"] >= peers["ours"]
        else:
            assert peers["unit"] == "events/s"
            assert extra["durability"] == "full"
            assert extra["fsync_ms"] > 0
            assert extra["thread_roundtrip_us"] > 0
            # The headline is the peer called as an async app must: a worker thread per save.
            assert extra["label"] == "peers_durable_1 vs eventsourcing in a worker thread (full)"
            (blocking,) = extra["rows"]
            assert blocking["label"] == "peers_durable_1 vs eventsourcing, no hop per save (full)"
            assert blocking["ours"] == pytest.approx(peers["ours"])
            assert "target" not in blocking
            assert len(extra["eventsourcing_rates"]) == peers["repeats"]
    for cluster in (r for r in results if r["scenario"] in CLUSTER):
        extra = cluster["extra"]
        name = cluster["scenario"]
        # The Redis and client the figures come from are named beside them.
        assert extra["redis_server"]
        assert extra["coredis"]
        if name == "cluster_forward":
            assert cluster["unit"] == "events/s"
            assert cluster["target"] == ">= 0.5"
            assert extra["label"] == f"cluster_forward vs raw Lua XADD batch {extra['batch']}"
            assert len(extra["ours_rates"]) == len(extra["limit_rates"]) == cluster["repeats"]
            # The clock started before the forwarder had taken any of the events.
            assert all(left > 0 for left in extra["forwarded_after_start"])
        elif name == "cluster_commit_to_handler":
            assert cluster["unit"] == "ms"
            assert cluster["target"] == "< 50 ms"
            assert cluster["met"] == (cluster["ours"] < 50)
            assert cluster["ours"] == extra["p99_ours"]
            assert [row["label"] for row in extra["rows"]] == [
                "cluster_commit_to_handler p50 (node A -> node B)"
            ]
            assert extra["samples"] >= cluster["n"] * cluster["repeats"]
        elif name == "cluster_scaling":
            assert cluster["unit"] == "events/s"
            assert cluster["target"] == ">= 1.7"
            assert extra["label"] == "cluster_scaling 2 vs 1 processes"
            four_one, four_two = extra["rows"]
            assert four_one["label"] == "cluster_scaling 4 vs 1 processes"
            assert "target" not in four_one
            assert four_two["label"] == "cluster_scaling 4 vs 2 processes"
            assert four_two["target"] == ">= 1"
            assert isinstance(four_two["met"], bool)
            assert set(extra["rates"]) == {"1", "2", "4"}
            assert all(len(runs) == cluster["repeats"] for runs in extra["all_rates"].values())
        else:
            assert cluster["unit"] == "s"
            assert cluster["target"] == "< 2 s"
            # Judged on the worst kill, against the lease TTL.
            assert len(extra["seconds"]) == cluster["repeats"]
            assert cluster["ours"] == max(extra["seconds"])
            assert cluster["limit"] == extra["lease_ttl"]
    if part == "cluster":
        if redis:
            assert "cluster_scaling 4 vs 2 processes" in done.stdout
        assert document["figures"] == []
    else:
        assert "peers_tell vs thespian" in done.stdout
        assert "resolver_cold_1000 loader calls" in done.stdout
        assert "breaker call_timeout vs cancel scope + 0.5 µs" in done.stdout
        assert "transact_100 / transact_1 (full)" in done.stdout
        assert "transact_1 vs raw SQL + 1 thread round trip (full)" in done.stdout
        assert "peers_durable_1 vs eventsourcing in a worker thread (full)" in done.stdout
        assert "fsync median" in done.stdout
        # The thread round trip is printed beside the fsync, once per scenario that measured it.
        assert done.stdout.count(
            "thread round trip (anyio.to_thread.run_sync no-op): median"
        ) == 3 * len(backends)
        assert document["figures"]
        assert done.stdout.index("Read these numbers with care") < done.stdout.index(
            "try_tell_burst"
        )
    for entry in document["figures"]:
        assert entry["scenario"] == "events"
        assert all(isinstance(value, float) for value in entry["figures"].values())
    # The report names what it measured on, and warns about noise before any figure.
    assert "cpu_count" in done.stdout
    assert done.stdout.index("Read these numbers with care") < done.stdout.index("scenario")


PROFILE_STAGES = (
    "transact -> queued",
    "queued -> hand-off",
    "hand-off -> thread starts",
    "BEGIN IMMEDIATE",
    "fn: domain INSERT",
    "fn: publish (validate, encode)",
    "fn: outbox INSERT",
    "COMMIT (fsync)",
    "other writer-thread work",
    "thread done -> writer task resumes",
    "finish (on_commit, waiter.set)",
    "waiter set -> transact returns",
    "total",
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_profile_transact_prints_every_stage(backend: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_transact", "--n", "20", "--backend", backend],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\n\n")[1]
    header, _, *lines = table.splitlines()
    assert header.split("  ")[0] == "stage"
    assert all(column in header for column in ("median µs", "p90 µs", "share"))
    rows = [line for line in lines if not line.startswith("span: ")]
    assert [line.rsplit(None, 4)[0] for line in rows] == list(PROFILE_STAGES)
    # Every call had every stage timed, and the stages add up to the total.
    assert "calls timed: 20 of 20\n" in done.stdout
    assert rows[-1].split()[-1] == "100.0%"
    shares = [float(line.split()[-1].removesuffix("%")) for line in rows[:-1]]
    assert sum(shares) == pytest.approx(100.0, abs=1.0)
    assert "thread round trip (anyio.to_thread.run_sync no-op): median" in done.stdout
    assert "fsync (os.write 64 B + os.fsync): median" in done.stdout


def test_harness_runs_only_the_selected_scenario_and_backend(tmp_path: Path) -> None:
    path = tmp_path / "x.json"

    done = _run_harness("--smoke", "--backend", "trio", "--only", "tell_str", "--json", str(path))

    assert done.returncode == 0, done.stderr
    results = json.loads(path.read_text(encoding="utf-8"))["results"]
    assert [(r["scenario"], r["backend"]) for r in results] == [("tell_stream", "trio")]


def test_harness_skip_leaves_out_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "x.json"

    done = _run_harness(
        "--smoke", "--backend", "trio", "--only", "tell", "--skip", "try", "--skip", "peers",
        "--json", str(path),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    results = json.loads(path.read_text(encoding="utf-8"))["results"]
    assert [(r["scenario"], r["backend"]) for r in results] == [("tell_stream", "trio")]


def test_harness_says_what_it_left_when_skip_leaves_nothing(tmp_path: Path) -> None:
    done = _run_harness("--only", "tell_s", "--skip", "tell", "--json", str(tmp_path / "x.json"))

    assert done.returncode == 2
    assert "no scenario matches 'tell_s' without 'tell'" in done.stdout


def test_harness_rejects_an_unknown_scenario(tmp_path: Path) -> None:
    done = _run_harness("--only", "no-such-scenario", "--json", str(tmp_path / "x.json"))

    assert done.returncode == 2
    assert "no scenario matches" in done.stdout


def test_plot_writes_pngs_from_a_tiny_document(tmp_path: Path) -> None:
    from benchmarks._plot import plot

    scale_rows = [{"subscriptions": count, "ours": 1e6, "limit": 2e6} for count in (8, 100, 1000)]
    actor_rows = [{"actors": count, "ours": 1e6, "limit": 2e6} for count in (10, 100, 1000)]
    document = {
        "results": [
            {"scenario": "fanout_scale", "backend": "asyncio", "extra": {"rows": scale_rows}},
            {"scenario": "actors_scale", "backend": "trio", "extra": {"rows": actor_rows}},
            {
                "scenario": "ask_roundtrip",
                "backend": "asyncio",
                "ours": 30.0,
                "limit": 40.0,
                "extra": {"ours_p99": 100.0, "limit_p99": 120.0},
            },
            {"scenario": "peers_ask", "backend": "trio", "error": "skipped"},
        ]
    }

    written = plot(document, tmp_path / "charts")

    assert [path.name for path in written] == [
        "fanout_scale.png",
        "actors_scale.png",
        "ask_latency.png",
    ]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)


# The durable chart reads the rows the durable scenario writes, whatever rows come
# before the batch-1 and batch-100 ones: plotted from a real run, not a crafted one.
@pytest.mark.parametrize(
    ("scenario", "chart"),
    [("ask_roundtrip", "ask_latency.png"), ("durable_transact_full", "durable_writers.png")],
)
def test_harness_plot_option_writes_a_png_and_names_it(
    tmp_path: Path, scenario: str, chart: str
) -> None:
    charts = tmp_path / "charts"

    done = _run_harness(
        "--smoke",
        "--backend",
        "asyncio",
        "--only",
        scenario,
        "--json",
        str(tmp_path / "x.json"),
        "--plot",
        str(charts),
    )

    assert done.returncode == 0, done.stderr
    pngs = sorted(charts.glob("*.png"))
    assert [path.name for path in pngs] == [chart]
    assert f"wrote {pngs[0]}" in done.stdout
    # Not a terminal: plain progress lines, no rich bar.
    assert f"running {scenario} on asyncio" in done.stderr
