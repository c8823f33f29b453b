"""Save benchmark: how long bgsave blocks the caller, against a synchronous ``torch.save`` + fsync.

For each model size (float32 ``nn.Module`` of ``--layers`` large ``Linear`` layers) it measures, in one run and
with the same model:

``copy_limit``
    ``copy_`` of every parameter into preallocated, already-touched CPU buffers: the least a snapshot
    can cost the caller.
``memcpy_limit``
    The same with one ``memcpy`` per tensor on the calling thread (how bgsave copies CPU tensors):
    immune to the intra-op thread pool waiting for a busy core.
``clone``
    ``clone()`` of every parameter (fresh allocation each time), for comparison: what a snapshot costs
    when buffers are not reused.
``sync_torch_save``
    ``torch.save(model, path)`` then ``fsync`` of the file: the synchronous baseline.
``sync_torch_save_file``
    The same through a Python file object (``open(path, "wb")``), which is how bgsave writes.
``bgsave``
    ``CheckpointManager.save_agent``: its *stall* (how long the call blocks) and its *time to durable*
    (``save_agent`` + ``wait()``, i.e. ``.pt`` and sidecar written, fsynced and renamed).
``bgsave_sync``
    The same with ``background=False`` (the call blocks for the whole write).

and, unless ``--no-extras``, where a writer's time goes (issue 4): the disk's own fsync'd bandwidth
for the same number of bytes (``dd``-like 128 KiB writes from memory), ``torch.save`` to the same file
without fsync (serialization + copy into the page cache), and ``torch.save`` into a sink that discards
the bytes with CRC32 on and off (serialization CPU alone).

The methods run round-robin: one warm-up round (reported as ``first``: for bgsave it includes
allocating its snapshot buffers), then ``--repeats`` timed rounds, each running every method once,
so all of them see the same background load on a shared machine; medians are reported. Checkpoint
files are deleted after each run, once durable, so every save writes a new file and the disk does not
fill. Extra resident memory is the peak RSS during a call (the kernel's high-water mark) above the
RSS just before it, plus what the method keeps between calls (bgsave's reused snapshot buffers,
measured over its warm-up).

Usage::

    python benchmarks/bench_save.py                      # 10 MB, 100 MB, 1 GB; 5 repeats
    python benchmarks/bench_save.py --sizes 100,1000 --repeats 7 --dir /mnt/nvme/tmp
    python benchmarks/bench_save.py --quick              # smoke run: 10 and 100 MB, 2 repeats, no settling

Results are printed as a table and written to ``benchmarks/results/save_<date>.json`` (``--quick``
runs to ``save_<date>_quick.json``) with a description of the machine. The model, the measuring
(``PeakRSS``, ``run_rounds``) and the machine's description live in ``common.py``, shared with
``bench_suite.py``, which adds DCP and Lightning, throughput and lost training time.
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
from common import (
    MB,
    RESULTS_DIR,
    BenchModel,
    Method,
    PeakRSS,
    Series,
    add_run_arguments,
    check_run_arguments,
    cpu_seconds,
    disk_writer,
    fsync_path,
    load,
    make_target,
    model_bytes,
    remove,
    run_rounds,
    timed,
    torch_save_fsync,
    write_report,
)
from torch import nn

from bgsave import CheckpointManager

ISSUE2_TARGET = 0.1  # stall at most 1/10 of the synchronous save (at 1 GB)


class NullSink:
    """A binary file object that discards what is written: ``torch.save`` CPU without any I/O."""

    def __init__(self) -> None:
        self.nbytes = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.nbytes += n
        return n

    def flush(self) -> None:
        pass


# ---- one size -------------------------------------------------------------------------------------
def bench_size(
    size_mb: int, repeats: int, target: Path, extras: bool, rss: PeakRSS, layers: int = 4, settle: float = 0.0
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = BenchModel(size_mb, layers)
    params = [p.detach() for p in model.parameters()]
    nbytes = model_bytes(model)
    work = target / f"size_{size_mb}mb"
    work.mkdir(parents=True, exist_ok=True)
    print(f"  {size_mb} MB ({nbytes / 1e6:.0f} MB of parameters, {layers} layers): {repeats} rounds ...", flush=True)

    # (d) the copy limit: copy_ into buffers that already exist and are touched.
    buffers = [torch.empty_like(p) for p in params]
    for b in buffers:
        b.zero_()

    def copy_all() -> None:
        for b, p in zip(buffers, params, strict=True):
            b.copy_(p)

    def memcpy_all() -> None:
        # One memcpy per tensor on this thread: what bgsave's snapshot does for CPU tensors.
        for b, p in zip(buffers, params, strict=True):
            ctypes.memmove(b.data_ptr(), p.data_ptr(), b.numel() * b.element_size())

    clones: list[torch.Tensor] = []

    # (a) synchronous torch.save to the path + fsync.
    sync_path = str(work / "sync.pt")

    def sync_save_file() -> None:
        # The same through a Python file object, as bgsave writes: on some VMs the two differ.
        with open(sync_path, "wb") as f:
            torch.save(model, f)
            f.flush()
            os.fsync(f.fileno())

    # (b) bgsave in the background: stall and time to durable from the same saves; (c) without.
    bg = CheckpointManager(str(work / "bg"), "bench", background=True)
    fg = CheckpointManager(str(work / "fg"), "bench", background=False)
    epochs = {"bg": 0, "fg": 0}
    writer_cpu: list[float] = []

    def bg_save() -> dict[str, float]:
        epochs["bg"] += 1
        cpu0, start = cpu_seconds(), time.perf_counter()
        bg.save_agent(model, epochs["bg"], {"agent_step": epochs["bg"]})
        cpu1, returned = cpu_seconds(), time.perf_counter()
        bg.wait()
        cpu2, done = cpu_seconds(), time.perf_counter()
        # The caller sleeps in wait(): the process's CPU in that window is the writer's.
        writer_cpu.append(cpu2 - cpu1)
        return {
            "bgsave_stall": returned - start,
            "bgsave_durable": done - start,
            "cpu:bgsave_stall": cpu1 - cpu0,
            "cpu:bgsave_durable": cpu2 - cpu1,
        }

    def fg_save() -> None:
        epochs["fg"] += 1
        fg.save_agent(model, epochs["fg"])

    methods = [
        Method("copy_limit", timed("copy_limit", copy_all)),
        Method("memcpy_limit", timed("memcpy_limit", memcpy_all)),
        Method(
            "clone", timed("clone", lambda: clones.extend(p.clone() for p in params)), after=clones.clear, frees=True
        ),
        Method(
            "sync_torch_save",
            timed("sync_torch_save", lambda: torch_save_fsync(model, sync_path)),
            after=lambda: remove(sync_path),
            frees=True,
        ),
        Method(
            "sync_torch_save_file",
            timed("sync_torch_save_file", sync_save_file),
            after=lambda: remove(sync_path),
            frees=True,
        ),
        Method("bgsave", bg_save, after=lambda: remove(os.path.join(bg.checkpoint_dir, "model_*")), frees=True),
        Method(
            "bgsave_sync",
            timed("bgsave_sync", fg_save),
            after=lambda: remove(os.path.join(fg.checkpoint_dir, "model_*")),
            frees=True,
        ),
    ]
    if extras:
        methods += extra_methods(model, nbytes, work)
    try:
        results = run_rounds(methods, repeats, rss, settle)
        # copy_limit and memcpy_limit share one set of buffers, made before the rounds.
        for key in ("copy_limit", "memcpy_limit"):
            results[key].extra_rss = [nbytes]
        records = [r for r in bg.records if r.kind == "agent"]
        bg_detail = {
            "records": [
                {"stall_s": r.stall_s, "queue_wait_s": r.queue_wait_s, "write_s": r.write_s, "bytes": r.bytes}
                for r in records
            ],
            "writer_cpu_s_median": statistics.median(writer_cpu[1:]) if len(writer_cpu) > 1 else None,
            "write_s_median": statistics.median(r.write_s for r in records[1:]) if len(records) > 1 else None,
        }
        # Sanity: the file holds the model (one extra save, not timed).
        check = bg.save_agent(model, 100_000)
        bg.wait()
        loaded = torch.load(check, weights_only=False)
        if not all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True)):
            raise RuntimeError(f"bgsave wrote a checkpoint that does not match the model ({check})")
        del loaded
    finally:
        bg.close()
        fg.close()
        buffers.clear()
        shutil.rmtree(work, ignore_errors=True)
    return summarize(size_mb, nbytes, results, bg_detail)


def extra_methods(model: nn.Module, nbytes: int, work: Path) -> list[Method]:
    """Where a writer's time goes (issue 4): the disk alone, torch.save without fsync, serialization alone."""
    raw_path = str(work / "raw.bin")
    path = str(work / "nofsync.pt")

    def drop() -> None:
        fsync_path(path)  # flushed untimed, so the next method starts with a clean page cache
        remove(path)

    def null_save(crc: bool) -> None:
        saved = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(model, NullSink())
        finally:
            torch.serialization.set_crc32_options(saved)

    return [
        Method(
            "disk_write_fsync",
            timed("disk_write_fsync", disk_writer(raw_path, nbytes)),
            after=lambda: remove(raw_path),
            frees=True,
        ),
        Method(
            "torch_save_no_fsync", timed("torch_save_no_fsync", lambda: torch.save(model, path)), after=drop, frees=True
        ),
        Method("torch_save_null_crc_on", timed("torch_save_null_crc_on", lambda: null_save(True))),
        Method("torch_save_null_crc_off", timed("torch_save_null_crc_off", lambda: null_save(False))),
    ]


