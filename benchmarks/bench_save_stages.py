"""Save stages: the parts of one save timed alone, on an idle machine, to see where a stall and a write go.

The suite (``bench_suite.py``) measures what a whole save costs a training run, against the peers;
this script takes one save apart instead, with no training beside it. For each model size (float32
``BenchModel`` of ``--layers`` ``Linear`` layers), round-robin, medians of ``--repeats`` rounds:

The snapshot (what the caller waits for):

``copy_limit``
    ``copy_`` of every parameter into preallocated, already-touched buffers (torch's intra-op
    threads): the least a snapshot can cost, as in the suite.
``memcpy_limit``
    The same with one ``memcpy`` per tensor on the calling thread: how bgsave copies CPU tensors.
``clone``
    ``clone()`` of every parameter into fresh memory: what a snapshot costs when buffers are not reused.
``bgsave_stall``
    ``save_agent`` itself: the copy plus pickling the rest of the module on the caller's thread and
    queueing the job. ``--layers 96`` shows what many modules add.

The writer (what runs in the background):

``bgsave_durable``
    ``save_agent`` + ``wait()``; its CPU column is the process's CPU during ``wait()``, when the
    caller sleeps: the writer's own CPU per save.
``serialize_crc32_on`` / ``serialize_crc32_off``
    ``torch.save`` of the model into a sink that discards the bytes, with torch's per-record CRC32s
    and without (bgsave's default): serialization's CPU alone, and what the CRC32s cost per GB.

How bytes reach the disk is ``bench_write_size.py``'s; what each writer stage costs a training loop
is ``bench_writer_cost.py``'s. Checkpoint files are deleted after each round, once durable, then
``--settle`` seconds of rest (see ``harness.measure.run_rounds``).

Usage::

    python benchmarks/bench_save_stages.py                 # 10 MB, 100 MB, 1 GB; 5 repeats (~3 min)
    python benchmarks/bench_save_stages.py --sizes 10 --layers 96
    python benchmarks/bench_save_stages.py --quick         # 10 and 100 MB, 2 repeats, no settling

Prints a table and writes ``benchmarks/results/save_stages_<date>.json`` (``_layers<N>`` when
``--layers`` is not 4, ``_quick`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness.measure import (
    MB,
    BenchModel,
    Method,
    PeakRSS,
    Series,
    add_run_arguments,
    check_run_arguments,
    cpu_seconds,
    model_bytes,
    remove,
    run_rounds,
    timed,
)
from harness.report import RESULTS_DIR, load, make_target, write_report

from bgsave import CheckpointManager

ROWS = [
    ("copy_limit", "copy_ into reused buffers"),
    ("memcpy_limit", "memcpy into reused buffers"),
    ("clone", "clone() into fresh memory"),
    ("bgsave_stall", "bgsave save_agent (stall)"),
    ("bgsave_durable", "bgsave save_agent + wait()"),
    ("serialize_crc32_on", "torch.save to a sink, CRC32s"),
    ("serialize_crc32_off", "torch.save to a sink, none"),
]


class NullSink:
    """A binary file object that discards what is written: ``torch.save``'s CPU without any I/O."""

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def serialize(model: torch.nn.Module, crc32: bool) -> None:
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)
    try:
        torch.save(model, NullSink())
    finally:
        torch.serialization.set_crc32_options(saved)


