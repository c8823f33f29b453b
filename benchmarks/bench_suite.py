"""Benchmark suite: what a save costs a training run, bgsave against the usual ways of saving, in one run.

For each model size (``BenchModel``, float32, 10 MB / 100 MB / 1 GB by default) it measures every
method below for *stall* (how long the call blocks the caller), *time to durable* (from the call until
the checkpoint is fsynced on disk), *throughput* (model bytes / time to durable), *extra RSS* and *lost
training time* with 1 and with 2 torch threads:

``copy_limit``
    ``copy_`` of every parameter into preallocated, already-touched CPU buffers: the least a
    snapshot can cost the caller. Its buffers count as kept memory.
``disk_fsync``
    Writing as many bytes as the model has, in 128 KiB writes from one buffer, then ``fsync``: the
    disk's own fsync'd bandwidth, the most any writer can reach (``dd``-like).
``disk_direct``
    The same bytes with ``O_DIRECT`` in 64 MiB writes from a page-aligned buffer, then ``fsync``
    (``dd oflag=direct``): the disk past the page cache. The throughput target is checked against
    the faster of the two disk rows.
``sync_torch_save``
    ``torch.save(model, path)`` then ``fsync`` of the file: the synchronous baseline.
``bgsave``
    ``CheckpointManager(run_dir, run_name).save_agent(model, epoch)``, default ``max_pending``; durable
    when ``wait()`` returns (``.pt`` and sidecar written, fsynced, renamed, directory fsynced).
``bgsave_crc32``
    The same with ``CheckpointManager(crc32=True)``: the ``.pt`` carries the per-record CRC32s a plain
    ``torch.save`` writes, which bgsave leaves out by default (~0.3 s of the writer's CPU per GB;
    ``torch.load`` never checks them). The row shows what they cost; the targets are checked on
    ``bgsave``.
``dcp_thread`` / ``dcp_process``
    ``torch.distributed.checkpoint.async_save(model.state_dict(), checkpoint_id=dir)`` with
    ``AsyncCheckpointerType.THREAD`` / ``PROCESS``; durable when the returned future's ``result()``
    returns. The caller stages (copies) the state dict before the call returns. Thread mode runs
    without a process group (``no_dist=True``; DCP still warns "assuming the intent is to save in a
    single process" on every save, which the suite silences). Process mode cannot: it asks the
    default group for rank and world size before it spawns its checkpoint process (``ValueError:
    Default process group has not been initialized`` otherwise), so the suite initialises a 1-rank
    ``gloo`` group on 127.0.0.1 for it (``MASTER_ADDR``/``MASTER_PORT`` in the environment). That
    process is spawned, so it re-imports the main module (this script keeps its work under
    ``if __name__ == "__main__"``); it lives until the suite exits, logs a few INFO lines per save
    (sent to ``dcp_process.log`` in the target directory, deleted with it), and its private memory
    counts as this method's. DCP's ``FileSystemWriter`` fsyncs every data file and ``.metadata``
    (``sync_files=True``), not the directory: durable means the same as for the others, bar
    bgsave's directory fsync.
``lightning_async``
    Lightning's ``AsyncCheckpointIO`` wrapping ``TorchCheckpointIO``:
    ``save_checkpoint({"state_dict": model.state_dict()}, path)`` clones every tensor on the caller,
    then a thread runs ``torch.save`` into a ``BytesIO`` and writes its bytes through an fsspec
    transaction (a temp file in ``TMPDIR``, then a move), with no fsync at all. So that durable
    means the same here, the wrapped ``TorchCheckpointIO`` is a subclass that fsyncs the file after
    Lightning's own save, in the same background thread; durable when ``teardown()`` (the
    executor's shutdown, Lightning's only way to wait) returns.

The methods live in ``harness/savers.py``, the training loop in ``harness/training.py``, the
measuring in ``harness/measure.py``; the tables and the plot in ``suite_report.py``. The peers
(Lightning, matplotlib) come from the benchmark's own extra, ``pip install -e '.[bench]'``, not from
the library. Before the rounds each method saves a tiny model (lazy imports, first use) and then the
real one, untimed: a method whose peer is missing or that fails there is skipped with a note, never
fatal; the memory that first real save leaves behind (bgsave's snapshot buffers) counts as kept.

How it is measured, per size:

1. Stall, time to durable, extra RSS: ``harness.measure.run_rounds``: every method
   once per round, round-robin, one warm-up round then ``--repeats`` timed rounds, medians; each
   call is timed from the save to durable, its file deleted afterwards (untimed), then ``--settle``
   seconds of rest after methods that free memory. Extra RSS is the peak resident memory during the
   call (the kernel's high-water mark, plus the sampled private memory of its own child processes) above the
   RSS just before it, plus what the method keeps between calls (bgsave's reused snapshot buffers,
   DCP's checkpoint process, ``copy_limit``'s buffers). Page cache is not RSS.
2. Lost training time, for each ``--threads`` value T: a real training loop in this process, an MLP
   (4 ``Linear`` 512x512 layers, Adam, MSE on a fixed random batch) with ``torch.set_num_threads(T)``
   and the batch calibrated so a step takes about ``--step-ms`` (80 ms), and re-sized between rounds
   when the machine's load moves the step time more than 25% off. The saved model is the big
   ``BenchModel``, not the MLP. ``harness.training.measure_lost``: a round measures a baseline
   window of steps without saves, then, for each method in turn (the order rotates every round),
   one save at a step boundary while training goes on until it is durable, then ``TAIL_STEPS``
   more steps; ``lost = elapsed - steps x baseline_step`` (the stall plus whatever the write in
   flight slowed the steps down). A ``no_save`` control's spread is the noise floor. One warm-up
   round, then ``--repeats`` rounds; medians with min-max.

The targets bgsave must meet are checked from ratios within the same run (printed, and in the JSON
and Markdown with pass/fail): stall <= 1.3 x copy limit; lost training time <= 1/6 of sync's with 1
thread and <= 1/2 with 2; time to durable <= 1.2 x sync; write throughput >= 80% of the disk's fsync'd
bandwidth (the faster of ``disk_fsync`` and ``disk_direct``); extra RSS <= (max_pending + 1) x model;
stall <= 5 ms at 10 MB.

Usage::

    pip install -e '.[dev,bench]'               # Lightning, matplotlib, psutil (or: make bench)
    python benchmarks/bench_suite.py            # 10 MB, 100 MB, 1 GB; 5 repeats; 1 and 2 threads (~15-20 min)
    python benchmarks/bench_suite.py --quick    # 10 and 100 MB, 2 repeats, short windows, no settling (~2 min)
    python benchmarks/bench_suite.py --sizes 1000 --methods bgsave,sync_torch_save --repeats 1
    python benchmarks/bench_suite.py --dir /mnt/nvme/tmp --out /tmp/results

Results are printed as a table and written to ``benchmarks/results/suite_<date>.json`` (machine,
versions, settings, every raw sample, targets), ``suite_<date>.md`` (tables) and ``suite_<date>.png``
(stall and lost training time by size and method, log scale); ``--quick`` runs add ``_quick``.
``python benchmarks/suite_report.py <json>`` draws the tables and the plot again from a results file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from harness.measure import (
    BenchModel,
    Method,
    PeakRSS,
    add_run_arguments,
    check_run_arguments,
    model_bytes,
    run_rounds,
)
from harness.report import RESULTS_DIR, load, make_target, versions, write_report
from harness.savers import CONTROL, METHODS, Saver, default_max_pending, make_savers, parse_names
from harness.training import TAIL_STEPS, TrainLoop, measure_lost
from suite_report import NOTES, print_report, write_markdown, write_plot


# ---- 1. stall, time to durable, extra RSS -----------------------------------------------------------
def timed_save(saver: Saver, counter: Iterator[int]) -> Callable[[], dict[str, float]]:
    def call() -> dict[str, float]:
        start = time.perf_counter()
        saver.start(next(counter))
        returned = time.perf_counter()
        saver.wait()
        return {f"{saver.name}/stall": returned - start, f"{saver.name}/durable": time.perf_counter() - start}

    return call


def measure_saves(
    savers: list[Saver], counter: Iterator[int], repeats: int, settle: float, rss: PeakRSS
) -> dict[str, dict[str, Any]]:
    methods = [Method(s.name, timed_save(s, counter), after=s.clean, frees=s.frees, spawns=s.spawns) for s in savers]
    series = run_rounds(methods, repeats, rss, settle)
    out: dict[str, dict[str, Any]] = {}
    for saver in savers:
        stall, durable = series[f"{saver.name}/stall"], series[f"{saver.name}/durable"]
        out[saver.name] = {
            "stall": stall.to_json(),
            "durable": durable.to_json(),
            "extra_rss_bytes": max(durable.extra_rss) + saver.kept,
            "kept_bytes": saver.kept,
        }
    return out


# ---- one size ---------------------------------------------------------------------------------------
def bench_size(
    size_mb: int,
    names: list[str],
    loops: list[TrainLoop],
    args: argparse.Namespace,
    target: Path,
    rss: PeakRSS,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = BenchModel(size_mb)
    nbytes = model_bytes(model)
    work = target / f"size_{size_mb}mb"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{size_mb} MB ({nbytes / 1e6:.0f} MB of parameters): {', '.join(names)}", flush=True)
    counter = itertools.count(1)
    threads = torch.get_num_threads()
    savers, skipped = make_savers(names, model, work, counter)
    try:
        print(f"  stall / durable / RSS: {args.repeats} rounds + warm-up ...", flush=True)
        methods = measure_saves(savers, counter, args.repeats, args.settle, rss)
        for loop in loops:
            print(f"  lost training time, {loop.threads} thread(s), batch {loop.batch}: ...", flush=True)
            lost = measure_lost(loop, savers, counter, args.repeats, args.window)
            for name, entry in lost.items():
                methods.setdefault(name, {}).setdefault("lost", {})[str(loop.threads)] = entry
    finally:
        torch.set_num_threads(threads)
        for saver in savers:
            saver.close()
        shutil.rmtree(work, ignore_errors=True)
    for entry in methods.values():
        if "durable" in entry:
            entry["throughput_gbps"] = nbytes / entry["durable"]["median_s"] / 1e9
    return {
        "size_mb": size_mb,
        "model_bytes": nbytes,
        "methods": methods,
        "skipped": skipped,
        "targets": targets(size_mb, nbytes, methods),
    }


# ---- targets ----------------------------------------------------------------------------------------
def targets(size_mb: int, nbytes: int, methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """bgsave's targets as ratios within this run.

    The value is None (n/a) where a method a target needs did not run, and for lost time where
    sync's own lost time is within the noise of the no_save control (at 10 MB, typically).
    """

    def median(method: str, *keys: str) -> float | None:
        entry: Any = methods.get(method)
        for key in keys:
            entry = entry.get(key) if isinstance(entry, dict) else None
        return None if entry is None else float(entry["median_s"])

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b <= 0 else a / b

    def bgsave_over(other: str, *keys: str) -> float | None:
        return ratio(median("bgsave", *keys), median(other, *keys))

    def lost_over_sync(threads: str) -> tuple[float | None, str | None]:
        sync = median("sync_torch_save", "lost", threads)
        control = methods.get(CONTROL, {}).get("lost", {}).get(threads)
        noise = 0.0 if control is None else max(abs(control["min_s"]), abs(control["max_s"]))
        if sync is not None and sync <= noise:
            return None, f"sync's lost time ({sync:.3g} s) is within the noise ({noise:.3g} s)"
        return bgsave_over("sync_torch_save", "lost", threads), None

    max_pending = default_max_pending()
    rss = methods.get("bgsave", {}).get("extra_rss_bytes")
    # Bandwidths are bytes / time: bgsave's over the disk's is the disk's time over bgsave's. The
    # disk's is its best: through the page cache or past it, whichever was faster in this run.
    disk = [t for t in (median("disk_fsync", "durable"), median("disk_direct", "durable")) if t is not None]
    bandwidth = ratio(min(disk) if disk else None, median("bgsave", "durable"))
    rows = [
        ("stall / copy limit's", "<=", 1.3, bgsave_over("copy_limit", "stall"), None),
        ("lost time / sync's, 1 thread", "<=", 1 / 6, *lost_over_sync("1")),
        ("lost time / sync's, 2 threads", "<=", 1 / 2, *lost_over_sync("2")),
        ("time to durable / sync's", "<=", 1.2, bgsave_over("sync_torch_save", "durable"), None),
        ("write throughput / disk fsync bandwidth (best of 2)", ">=", 0.8, bandwidth, None),
        (f"extra RSS / model (max_pending={max_pending})", "<=", max_pending + 1, rss and rss / nbytes, None),
    ]
    if size_mb <= 10:
        rows.append(("stall at 10 MB, s", "<=", 0.005, median("bgsave", "stall"), None))
    return [
        {
            "size_mb": size_mb,
            "target": name,
            "value": value,
            "limit": f"{op} {limit:.3g}",
            "pass": None if value is None else value <= limit if op == "<=" else value >= limit,
            "note": note,
        }
        for name, op, limit, value, note in rows
    ]


# ---- main -------------------------------------------------------------------------------------------
def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or any(t < 1 for t in threads):
        raise argparse.ArgumentTypeError(f"--threads takes a comma list of positive integers; got {text!r}")
    return threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, quick="smoke run: 10,100 MB, 2 repeats, short windows, no settling (~2 min)")
    parser.add_argument("--threads", type=parse_threads, default=[1, 2], help="torch threads for training (1,2)")
    parser.add_argument("--methods", type=parse_names, default=list(METHODS), help="a subset: " + ",".join(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (benchmarks/results)")
    parser.add_argument("--step-ms", type=float, default=80.0, help="training step time to calibrate for (80)")
    parser.add_argument("--window", type=int, default=None, help="baseline steps between rounds (15; 6 --quick)")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    args.window = args.window or (6 if args.quick else 15)

    target, info = make_target(args.dir, "bench-suite-", max(args.sizes))
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    rss = PeakRSS()
    per_size = []
    try:
        print(f"calibrating the training loop to {args.step_ms:.0f} ms steps ...", flush=True)
        loops = [TrainLoop(t, args.step_ms / 1e3) for t in args.threads]
        calibrated = {str(loop.threads): loop.batch for loop in loops}
        torch.set_num_threads(info["torch_threads"])
        for size in args.sizes:
            per_size.append(bench_size(size, args.methods, loops, args, target, rss))
    finally:
        shutil.rmtree(target, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    wall = time.perf_counter() - clock

    stem = f"suite_{started:%Y-%m-%d}" + ("_quick" if args.quick else "")
    body = {
        "wall_s": wall,
        "settings": {
            "sizes_mb": args.sizes,
            "repeats": args.repeats,
            "threads": args.threads,
            "methods": args.methods,
            "step_ms": args.step_ms,
            "window_steps": args.window,
            "tail_steps": TAIL_STEPS,
            "settle_s": args.settle,
            "calibrated_batch_by_threads": calibrated,  # each round's batch is in its raw sample
            "bgsave_max_pending": default_max_pending(),
        },
        "machine": info,
        "versions": versions(),
        "load_at_end": load(),
        "notes": NOTES,
        "results": per_size,
    }
    paths = [args.out / f"{stem}.json", args.out / f"{stem}.md", args.out / f"{stem}.png"]
    command = None if argv is None else " ".join(["bench_suite.main", *argv])
    report = write_report(paths[0], "suite", started, body, command)
    print_report(report)
    write_markdown(report, paths[1])
    plotted = write_plot(report, paths[2])
    print(f"{wall:.0f} s; wrote " + ", ".join(str(p) for p in paths if p.exists()))
    if not plotted:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