def summarize(size_mb: int, nbytes: int, results: dict[str, Series], bg_detail: dict[str, Any]) -> dict[str, Any]:
    sync = results["sync_torch_save"].median
    copy = results["copy_limit"].median
    stall = results["bgsave_stall"].median
    durable = results["bgsave_durable"].median
    ratios: dict[str, float | None] = {
        "stall_over_sync": stall / sync,
        "stall_over_copy_limit": stall / copy,
        "stall_over_memcpy_limit": stall / results["memcpy_limit"].median,
        "durable_over_sync": durable / sync,
        "durable_over_sync_file": durable / results["sync_torch_save_file"].median,
        "bgsave_sync_over_sync": results["bgsave_sync"].median / sync,
    }
    throughput = {
        "sync_torch_save_gbps": nbytes / sync / 1e9,
        "bgsave_durable_gbps": nbytes / durable / 1e9,
        "copy_limit_gbps": nbytes / copy / 1e9,
        "clone_gbps": nbytes / results["clone"].median / 1e9,
    }
    if "disk_write_fsync" in results:
        disk = results["disk_write_fsync"].median
        throughput["disk_fsync_gbps"] = nbytes / disk / 1e9
        ratios["bgsave_write_over_disk_bandwidth"] = (nbytes / durable) / (nbytes / disk)
        for key in ("torch_save_no_fsync", "torch_save_null_crc_on", "torch_save_null_crc_off"):
            throughput[f"{key}_gbps"] = nbytes / results[key].median / 1e9
        ratios["crc32_s_per_gb"] = (
            results["torch_save_null_crc_on"].median - results["torch_save_null_crc_off"].median
        ) / (nbytes / 1e9)
    return {
        "size_mb": size_mb,
        "model_bytes": nbytes,
        "methods": {name: series.to_json() for name, series in results.items()},
        "bgsave": bg_detail,
        "ratios": ratios,
        "throughput": throughput,
        # Issue 2 sets its target at 1 GB; issue 4's targets are checked where they apply.
        "meets_issue2_target": stall <= ISSUE2_TARGET * sync if size_mb >= 1000 else None,
        "issue4_targets": {
            "stall_le_1.3x_copy_limit": stall <= 1.3 * copy,
            "durable_le_1.2x_sync": durable <= 1.2 * sync,
            "write_ge_80pct_disk_bandwidth": (
                ratios["bgsave_write_over_disk_bandwidth"] >= 0.8 if "disk_write_fsync" in results else None
            ),
            "stall_le_5ms": stall <= 0.005 if size_mb <= 10 else None,
            "extra_rss_le_2x_model_max_pending_1": max(results["bgsave_stall"].extra_rss) <= 2 * nbytes,
        },
    }