def bench_size(size_mb: int, args: argparse.Namespace, target: Path, rss: PeakRSS) -> dict[str, Any]:
    torch.manual_seed(0)
    model = BenchModel(size_mb, args.layers)
    params = [p.detach() for p in model.parameters()]
    nbytes = model_bytes(model)
    work = target / f"size_{size_mb}mb"
    work.mkdir(parents=True, exist_ok=True)
    print(f"  {size_mb} MB ({nbytes / 1e6:.0f} MB, {args.layers} layers): {args.repeats} rounds ...", flush=True)

    buffers = [torch.empty_like(p).zero_() for p in params]

    def copy_all() -> None:
        for b, p in zip(buffers, params, strict=True):
            b.copy_(p)

    def memcpy_all() -> None:
        for b, p in zip(buffers, params, strict=True):
            ctypes.memmove(b.data_ptr(), p.data_ptr(), b.numel() * b.element_size())

    clones: list[torch.Tensor] = []
    manager = CheckpointManager(str(work / "bgsave"), "stages")
    epochs = iter(range(1, 10**9))

    def bgsave_save() -> dict[str, float]:
        cpu0, start = cpu_seconds(), time.perf_counter()
        manager.save_agent(model, next(epochs))
        cpu1, returned = cpu_seconds(), time.perf_counter()
        manager.wait()
        cpu2, done = cpu_seconds(), time.perf_counter()
        return {
            "bgsave_stall": returned - start,
            "bgsave_durable": done - start,
            "cpu:bgsave_stall": cpu1 - cpu0,
            "cpu:bgsave_durable": cpu2 - cpu1,  # the caller sleeps in wait(): the writer's CPU
        }

    methods = [
        Method("copy_limit", timed("copy_limit", copy_all)),
        Method("memcpy_limit", timed("memcpy_limit", memcpy_all)),
        Method("clone", timed("clone", lambda: clones.extend(p.clone() for p in params)), clones.clear, frees=True),
        Method("bgsave", bgsave_save, lambda: remove(os.path.join(manager.checkpoint_dir, "model_*")), frees=True),
        Method("serialize_crc32_on", timed("serialize_crc32_on", lambda: serialize(model, True))),
        Method("serialize_crc32_off", timed("serialize_crc32_off", lambda: serialize(model, False))),
    ]
    try:
        results = run_rounds(methods, args.repeats, rss, args.settle)
        for key in ("copy_limit", "memcpy_limit"):  # one set of buffers, made before the rounds
            results[key].extra_rss = [nbytes]
    finally:
        manager.close()
        buffers.clear()
        shutil.rmtree(work, ignore_errors=True)
    return summarize(size_mb, nbytes, args.layers, results)


def summarize(size_mb: int, nbytes: int, layers: int, results: dict[str, Series]) -> dict[str, Any]:
    def median(name: str) -> float:
        return results[name].median

    gb = nbytes / 1e9
    return {
        "size_mb": size_mb,
        "model_bytes": nbytes,
        "layers": layers,
        "methods": {name: series.to_json() for name, series in results.items()},
        "ratios": {
            "stall_over_copy_limit": median("bgsave_stall") / median("copy_limit"),
            "stall_over_memcpy_limit": median("bgsave_stall") / median("memcpy_limit"),
            "stall_beyond_memcpy_s": median("bgsave_stall") - median("memcpy_limit"),
            "clone_over_memcpy_limit": median("clone") / median("memcpy_limit"),
            "crc32_s_per_gb": (median("serialize_crc32_on") - median("serialize_crc32_off")) / gb,
            "writer_cpu_s_per_gb": statistics.median(results["bgsave_durable"].cpu) / gb,
        },
    }


def print_table(sizes: list[dict[str, Any]]) -> None:
    header = f"{'size':>7} {'stage':<31} {'median s':>9} {'min s':>8} {'max s':>8} {'first s':>8} {'GB/s':>6}"
    header += f" {'CPU s':>6} {'+RSS MB':>8}"
    print(f"\n{header}\n{'-' * len(header)}")
    for result in sizes:
        gb = result["model_bytes"] / 1e9
        for key, label in ROWS:
            m = result["methods"].get(key)
            if m is None:
                continue
            cpu, extra = m.get("cpu_s_median"), m.get("peak_extra_rss_bytes")
            print(
                f"{result['size_mb']:>5}MB {label:<31} {m['median_s']:>9.4f} {m['min_s']:>8.4f} {m['max_s']:>8.4f}"
                f" {m['first_s']:>8.4f} {gb / m['median_s']:>6.2f}"
                f" {'' if cpu is None else f'{cpu:.2f}':>6} {'' if extra is None else f'{extra / MB:.0f}':>8}"
            )
        print(f"{'':>7} " + ", ".join(f"{k} {v:.3g}" for k, v in result["ratios"].items()) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, quick="smoke run: sizes 10,100 and 2 repeats, no settling")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers in the model (4; more = more modules)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/save_stages_<date>.json)")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    if args.layers < 1:
        parser.error("--layers must be >= 1")

    target, info = make_target(args.dir, "bench-save-stages-", max(args.sizes))
    rss = PeakRSS()
    started = dt.datetime.now(dt.timezone.utc)
    try:
        per_size = [bench_size(size, args, target, rss) for size in args.sizes]
    finally:
        shutil.rmtree(target, ignore_errors=True)
    print_table(per_size)

    suffix = (f"_layers{args.layers}" if args.layers != 4 else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS_DIR / f"save_stages_{started:%Y-%m-%d}{suffix}.json"
    body = {
        "settings": {"sizes_mb": args.sizes, "repeats": args.repeats, "layers": args.layers, "settle_s": args.settle},
        "machine": info,
        "load_at_end": load(),
        "results": per_size,
    }
    write_report(out, "save_stages", started, body)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
