"""GPU benchmark: what a save of a CUDA model costs the caller's thread and the caller's stream.

For each size (float32 ``BenchModel`` on ``cuda:0``), in one run, medians of ``--repeats`` rounds
after a warm-up round:

``d2h_pinned_limit``
    ``copy_(non_blocking=True)`` of every parameter into preallocated pinned host buffers, then a
    synchronize: the device-to-host copy time, the least a snapshot can hold the stream.
``d2h_fresh``
    ``.cpu()`` of every parameter (fresh pageable memory each time): what a naive snapshot costs.
``sync_torch_save``
    ``torch.save(model)`` + fsync, the synchronous baseline.
``bgsave``
    ``save_agent``: *stall* is how long the call blocks the caller's thread; *stream held* is how
    long the caller's CUDA stream is kept from running the next kernel (two timing events recorded
    on the caller's stream just before and just after the call; the copy's event is waited on
    between them), which should be about the pinned copy time; *durable* is ``save_agent`` +
    ``wait()``.

Usage::

    python benchmarks/bench_gpu.py                 # 100 MB and 1 GB, 5 repeats
    python benchmarks/bench_gpu.py --sizes 1000,4000 --repeats 3

Prints a table and writes ``benchmarks/results/gpu_<date>.json`` with the machine and GPU. Without
a CUDA device it says so and exits 0 (CI has none).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, BenchModel, machine, model_bytes, parse_sizes, remove, torch_save_fsync, write_report

from bgsave import CheckpointManager


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size_mb: int, repeats: int, work: Path) -> dict[str, Any]:
    model = BenchModel(size_mb).cuda()
    params = [p.detach() for p in model.parameters()]
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]
    stream = torch.cuda.current_stream()

    def d2h_pinned() -> None:
        for buf, p in zip(pinned, params, strict=True):
            buf.copy_(p, non_blocking=True)
        torch.cuda.synchronize()

    def d2h_fresh() -> None:
        for p in params:
            p.cpu()

    sync_path = str(work / "sync.pt")
    series: dict[str, list[float]] = {}
    mgr = CheckpointManager(str(work / "bgsave"), "gpu-bench")
    try:
        for round_ in range(repeats + 1):
            samples = {
                "d2h_pinned_limit": timed(d2h_pinned),
                "d2h_fresh": timed(d2h_fresh),
                "sync_torch_save": timed(lambda: torch_save_fsync(model, sync_path)),
            }
            remove(sync_path)
            torch.cuda.synchronize()
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            start = time.perf_counter()
            before.record(stream)
            mgr.save_agent(model, round_)
            stall = time.perf_counter() - start
            after.record(stream)
            mgr.wait()
            samples["bgsave_durable"] = time.perf_counter() - start
            after.synchronize()
            samples["bgsave_stall"] = stall
            samples["bgsave_stream_held"] = before.elapsed_time(after) / 1e3
            remove(os.path.join(mgr.checkpoint_dir, "model_*"))
            if round_ > 0:  # round 0 warms up (bgsave allocates its pinned buffers there)
                for name, value in samples.items():
                    series.setdefault(name, []).append(value)
            print(f"  {size_mb} MB round {round_}: " + ", ".join(f"{k} {v:.4f}s" for k, v in samples.items()))
    finally:
        mgr.close()
    nbytes = model_bytes(model)
    medians = {name: statistics.median(values) for name, values in series.items()}
    return {
        "size_mb": size_mb,
        "model_bytes": nbytes,
        "median_s": medians,
        "samples_s": series,
        "ratios": {
            "stall / d2h_pinned_limit": medians["bgsave_stall"] / medians["d2h_pinned_limit"],
            "stream_held / d2h_pinned_limit": medians["bgsave_stream_held"] / medians["d2h_pinned_limit"],
            "stall / sync_torch_save": medians["bgsave_stall"] / medians["sync_torch_save"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=parse_sizes, default=[100, 1000], help="model sizes in MB (100,1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (5)")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/gpu_<date>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        results = [bench_size(size, args.repeats, work) for size in args.sizes]
        info = machine(work)
    info["gpu"] = torch.cuda.get_device_name(0)
    columns = list(results[0]["median_s"])
    print("\nmedians, seconds\n" + "size      " + "  ".join(f"{c:>18}" for c in columns))
    for r in results:
        print(f"{r['size_mb']:>5} MB  " + "  ".join(f"{r['median_s'][c]:>18.4f}" for c in columns))
    out = args.out or RESULTS_DIR / f"gpu_{started:%Y-%m-%d}.json"
    body = {
        "machine": info,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "results": results,
    }
    write_report(out, "gpu", started, body)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