NOTES = [
    "Medians of the timed repeats; 'first' is the warm-up run (for bgsave it includes allocating and "
    "first-touching its snapshot buffers, which later saves reuse).",
    "Every save writes a new file, deleted once fsynced: no run reads or overwrites an earlier run's "
    "page-cache pages. Writes go to the page cache first; fsync waits for the (virtual) disk, whose "
    "host may cache too, so fsync'd bandwidth is the device as this VM sees it.",
    "Page cache and free page reporting: on a VM that reports free pages to its host (page_reporting_* "
    "below), memory freed by a delete is taken back by the host about 2 s later, and writing into it "
    "again costs a host fault per page (1 GiB into the page cache: 0.3 s right after a delete, 1.3 s "
    "three seconds later). The run waits settle_s after every delete so that every write starts from "
    "that same, slower state.",
    "Write size matters on such a VM: torch.save hands each tensor to write() in one call, bgsave's "
    "storage layer passes local writes on in 128 KiB pieces. In isolated probes 1 GiB + fsync took "
    "2.35 s (1.8 s system CPU) in 64 MiB writes against 0.81 s (0.3 s) in 1 MiB writes (2026-11-25); "
    "on 2026-11-26 (Linux 6.18) 0.78-0.81 s (0.33-0.35 s) in 64-512 KiB writes, 1.57 s (1.03 s) in "
    "1 MiB writes and 3.0 s (2.5 s) in 64 MiB writes. So absolute write times, and durable/sync, hold "
    "within one run only. disk_write_fsync uses 128 KiB writes.",
    "bgsave_durable is save_agent + wait(): .pt and sidecar written, fsynced, renamed, directory fsynced. "
    "The baseline fsyncs the .pt only.",
    "CPU s is the process's CPU time during the call; for bgsave_durable it is the CPU during wait(), "
    "when the caller sleeps: the writer's CPU.",
    "Extra RSS is the peak resident memory during the call (kernel high-water mark) above the RSS just "
    "before it, plus what the method keeps between calls (for bgsave the snapshot buffers it reuses; for "
    "the copy limits their preallocated buffers). Page cache is not RSS.",
    "Methods run round-robin, one call each per round, so they share the background load of a shared "
    "machine; compare ratios from one run.",
    "copy_limit uses torch's copy_ (its intra-op threads); memcpy_limit one memcpy per tensor on the "
    "calling thread, which is how bgsave copies CPU tensors.",
]


