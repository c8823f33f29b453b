"""Catalog benchmark: what finding checkpoints costs as a run grows, on local disk and on a loopback S3 server.

For each run size (default 100 / 1,000 / 10,000 checkpoints on local disk, 100 / 1,000 on S3) a run
directory of tiny checkpoints is written once (the cost measured is the catalog's, not the weights'),
then, medians of --repeats, each in a *fresh* manager (nothing cached, as a resuming process):

  find_latest   mgr.find_latest_checkpoint()
  find_best     mgr.find_best_checkpoint()           (every sidecar: from the writer's index where it agrees)
  find_best_no_index   the same with the index removed (reads every sidecar)
  load_latest   mgr.load_agent()                     (find the latest, then torch.load it)
  warm          find_latest + find_best again on the same manager (its sidecars are known: listings only)
  listing       one listing of checkpoints/ through bgsave's storage and the epochs its names hold
                (which are committed: both files listed), the O(N) part no catalog can avoid
  cli_ls        `bgsave ls RUN` in a new interpreter, wall time; also cli_latest, cli_best
  import_torch  `python -c "import torch"`, wall time, in the same run (the CLI target is a ratio of it)

Targets (the architecture issue), as ratios within this run:
  latest and load_latest grow <= 2x from 100 to 10,000 local once the listing is subtracted, and <= 1.5x
  from 100 to 1,000 on S3; find_best at 10,000 local <= 0.3 s; cli_* <= 0.3x import_torch at 100.

The S3 server is moto's, in its own process on 127.0.0.1 (as in the crash tests).

Usage:
    python benchmarks/bench_catalog.py [--local 100,1000,10000] [--s3 100,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.report import RESULTS_DIR, machine, write_report

import crash_child  # the moto-server-in-its-own-process helper the crash tests use
from bgsave import CheckpointManager, layout
from bgsave import sidecar as sidecar_schema
from bgsave.layout import checkpoint_name
from bgsave.storage import Storage, open_storage

RUN = "catalog"


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def populate(run_dir: str, n: int, options: dict[str, Any] | None) -> None:
    """N committed checkpoints of a tiny Linear: N - 1 written directly (a .pt, then its sidecar), the last
    saved by a manager that first asked for the best, as a resumed run does; it leaves the catalog index."""
    storage = open_storage(run_dir, options)
    directory = storage.join("checkpoints")
    storage.makedirs(directory)
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(4, 4), buf)
    pt = buf.getvalue()
    files: dict[str, bytes] = {}
    for epoch in range(n - 1):
        meta = {"agent_step": epoch * 2048, "score": (epoch * 7919 % 1000) / 1000, "total_time": epoch * 1.5}
        files[storage.join_dir(directory, checkpoint_name(epoch, "pt"))] = pt
        files[storage.join_dir(directory, checkpoint_name(epoch, "yaml"))] = sidecar_schema.dumps(
            sidecar_schema.build(RUN, epoch, meta)
        )
    if run_dir.startswith("s3://"):
        storage.fs.pipe(files)  # one concurrent batch: setting up is not what is measured
    else:
        for path, data in files.items():
            with open(path, "wb") as f:
                f.write(data)
    with CheckpointManager(run_dir, RUN, storage_options=options) as writer:
        writer.find_best_checkpoint()
        writer.save_agent(torch.nn.Linear(4, 4), n - 1, {"agent_step": (n - 1) * 2048, "score": 0.5})


def committed_epochs(storage: Storage) -> set[int]:
    """The listing and what its names alone say: the epochs with both files (the O(N) part)."""
    pts, sidecars = layout.epochs_in(storage.list_files(storage.join("checkpoints")))
    return pts & sidecars


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(run_dir: str, options: dict[str, Any] | None) -> CheckpointManager:
    return CheckpointManager(run_dir, RUN, storage_options=options)


def measure_api(run_dir: str, options: dict[str, Any] | None, repeats: int) -> dict[str, float]:
    keys = ("find_latest", "find_best", "find_best_no_index", "load_latest", "warm", "listing")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    storage = open_storage(run_dir, options)
    index = storage.join("checkpoints", layout.CATALOG_INDEX)
    for _ in range(repeats):
        saved = storage.read_bytes(index) if storage.is_file(index) else None
        if saved is not None:  # the same question with no index: every sidecar read
            storage.delete(index)
        mgr = fresh(run_dir, options)
        rows["find_best_no_index"].append(timed(mgr.find_best_checkpoint))
        mgr.close()
        if saved is not None:
            storage.write_bytes_atomic(index, saved)
        rows["listing"].append(timed(lambda: committed_epochs(storage)))
        mgr = fresh(run_dir, options)
        rows["find_latest"].append(timed(mgr.find_latest_checkpoint))
        rows["find_best"].append(timed(mgr.find_best_checkpoint))
        rows["warm"].append(timed(lambda m=mgr: (m.find_latest_checkpoint(), m.find_best_checkpoint())))
        mgr.close()
        mgr = fresh(run_dir, options)
        rows["load_latest"].append(timed(mgr.load_agent))
        mgr.close()
    return {k: statistics.median(v) for k, v in rows.items()}


def measure_cli(run_dir: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for command in ("ls", "latest", "best"):
        argv = [sys.executable, "-m", "bgsave", command, run_dir]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(argv, env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        out[f"cli_{command}"] = statistics.median(times)
    return out


def import_torch(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratios(rows: dict[int, dict[str, float]], small: int, large: int) -> dict[str, float]:
    a, b = rows[small], rows[large]
    out = {}
    for key in ("find_latest", "load_latest"):
        out[f"{key}_growth"] = b[key] / a[key]
        # Subtract the listing, which grows with the directory whatever the catalog does.
        out[f"{key}_growth_beyond_listing"] = max(b[key] - b["listing"], 1e-9) / max(a[key] - a["listing"], 1e-9)
    return out


def tier(name: str, run_dirs: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict[int, Any]:
    """Each run size of one tier: populate, time the API (and the CLI at the smallest size)."""
    sizes: list[int] = getattr(args, name)
    rows: dict[int, Any] = {}
    for n, run_dir in zip(sizes, run_dirs, strict=True):
        populate(run_dir, n, None)
        row = measure_api(run_dir, None, args.repeats)
        if n == min(sizes):
            row.update(measure_cli(run_dir, env, args.repeats))
        rows[n] = row
        print(f"{name:<5} {n:>6}: " + "  ".join(f"{k} {v:.4f}s" for k, v in row.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=_sizes, default=[100, 1000, 10000])
    parser.add_argument("--s3", type=_sizes, default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    env = dict(os.environ)
    torch_s = import_torch(args.repeats)
    print(f"import torch: {torch_s:.3f}s")
    results: dict[str, Any] = {"import_torch": torch_s, "local": {}, "s3": {}}
    with tempfile.TemporaryDirectory(prefix="bgsave-catalog-") as tmp:
        results["local"] = tier("local", [os.path.join(tmp, f"run{n}") for n in args.local], args, env)
    if args.s3:
        with crash_child.moto_server() as endpoint:
            crash_child.make_bucket(endpoint, "catalog")
            os.environ.update(crash_child.s3_env(endpoint))
            results["s3"] = tier("s3", [f"s3://catalog/run{n}" for n in args.s3], args, dict(os.environ))
    checks: dict[str, Any] = {}
    if len(args.local) > 1:
        checks["local"] = ratios(results["local"], min(args.local), max(args.local))
        checks["local"]["find_best_at_largest_s"] = results["local"][max(args.local)]["find_best"]
        small = results["local"][min(args.local)]
        checks["local"].update({f"{k}_vs_import_torch": small[k] / torch_s for k in small if k.startswith("cli_")})
    if len(args.s3) > 1:
        checks["s3"] = ratios(results["s3"], min(args.s3), max(args.s3))
    for tier_name, values in checks.items():
        print(f"{tier_name}: " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    out = args.out or RESULTS_DIR / f"catalog_{started.date().isoformat()}.json"
    write_report(
        out,
        "catalog",
        started,
        {"machine": machine(Path(tempfile.gettempdir())), "results": results, "checks": checks},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
