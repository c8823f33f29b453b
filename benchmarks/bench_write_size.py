"""Write size: how the size of each ``write()`` changes the cost of writing a checkpoint to local disk.

``torch.save`` hands each tensor to ``write()`` in one call (hundreds of MB for a large layer);
bgsave passes page-cache writes on in slices (``bgsave.storage.diskfile._WRITE_SLICE``). Two sweeps, round-robin,
medians of ``--repeats`` rounds after a warm-up, ``--settle`` seconds after each file is deleted (as
in ``harness.measure.run_rounds``):

``disk``
    ``--mb`` MiB written from one buffer in writes of each size, then ``fsync``: time and the
    process's system CPU (the kernel's side of the copy into the page cache and of writeback).
``bgsave``
    ``save_agent`` + ``wait()`` of a ``--mb`` MB model written through the page cache with the slice
    set to each size (``none``: torch's own write sizes), and as bgsave writes a large checkpoint by
    default, past the page cache (``O_DIRECT``): time to durable, user and system CPU (the writer's
    CPU, which a busy training loop loses).

Usage::

    python benchmarks/bench_write_size.py                  # 1000 MB, 5 rounds (~6 min)
    python benchmarks/bench_write_size.py --mb 200 --repeats 2 --settle 0

Prints a table and writes ``benchmarks/results/write_size_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness.measure import BenchModel, disk_writer, remove
from harness.report import RESULTS_DIR, make_target, write_report

from bgsave import CheckpointManager
from bgsave.storage import diskfile
from bgsave.storage.local import direct_writes_from

KiB = 2**10
DISK_SIZES = [64 * KiB, 128 * KiB, 512 * KiB, 1024 * KiB, 8192 * KiB, 65536 * KiB]
SLICES: list[int | None] = [0, 128 * KiB, 1024 * KiB, None]  # None: O_DIRECT


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measured(fn: Callable[[], object]) -> dict[str, float]:
    (u0, s0), start = cpu(), time.perf_counter()
    fn()
    elapsed, (u1, s1) = time.perf_counter() - start, cpu()
    return {"s": elapsed, "user_s": u1 - u0, "sys_s": s1 - s0}


def slice_name(slice_bytes: int | None) -> str:
    return "O_DIRECT" if slice_bytes is None else f"{slice_bytes // KiB} KiB" if slice_bytes else "none"


def bgsave_save(manager: CheckpointManager, model: torch.nn.Module, slice_bytes: int | None) -> Callable[[], None]:
    epochs = iter(range(10**9))

    def save() -> None:
        # 0: no slicing (one write per tensor, as torch.save makes them). The slice is the variable
        # this benchmark sweeps, so it is set on diskfile itself; it is read at each save.
        diskfile._WRITE_SLICE = slice_bytes or 2**62
        with direct_writes_from(0 if slice_bytes is None else 2**62):
            manager.save_agent(model, next(epochs))
            manager.wait()

    return save


def sweep(
    cases: dict[str, Callable[[], None]], clean: Callable[[], None], repeats: int, settle: float
) -> dict[str, dict[str, Any]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(repeats + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(settle)  # after the previous delete: see harness.measure.run_rounds
            sample = measured(cases[name])
            clean()
            if round_ > 0:
                samples[name].append(sample)
        print(f"  round {round_} done", flush=True)
    return {
        name: {key: statistics.median(s[key] for s in rows) for key in rows[0]} | {"samples": rows}
        for name, rows in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=1000, help="bytes written / model size, MB (1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (5)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after each delete (3)")
    parser.add_argument("--dir", type=Path, default=None, help="where files are written (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/write_size_<date>.json)")
    args = parser.parse_args(argv)
    if args.mb < 1 or args.repeats < 1 or args.settle < 0:
        parser.error("--mb and --repeats must be >= 1, --settle >= 0")
    started = dt.datetime.now(dt.timezone.utc)
    target, info = make_target(args.dir, "bench-write-size-", args.mb)
    default_slice = diskfile._WRITE_SLICE
    try:
        nbytes = args.mb * 2**20
        path = str(target / "disk.bin")
        print(f"disk: {args.mb} MiB + fsync in writes of {', '.join(f'{s // KiB} KiB' for s in DISK_SIZES)}")
        disk_cases = {f"{s // KiB} KiB": disk_writer(path, nbytes, s) for s in DISK_SIZES}
        disk = sweep(disk_cases, lambda: remove(path), args.repeats, args.settle)

        torch.manual_seed(0)
        model = BenchModel(args.mb)
        with CheckpointManager(str(target / "bgsave"), "write-size") as manager:
            print(f"bgsave: {args.mb} MB model, slices {', '.join(slice_name(s) for s in SLICES)}")
            cases = {slice_name(s): bgsave_save(manager, model, s) for s in SLICES}
            clean = lambda: remove(os.path.join(manager.checkpoint_dir, "model_*"))  # noqa: E731
            saves = sweep(cases, clean, args.repeats, args.settle)
    finally:
        diskfile._WRITE_SLICE = default_slice
        shutil.rmtree(target, ignore_errors=True)

    for title, rows in (("disk write + fsync", disk), ("bgsave save_agent + wait", saves)):
        print(f"\n{title}, {args.mb} MB, medians\n{'write size':<12}{'time s':>10}{'user s':>10}{'sys s':>10}")
        for name, row in rows.items():
            print(f"{name:<12}{row['s']:>10.3f}{row['user_s']:>10.3f}{row['sys_s']:>10.3f}")
    out = args.out or RESULTS_DIR / f"write_size_{started:%Y-%m-%d}.json"
    body = {
        "settings": {"mb": args.mb, "repeats": args.repeats, "settle_s": args.settle},
        "machine": info,
        "disk_write_fsync": disk,
        "bgsave_save": saves,
    }
    write_report(out, "write_size", started, body)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