# ---- output ---------------------------------------------------------------------------------------
ROWS = [
    ("copy_limit", "copy_ into reused buffers"),
    ("memcpy_limit", "memcpy into reused buffers"),
    ("clone", "clone() (fresh memory)"),
    ("sync_torch_save", "torch.save + fsync (sync)"),
    ("sync_torch_save_file", "same, via a file object"),
    ("bgsave_stall", "bgsave stall"),
    ("bgsave_durable", "bgsave time to durable"),
    ("bgsave_sync", "bgsave background=False"),
    ("disk_write_fsync", "disk write + fsync (dd-like)"),
    ("torch_save_no_fsync", "torch.save, no fsync"),
    ("torch_save_null_crc_on", "torch.save to null, CRC32 on"),
    ("torch_save_null_crc_off", "torch.save to null, CRC32 off"),
]


def print_table(sizes: list[dict[str, Any]]) -> None:
    header = f"{'size':>7} {'method':<31} {'median s':>9} {'min s':>8} {'max s':>8} {'first s':>8} {'/sync':>7}"
    header += f" {'GB/s':>6} {'CPU s':>6} {'+RSS MB':>8}"
    print()
    print(header)
    print("-" * len(header))
    for result in sizes:
        methods = result["methods"]
        sync = methods["sync_torch_save"]["median_s"]
        gb = result["model_bytes"] / 1e9
        for key, label in ROWS:
            m = methods.get(key)
            if m is None:
                continue
            rss = m.get("peak_extra_rss_bytes")
            cpu = m.get("cpu_s_median")
            print(
                f"{result['size_mb']:>5}MB {label:<31} {m['median_s']:>9.4f} {m['min_s']:>8.4f} {m['max_s']:>8.4f}"
                f" {m['first_s']:>8.4f} {m['median_s'] / sync:>7.3f} {gb / m['median_s']:>6.2f}"
                f" {'' if cpu is None else f'{cpu:.2f}':>6} {'' if rss is None else f'{rss / MB:.0f}':>8}"
            )
        r = result["ratios"]
        met = result["meets_issue2_target"]
        verdict = "n/a below 1 GB" if met is None else "met" if met else "MISSED"
        print(
            f"{'':>7} stall/sync {r['stall_over_sync']:.3f} (issue 2 target <= {ISSUE2_TARGET}: {verdict}); "
            f"stall/copy limit {r['stall_over_copy_limit']:.2f} (memcpy {r['stall_over_memcpy_limit']:.2f}); "
            f"durable/sync {r['durable_over_sync']:.2f} (file object {r['durable_over_sync_file']:.2f})"
            + (
                f"; bgsave write / disk bandwidth {r['bgsave_write_over_disk_bandwidth']:.2f}"
                f"; CRC32 {r['crc32_s_per_gb']:.2f} s/GB"
                if "crc32_s_per_gb" in r
                else ""
            )
        )
        missed = [name for name, ok in result["issue4_targets"].items() if ok is False]
        print(f"{'':>7} issue 4 targets missed: {', '.join(missed) or 'none'}")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, quick="smoke run: sizes 10,100 and 2 repeats, no settling")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers in the model (4; more = more modules)")
    parser.add_argument("--no-extras", action="store_true", help="skip the disk / serialization breakdown")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: benchmarks/results/save_<date>.json)"
    )
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    if args.layers < 1:
        parser.error("--layers must be >= 1")

    target, info = make_target(args.dir, "bench-save-", max(args.sizes))
    rss = PeakRSS()
    started = dt.datetime.now(dt.timezone.utc)
    per_size = []
    try:
        for size in args.sizes:
            per_size.append(bench_size(size, args.repeats, target, not args.no_extras, rss, args.layers, args.settle))
    finally:
        shutil.rmtree(target, ignore_errors=True)
    print_table(per_size)

    out = args.out
    if out is None:
        suffix = (f"_layers{args.layers}" if args.layers != 4 else "") + ("_quick" if args.quick else "")
        out = RESULTS_DIR / f"save_{started:%Y-%m-%d}{suffix}.json"
    body = {
        "settings": {
            "sizes_mb": args.sizes,
            "repeats": args.repeats,
            "layers": args.layers,
            "settle_s": args.settle,
            "extras": not args.no_extras,
        },
        "machine": info,
        "load_at_end": load(),
        "notes": NOTES,
        "results": per_size,
    }
    write_report(out, "save", started, body)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
