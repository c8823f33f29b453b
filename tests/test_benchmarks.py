"""The benchmarks run as the README says, at a tiny size: every method measured, results and targets written.

Timings are not checked here (CI machines are shared and noisy): ``benchmarks/results/`` holds the
figures. These tests keep the scripts from rotting; Lightning and matplotlib come from the ``bench``
extra, so without them those parts are skipped by the scripts themselves and the tests accept that.
"""

from __future__ import annotations

import importlib.util
import json
import math
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
    assert report["machine"]["logical_cpus"] >= 1
    assert (out / report_path.with_suffix(".md").name).read_text().count("| bgsave |") >= 1
    assert (out / report_path.with_suffix(".png").name).exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "bgsave" in stdout
    assert list(tmp_path.glob("bench-suite-*")) == []  # its checkpoints are gone


def test_the_save_benchmark_runs(tmp_path: Path) -> None:
    """bench_save.py at 2 MB, one round, writes its JSON."""
    out = tmp_path / "save.json"
    run("bench_save.py", "--sizes", "2", "--repeats", "1", "--settle", "0", "--dir", str(tmp_path), "--out", str(out))
    report = json.loads(out.read_text())
    (size,) = report["results"]
    assert size["size_mb"] == 2


def test_the_gpu_benchmark_runs_its_cpu_dry_run(tmp_path: Path) -> None:
    """bench_gpu.py with --device cpu (CI has no GPU): every figure measured and written, the scratch dir gone."""
    out = tmp_path / "gpu.json"
    run(
        "bench_gpu.py",
        *("--device", "cpu", "--sizes", "2", "--repeats", "1", "--step-ms", "10", "--window", "3"),
        *("--methods", "sync_torch_save,bgsave", "--dir", str(tmp_path), "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["complete"] is True
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
    assert {"64 KiB", "128 KiB", "65536 KiB"} <= set(report["disk_write_fsync"])
    assert set(report["bgsave_save"]) == {"none", "128 KiB", "1024 KiB", "O_DIRECT"}
    assert all(row["s"] > 0 for row in report["bgsave_save"].values())
    assert list(tmp_path.glob("bench-write-size-*")) == []
