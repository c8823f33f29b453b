"""The benchmarks run as benchmarks/README.md says, at a tiny size: every method measured, results written.

Timings are not checked here (CI machines are shared and noisy): ``benchmarks/results/`` holds the
figures. These tests keep the scripts from rotting; Lightning and matplotlib come from the ``bench``
extra, so without them those parts are skipped by the scripts themselves and the tests accept that.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import pytest

from _scripts import run_script

pytestmark = pytest.mark.timeout(300)


def run(script: str, *args: str) -> str:
    return run_script(f"benchmarks/{script}", *args, timeout=280).stdout


def test_the_suite_measures_every_method_and_checks_the_targets(tmp_path: Path) -> None:
    """bench_suite.py at 2 MB, one round, one training thread: JSON, Markdown (and PNG with matplotlib)."""
    out = tmp_path / "results"
    methods = ["copy_limit", "disk_fsync", "disk_direct", "sync_torch_save", "bgsave", "dcp_thread", "lightning_async"]
    stdout = run(
        "bench_suite.py",
        *("--sizes", "2", "--repeats", "1", "--threads", "1", "--window", "3", "--settle", "0"),
        *("--step-ms", "20", "--methods", ",".join(methods), "--dir", str(tmp_path), "--out", str(out)),
    )
    (report_path,) = out.glob("suite_*.json")
    report = json.loads(report_path.read_text())
    (size,) = report["results"]
    measured = size["methods"]
    expected = set(methods) - {"lightning_async"} if importlib.util.find_spec("lightning") is None else set(methods)
    assert expected <= set(measured), (measured.keys(), size["skipped"])
    bgsave = measured["bgsave"]
    for key in ("stall", "durable"):
        assert 0 < bgsave[key]["median_s"] < 60
    assert math.isfinite(bgsave["lost"]["1"]["median_s"])
    assert bgsave["throughput_gbps"] > 0
    names = {t["target"] for t in size["targets"]}
    assert any("stall" in n for n in names) and any("lost" in n for n in names)
    assert report["machine"]["logical_cpus"] >= 1 and report["git_sha"]
    assert (out / report_path.with_suffix(".md").name).read_text().count("| bgsave |") >= 1
    assert (out / report_path.with_suffix(".png").name).exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "bgsave" in stdout
    assert list(tmp_path.glob("bench-suite-*")) == []  # its checkpoints are gone


def test_the_save_stages_benchmark_runs(tmp_path: Path) -> None:
    """bench_save_stages.py at 2 MB, one round: every stage timed, the ratios and the git SHA written."""
    out = tmp_path / "save_stages.json"
    args = ("--sizes", "2", "--repeats", "1", "--settle", "0", "--dir", str(tmp_path), "--out", str(out))
    run("bench_save_stages.py", *args)
    report = json.loads(out.read_text())
    assert report["git_sha"] and report["machine"]["logical_cpus"] >= 1
    (size,) = report["results"]
    assert size["size_mb"] == 2
    for stage in ("copy_limit", "memcpy_limit", "clone", "bgsave_stall", "bgsave_durable", "serialize_crc32_off"):
        assert 0 < size["methods"][stage]["median_s"] < 60, stage
    assert math.isfinite(size["ratios"]["crc32_s_per_gb"])
    assert list(tmp_path.glob("bench-save-stages-*")) == []


def test_the_writer_cost_benchmark_runs(tmp_path: Path) -> None:
    """bench_writer_cost.py at 4 MiB, one training thread, one round: every stage's lost time written."""
    out = tmp_path / "writer_cost.json"
    run(
        "bench_writer_cost.py",
        "--mb",
        "4",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    assert report["git_sha"]
    assert {"no_save", "save_null_crc", "write_behind", "write_direct", "memcpy"} <= set(report["results"])
    assert list(tmp_path.glob("writer-cost-*")) == []


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto (the dev extra) is not installed")
def test_the_s3_benchmark_runs(tmp_path: Path) -> None:
    """bench_s3.py at 2 MB, one round, against its own loopback moto server: both targets timed."""
    out = tmp_path / "s3.json"
    run("bench_s3.py", "--mb", "2", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["git_sha"] and report["machine"]["logical_cpus"] >= 1
    result = report["results"]
    for key in ("plain_s3fs_upload_s", "bgsave_s3_stall_s", "bgsave_s3_durable_s", "bgsave_local_stall_s"):
        assert 0 < result[key] < 60, key


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto (the dev extra) is not installed")
def test_the_s3_save_trace_runs(tmp_path: Path) -> None:
    """trace_s3_save.py at 9 MiB (two parts), one round: each save's phases from its requests, the git SHA written."""
    out = tmp_path / "trace.json"
    stdout = run("trace_s3_save.py", "--size-mb", "9", "--rounds", "1", "--dir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["git_sha"] and report["transfer_manager_s"] > 0
    for name in ("direct", "later", "mirror"):
        phases = report["medians"][name]
        assert set(phases) == {"total", "stall", "to_first_part", "parts", "to_complete", "complete", "to_durable"}
        assert all(value >= 0 for value in phases.values()), (name, phases)
        assert phases["parts"] + phases["complete"] <= phases["total"], (name, phases)
    assert "complete_multipart_upload" in stdout and "upload_part 2" in stdout
    assert list(tmp_path.glob("trace-s3-*")) == []


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto (the dev extra) is not installed")
def test_the_mirror_benchmark_runs(tmp_path: Path) -> None:
    """bench_mirror.py at 8 MiB, one round, moto in its own process: every upload and load, the proxy's cap held."""
    out = tmp_path / "mirror.json"
    args = ("--sizes", "8", "--proxy-sizes", "8", "--repeats", "1", "--proxy-check-mb", "4", "--settle", "0")
    run("bench_mirror.py", *args, "--dir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["errors"] == []
    assert report["git_sha"] and report["machine"]["logical_cpus"] >= 1
    assert report["server_env"]["MALLOC_MMAP_MAX_"] == "0"  # the server keeps what it frees
    check = report["proxy_check"]
    for direction in ("up", "down"):  # a cap is a ceiling: bursts and socket buffers give a few percent
        assert 0 < check[f"{direction}_bytes_per_s"] <= 1.3 * check["cap_bytes_per_s"], check
    mirror, concurrency = report["features"]["mirror"], report["features"]["max_concurrency"]
    row = report["results"]["8"]
    uploads = {"transfer_manager", "direct_s3", "direct_s3_later", "s3fs_put", "bgsave_upload_file"}
    uploads |= {"transfer_manager_commit", "transfer_manager_fresh"}
    uploads |= {"mirror_upload", "mirror_upload_later"} if mirror else set()
    loads = {"download_torch_load", "load_agent_s3", "load_checkpoint"} | ({"load_agent_mirror"} if mirror else set())
    for group, names in (("uploads", uploads), ("loads", loads)):
        assert set(row[group]) == names
        for name in names:
            assert 0 < row[group][name]["median_s"] < 60, name
    assert set(row["paired_ratios"]) == {f"{n} / transfer_manager" for n in uploads - {"transfer_manager"}} | {
        f"{n} / download_torch_load" for n in loads - {"download_torch_load"}
    } | ({"mirror_upload / transfer_manager_commit", "mirror_upload / transfer_manager_fresh"} if mirror else set())
    assert all(value > 0 for value in row["paired_ratios"].values())
    assert row["paired_90pct"] == dict.fromkeys(row["paired_ratios"])  # one round: too few for an interval
    assert row["memory"]["expected_extra_bytes"] > 0
    assert all("tracemalloc_peak_bytes" in sample for sample in row["memory"]["samples"].values())
    proxied = report["proxy"]["8"]["methods"]
    expected = {"transfer_manager_c10", "transfer_manager_c1"}
    expected |= {"direct_s3_c8", "direct_s3_c1"} if concurrency else set()
    expected |= {"mirror_upload_c8", "mirror_upload_c1"} if concurrency and mirror else set()
    assert set(proxied) == expected
    assert all(method["samples"][0]["proxy"]["up_bytes"] > 8 * 2**20 for method in proxied.values())
    assert {t["status"] for t in report["targets"]} <= {"PASS", "MISS", "SKIP"}
    assert len({t["target"] for t in report["targets"]}) == 6
    assert list(tmp_path.glob("bench-mirror-*")) == []


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto (the dev extra) is not installed")
def test_the_s3_server_runs_with_the_environment_it_is_given() -> None:
    """moto_server(env=...): the server's own process has those variables (SERVER_ENV reaches moto, not this one)."""
    import psutil  # type: ignore[import-untyped]

    import crash_child

    with crash_child.moto_server(env={"MALLOC_ARENA_MAX": "1", "BGSAVE_SERVER_CHECK": "yes"}):
        (server,) = [p for p in psutil.Process().children() if "moto.server" in p.cmdline()]
        assert server.environ()["BGSAVE_SERVER_CHECK"] == "yes"
        assert server.environ()["MALLOC_ARENA_MAX"] == "1"
    assert "BGSAVE_SERVER_CHECK" not in os.environ


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto (the dev extra) is not installed")
def test_the_mirror_benchmarks_interval_holds_the_paired_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """paired_interval: None below 5 rounds; else a reproducible 90% bootstrap interval around the paired ratio."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("bench_mirror")

    def method(times: list[float]) -> dict[str, object]:
        return {"samples": [{"round": i, "s": s} for i, s in enumerate(times)]}

    reference = method([1.0] * 8)
    noisy = method([1.0, 1.1, 0.9, 1.2, 1.05, 0.95, 1.3, 1.0])
    low, high = bench.paired_interval(noisy, reference)
    assert 0.9 <= low < bench.paired(noisy, reference) < high <= 1.3
    assert bench.paired_interval(noisy, reference) == [low, high]  # a fixed seed
    assert bench.paired_interval(method([1.1] * 8), reference) == pytest.approx([1.1, 1.1])
    assert bench.paired_interval(method([1.0] * 4), reference) is None  # four rounds in common


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
def test_balanced_orders_put_each_method_after_every_other_equally_often(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """harness.measure.balanced_orders: every row a permutation; each ordered pair adjacent, each place taken, alike."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    rows = importlib.import_module("harness.measure").balanced_orders(n)
    assert len(rows) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    pairs = collections.Counter(pair for row in rows for pair in itertools.pairwise(row))
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(n) if a != b]
    assert set(pairs.values()) <= {len(rows) // n}  # each ordered pair as often as every other
    assert all(sorted(row[place] for row in rows) == sorted(list(range(n)) * (len(rows) // n)) for place in range(n))


def test_the_gpu_benchmark_runs_its_cpu_dry_run(tmp_path: Path) -> None:
    """bench_gpu.py with --device cpu (CI has no GPU): every figure measured and written, the scratch dir gone."""
    out = tmp_path / "gpu.json"
    run(
        "bench_gpu.py",
        *("--device", "cpu", "--sizes", "2", "--repeats", "1", "--step-ms", "10", "--window", "3"),
        *("--methods", "sync_torch_save,bgsave", "--dir", str(tmp_path), "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["git_sha"]
    (size,) = report["results"]
    for name in ("d2h_pinned_limit", "bgsave/stall", "bgsave/stream_held", "bgsave/durable", "sync_torch_save/durable"):
        assert 0 < size["median_s"][name] < 60, name
    assert set(size["lost_median_s"]) == {"no_save", "sync_torch_save", "bgsave"}
    assert list(tmp_path.glob("bench-gpu-*")) == []


def test_the_write_size_benchmark_runs(tmp_path: Path) -> None:
    """bench_write_size.py at 4 MB, one round: both sweeps written, its scratch directory gone."""
    out = tmp_path / "write_size.json"
    args = ("--mb", "4", "--repeats", "1", "--settle", "0", "--dir", str(tmp_path), "--out", str(out))
    run("bench_write_size.py", *args)
    report = json.loads(out.read_text())
    assert report["git_sha"]
    assert {"64 KiB", "128 KiB", "65536 KiB"} <= set(report["disk_write_fsync"])
    assert set(report["bgsave_save"]) == {"none", "128 KiB", "1024 KiB", "O_DIRECT"}
    assert all(row["s"] > 0 for row in report["bgsave_save"].values())
    assert list(tmp_path.glob("bench-write-size-*")) == []


def test_the_catalog_benchmark_runs(tmp_path: Path) -> None:
    """bench_catalog.py at 20 and 40 local checkpoints, one round, no S3: every figure and ratio written."""
    out = tmp_path / "catalog.json"
    run("bench_catalog.py", "--local", "20,40", "--s3", "", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["results"]["local"]
    assert set(rows) == {"20", "40"}
    for key in ("find_latest", "find_best", "load_latest", "warm", "listing", "cli_ls"):
        assert 0 < rows["20"][key] < 60, key
    assert report["checks"]["local"]["find_latest_growth"] > 0
    assert report["git_sha"]


@pytest.mark.distributed
def test_the_distributed_benchmark_runs(tmp_path: Path) -> None:
    """bench_distributed.py on 2 gloo ranks at 1 MB, one round: every rank's stall, rank 0's durable and lost time."""
    out = tmp_path / "distributed.json"
    args = ("--world-sizes", "2", "--sizes", "1", "--repeats", "1", "--stall-repeats", "1", "--settle", "0")
    run("bench_distributed.py", *args, "--dir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["git_sha"] and report["machine"]["logical_cpus"] >= 1
    row = report["results"]["2x1"]
    stall = row["stall_s"]
    assert len(stall["per_rank_quiet"]) == len(stall["per_rank_training"]) == len(stall["per_rank_cpu_quiet"]) == 2
    for value in (stall["rank0_quiet"], stall["alone_quiet"], row["durable_s"]["rank0_wait"], row["window"]["step_s"]):
        assert 0 < value < 60
    assert all(math.isfinite(v) for v in row["lost_per_save_s"].values())
    assert set(row["targets"]) == {"rank0_stall_vs_alone", "others_stall_s"}
    assert list(tmp_path.glob("bench-distributed-*")) == []


@pytest.mark.distributed
def test_the_sharding_benchmark_runs(tmp_path: Path) -> None:
    """bench_sharding.py on 2 gloo ranks at 1 MB, one round: every rank's stall and durable time per method."""
    out = tmp_path / "sharding.json"
    args = ("--ranks", "2", "--sizes", "1", "--repeats", "1", "--settle", "0", "--deadline-s", "120")
    run("bench_sharding.py", *args, "--dir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["git_sha"] and report["machine"]["logical_cpus"] >= 1
    row = report["results"]["2x1"]
    for method in ("full", "dcp", "direct", "gather"):
        stall = row["methods"][method]["stall_s"]
        assert len(stall["per_rank"]) == 2 and 0 < stall["slowest"] < 60, method
    for method in ("full", "dcp", "direct"):
        assert 0 < row["methods"][method]["durable_s"]["slowest"] < 60, method
    assert all(math.isfinite(v) for v in row["ratios"].values())
    assert set(row["targets"]) == {"dcp_vs_direct_stall"}
    assert list(tmp_path.glob("bench-sharding-*")) == []
