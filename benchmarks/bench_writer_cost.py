"""Where a background writer's cost to training goes: each stage of a save, alone, in a background thread.

Each method runs one stage of writing a ``--mb`` checkpoint in a plain thread while the suite's MLP
training loop (``harness.training.TrainLoop``) runs with ``--threads`` torch threads, and reports the
lost training time as the suite does (``harness.training.measure_lost``, round-robin, medians):

``save_null_crc`` / ``save_null_nocrc``
    ``torch.save`` of a state dict into a sink that discards the bytes, CRC32 on / off: the CPU of
    serializing alone.
``write_buffered``
    Writing the same number of bytes from memory in 128 KiB writes, then ``fsync``: the page cache
    path with the disk starting only at the fsync.
``write_behind``
    The same, starting writeback every 32 MiB with ``sync_file_range`` (what bgsave does locally).
``write_direct``
    ``O_DIRECT`` writes of 64 MiB straight from page-aligned memory, then ``fsync``: no page cache,
    no copy (what bgsave does for a large checkpoint on local disk; ``harness.measure.disk_writer``, as the
    suite's ``disk_direct``).
``memcpy``
    One ``memcpy`` of the same bytes: memory bandwidth alone.

Usage::

    python benchmarks/bench_writer_cost.py                 # 1000 MB, 2 threads, 5 rounds
    python benchmarks/bench_writer_cost.py --threads 1 --mb 100

Prints a table and writes ``benchmarks/results/writer_cost_<date>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import itertools
import os
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from harness.measure import disk_writer
from harness.report import RESULTS_DIR, make_target, write_report
from harness.savers import Saver
from harness.training import TrainLoop, measure_lost

CHUNK = 128 * 2**10  # as bgsave's local writes
WRITE_BEHIND = 32 * 2**20
DIRECT_CHUNK = 64 * 2**20
libc = ctypes.CDLL(None, use_errno=True)


class NullSink:
    def write(self, data: object) -> int:
        return len(memoryview(data).cast("B"))  # type: ignore[arg-type]

    def flush(self) -> None:
        pass


def in_thread(name: str, fn: Callable[[], object], clean: Callable[[], object] = lambda: None) -> Saver:
    box: dict[str, threading.Thread] = {}

    def start(_: int) -> None:
        box["t"] = threading.Thread(target=fn, name=name)
        box["t"].start()

    # Lambdas: the thread exists only once start() has run.
    return Saver(name, start, lambda: not box["t"].is_alive(), lambda: box["t"].join(), clean=clean)  # noqa: PLW0108


def methods(nbytes: int, work: Path) -> list[Saver]:
    source = torch.rand(nbytes // 4)
    view = memoryview(source.numpy()).cast("B")
    state = {f"t{i}": t for i, t in enumerate(source.split(64 * 2**20 // 4))}
    target = torch.empty_like(source)
    path = str(work / "w.bin")

    def null_save(crc: bool) -> None:
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(state, NullSink())
        finally:
            torch.serialization.set_crc32_options(True)

    def buffered(write_behind: bool) -> None:
        with open(path, "wb") as f:
            started = 0
            for offset in range(0, nbytes, CHUNK):
                f.write(view[offset : offset + CHUNK])
                end = min(offset + CHUNK, nbytes)
                if write_behind and end - started >= WRITE_BEHIND:
                    f.flush()
                    libc.sync_file_range(f.fileno(), ctypes.c_int64(started), ctypes.c_int64(end - started), 2)
                    started = end
            f.flush()
            os.fsync(f.fileno())

    direct = disk_writer(path, nbytes, DIRECT_CHUNK, direct=True)

    def remove() -> None:
        if os.path.exists(path):
            os.remove(path)

    return [
        in_thread("save_null_crc", lambda: null_save(True)),
        in_thread("save_null_nocrc", lambda: null_save(False)),
        in_thread("write_buffered", lambda: buffered(False), remove),
        in_thread("write_behind", lambda: buffered(True), remove),
        in_thread("write_direct", direct, remove),
        in_thread("memcpy", lambda: ctypes.memmove(target.data_ptr(), source.data_ptr(), nbytes)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=1000, help="bytes per save, in MiB (1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (2)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds after one warm-up (5)")
    parser.add_argument("--dir", type=Path, default=None, help="where files are written (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    nbytes = args.mb * 2**20
    work, info = make_target(args.dir, "writer-cost-", args.mb)
    started = dt.datetime.now(dt.timezone.utc)
    try:
        loop = TrainLoop(args.threads, 0.08)
        results = measure_lost(loop, methods(nbytes, work), itertools.count(1), args.repeats, 10)
    finally:
        for leftover in work.glob("*"):
            leftover.unlink()
        work.rmdir()
    print(f"{args.mb} MiB, {args.threads} training thread(s): lost training time per save, s (median [min, max])")
    for name, entry in results.items():
        durable = statistics.median(r["durable_s"] for r in entry["rounds"])
        print(
            f"  {name:16s} {entry['median_s']:7.3f} [{entry['min_s']:.3f}, {entry['max_s']:.3f}]  done in {durable:.2f}"
        )
    out = args.out or RESULTS_DIR / f"writer_cost_{started:%Y-%m-%d}.json"
    body = {
        "settings": {"mb": args.mb, "threads": args.threads, "repeats": args.repeats},
        "machine": info,
        "results": results,
    }
    write_report(out, "writer_cost", started, body)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
