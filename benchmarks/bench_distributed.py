"""Distributed benchmark: what a bgsave save costs each rank of a DDP run, against rank 0 saving synchronously.

For each world size (``--world-sizes``, default 2 and 4) and agent size (``--sizes`` in MB, default 14
and 256: float32 ``BenchModel`` s), ranks are spawned on this machine (``torch.multiprocessing``, gloo on
127.0.0.1, one torch thread each) and train the agent with DDP (SGD on a fixed random batch). Every
rank builds the same ``CheckpointManager`` and calls ``save_at_interval(ddp, epoch, interval=1)``;
rank 0 alone writes, in the background. Medians over the saves, after a warm-up save:

``stall`` (every rank; wall time and, for the ranks that do not write, CPU time of the thread)
    Time inside the ``save_at_interval`` call: rank 0's is the snapshot (the CPU copy), the other
    ranks' the argument checks alone. *quiet* (``--stall-repeats`` saves): all ranks leave a barrier,
    save, then ``wait()``, the other ranks sitting in a collective meanwhile (no CPU). *training*: at a
    step boundary of the loop below, the other ranks going on to their next step at once (on a CPU box
    their forward pass competes with rank 0's copy for the cores; on GPUs it runs on the devices).
``alone``
    The same agent saved by a ``distributed="off"`` manager in rank 0's process while the other ranks
    wait in a barrier: one process's save. Alternated with the quiet saves, so both see the same load on
    a shared machine. Target: rank 0's quiet stall <= 1.2x this one.
``durable`` (rank 0)
    *wait*: from the call until ``wait()`` returns, in the quiet rounds; *record*: stall + queue wait +
    write of the ``SaveRecord`` of the saves made while training.
``lost`` (per save, ``--repeats`` rounds)
    A window of N training steps, the same N on every rank (sized for a save to become durable inside
    it), then ``wait()``: its wall time on rank 0 with a bgsave save at its start, or with rank 0 doing
    ``torch.save`` + ``fsync`` synchronously at its start (``sync``), less the same window without a
    save (``none``) in the same round. DDP keeps the ranks in step, so time rank 0 loses, every rank
    loses. Methods rotate each round; *noise* is the median distance of a save-free window from the
    median one: a lost time below it is not measurable here.

Targets: rank 0's quiet stall <= 1.2x one process's (``alone``); every other rank's stall <= 1 ms.

Usage::

    python benchmarks/bench_distributed.py                       # 2 and 4 ranks, 14 and 256 MB
    python benchmarks/bench_distributed.py --world-sizes 2 --sizes 1 --repeats 1 --stall-repeats 1 --settle 0

Prints a table and writes ``benchmarks/results/distributed_<date>.json`` (git SHA, machine, every sample).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.measure import BenchModel, model_bytes, parse_sizes, remove, torch_save_fsync
from harness.report import MB, RESULTS_DIR, load, make_target, write_report

from bgsave import CheckpointManager

METHODS = ("none", "bgsave", "sync")
BATCH = 8
STALL_TARGET = 1.2  # rank 0's quiet stall / the same save by a distributed="off" manager
OTHERS_S = 1e-3  # the stall of a rank that does not write


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_epoch(checkpoint_dir: str, epoch: int) -> None:
    remove(os.path.join(checkpoint_dir, f"*_{epoch:04d}.*"))


# ---- the ranks -----------------------------------------------------------------------------------
class Rank:
    """One rank's DDP model, its training step, and its samples (written to ``rank{rank}.json``)."""

    def __init__(self, rank: int, size_mb: int, settle: float) -> None:
        self.rank, self.settle = rank, settle
        torch.manual_seed(0)
        self.model = BenchModel(size_mb)
        self.ddp = DistributedDataParallel(self.model, gradient_as_bucket_view=True)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=1e-6)
        self.x = torch.randn(BATCH, self.model.config["width"])

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            self.ddp(self.x).square().mean().backward()
            self.optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    def settle_all(self) -> None:
        """Rank 0 waits ``settle`` after its deletes (the others in a barrier, taking no CPU)."""
        if self.rank == 0:
            time.sleep(self.settle)
        dist.barrier()


def timed_save(save: Callable[..., object], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of one save call on this thread."""
    start, cpu = time.perf_counter(), time.thread_time()
    save(*args, **kwargs)
    return time.perf_counter() - start, time.thread_time() - cpu


def quiet(
    me: Rank, mgr: CheckpointManager, alone: CheckpointManager | None, epochs: Iterator[int], repeats: int
) -> dict[str, list[float]]:
    """Saves with nothing else running, alternating with rank 0's ``distributed="off"`` manager (``alone``)."""
    out: dict[str, list[float]] = {
        k: [] for k in ("stall_s", "cpu_s", "durable_wait_s", "off_stall_s", "off_durable_s")
    }
    for round_ in range(repeats + 1):  # round 0 warms the snapshot buffers and the page cache up
        for kind in ("bgsave", "off") if round_ % 2 else ("off", "bgsave"):
            epoch = next(epochs)
            dist.barrier()
            start = time.perf_counter()
            if kind == "bgsave":
                stall, cpu = timed_save(mgr.save_at_interval, me.ddp, epoch, interval=1)
                mgr.wait()
                sample = {"stall_s": stall, "cpu_s": cpu, "durable_wait_s": time.perf_counter() - start}
            elif alone is not None:  # rank 0 alone; the others wait in the barrier below
                stall, _ = timed_save(alone.save_at_interval, me.model, epoch, interval=1)
                alone.wait()
                sample = {"off_stall_s": stall, "off_durable_s": time.perf_counter() - start}
            else:
                sample = {}
            if me.rank == 0:
                clean_epoch((mgr if kind == "bgsave" else alone).checkpoint_dir, epoch)  # type: ignore[union-attr]
            me.settle_all()
            if round_:
                for key, value in sample.items():
                    out[key].append(value)
    return out


def training(
    me: Rank, mgr: CheckpointManager, sync_dir: Path, epochs: Iterator[int], n: int, repeats: int
) -> list[dict[str, float]]:
    """Rounds of windows of ``n`` steps, each with a save at its start (or none); the methods rotate."""
    rounds = []
    for round_ in range(repeats + 1):
        shift = round_ % len(METHODS)
        sample: dict[str, float] = {}
        for method in METHODS[shift:] + METHODS[:shift]:
            epoch = next(epochs)
            me.steps(2)
            start = time.perf_counter()
            if method == "bgsave":
                sample["bgsave_stall_s"], sample["bgsave_cpu_s"] = timed_save(
                    mgr.save_at_interval, me.ddp, epoch, interval=1
                )
            elif method == "sync" and me.rank == 0:
                sample["sync_stall_s"], _ = timed_save(
                    torch_save_fsync, me.model, str(sync_dir / f"model_{epoch:04d}.pt")
                )
            me.steps(n)
            mgr.wait()
            sample[f"{method}_elapsed_s"] = time.perf_counter() - start
            if me.rank == 0:
                if method == "bgsave":
                    record = mgr.records[-1]
                    sample["bgsave_durable_record_s"] = record.stall_s + record.queue_wait_s + record.write_s
                clean_epoch(mgr.checkpoint_dir, epoch)
                remove(str(sync_dir / "*.pt"))
            me.settle_all()
        if round_:
            rounds.append(sample)
    return rounds


def rank_main(
    rank: int, world: int, port: int, size_mb: int, repeats: int, stall_repeats: int, target: str, settle: float
) -> None:
    """One rank: quiet saves, then lost-time rounds while training; its samples go to ``rank{rank}.json``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    me = Rank(rank, size_mb, settle)
    me.steps(3)  # DDP's first iterations build its buckets
    epochs = itertools.count(1)
    work = Path(target)
    sync_dir = work / "sync"
    with contextlib.ExitStack() as stack:
        mgr = stack.enter_context(CheckpointManager(work / "run", "bench", collective_timeout_s=600))
        alone = None
        if rank == 0:
            sync_dir.mkdir()
            alone = stack.enter_context(CheckpointManager(work / "alone", "bench", distributed="off"))
        out: dict[str, Any] = {"rank": rank, "quiet": quiet(me, mgr, alone, epochs, stall_repeats)}
        # The same number of steps on every rank (DDP's collectives), sized for a save to become durable.
        step_s = statistics.median(me.steps(5))
        box = [max(4, math.ceil(1.5 * median(out["quiet"]["durable_wait_s"]) / step_s) + 2)]
        dist.broadcast_object_list(box, src=0)
        out.update(window_steps=int(box[0]), step_s=step_s, agent_mb=model_bytes(me.model) / MB)
        out["rounds"] = training(me, mgr, sync_dir, epochs, int(box[0]), repeats)
    Path(target, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def distributed(world: int, size_mb: int, args: argparse.Namespace, target: Path) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks for one agent size; every rank's samples, in rank order."""
    work = target / f"ranks{world}_{size_mb}"
    work.mkdir()
    spawn_args = (world, free_port(), size_mb, args.repeats, args.stall_repeats, str(work), args.settle)
    mp.spawn(rank_main, args=spawn_args, nprocs=world, join=True)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(work, ignore_errors=True)
    return ranks


def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the saves: each rank's stall, rank 0's against one process's, durability, lost time."""
    zero = ranks[0]
    rounds = zero["rounds"]
    quiet = [r["quiet"] for r in ranks]
    training = [[s["bgsave_stall_s"] for s in r["rounds"]] for r in ranks]
    none = [s["none_elapsed_s"] for s in rounds]
    stall = {
        "rank0_quiet": median(quiet[0]["stall_s"]),
        "alone_quiet": median(quiet[0]["off_stall_s"]),  # distributed="off", same process, same moments
        "rank0_training": median(training[0]),
        "others_quiet_max": max(median(q["stall_s"]) for q in quiet[1:]),
        "others_training_max": max(median(t) for t in training[1:]),
        "others_cpu_max": max(median(q["cpu_s"]) for q in quiet[1:]),
        "per_rank_quiet": [median(q["stall_s"]) for q in quiet],
        "per_rank_training": [median(t) for t in training],
        "per_rank_cpu_quiet": [median(q["cpu_s"]) for q in quiet],
    }
    out: dict[str, Any] = {
        "agent_mb": zero["agent_mb"],
        "stall_s": stall,
        "ratio_rank0_over_alone_stall": stall["rank0_quiet"] / stall["alone_quiet"],
        "durable_s": {
            "rank0_wait": median(quiet[0]["durable_wait_s"]),
            "alone_wait": median(quiet[0]["off_durable_s"]),
            "rank0_record": median([s["bgsave_durable_record_s"] for s in rounds]),
        },
        "lost_per_save_s": {
            m: median([s[f"{m}_elapsed_s"] - s["none_elapsed_s"] for s in rounds]) for m in METHODS[1:]
        },
        # The noise floor: how far a save-free window strays from the median one (median absolute deviation).
        "window_noise_s": median([abs(e - median(none)) for e in none]),
        "sync_torch_save_s": median([s["sync_stall_s"] for s in rounds]),
        "window": {"steps": zero["window_steps"], "step_s": zero["step_s"]},
        "raw": ranks,
    }
    out["targets"] = {
        "rank0_stall_vs_alone": {"value": out["ratio_rank0_over_alone_stall"], "target": STALL_TARGET},
        "others_stall_s": {"value": max(stall["others_quiet_max"], stall["others_training_max"]), "target": OTHERS_S},
    }
    for check in out["targets"].values():
        check["met"] = check["value"] <= check["target"]
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    ms = 1e3
    print(
        f"\n{'ranks':>5} {'agent':>6} | {'stall: rank 0':>13} {'alone':>7} {'ratio':>5} {'training':>9} | "
        f"{'others: wall q/t':>16} {'CPU':>7} | {'durable: wait':>13} {'record':>7} | "
        f"{'lost/save: bgsave':>17} {'sync':>7} {'noise':>7} | {'step':>6}"
    )
    for key, r in results.items():
        world, size = key.split("x")
        s, d, lost = r["stall_s"], r["durable_s"], r["lost_per_save_s"]
        print(
            f"{world:>5} {size + ' MB':>6} | {s['rank0_quiet'] * ms:10.1f} ms {s['alone_quiet'] * ms:4.1f} ms"
            f" {r['ratio_rank0_over_alone_stall']:4.2f}x {s['rank0_training'] * ms:6.1f} ms"
            f" | {s['others_quiet_max'] * ms:7.2f} / {s['others_training_max'] * ms:4.2f} ms"
            f" {s['others_cpu_max'] * ms:4.2f} ms"
            f" | {d['rank0_wait']:11.3f} s {d['rank0_record']:5.3f} s"
            f" | {lost['bgsave']:15.3f} s {lost['sync']:5.3f} s {r['window_noise_s']:5.3f} s"
            f" | {r['window']['step_s']:4.2f} s"
        )
    for key, r in results.items():
        for name, check in r["targets"].items():
            verdict = "met" if check["met"] else "NOT met"
            print(f"target {key} {name}: {check['value']:.4g} <= {check['target']:g}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=parse_ints, default=[2, 4], help="ranks per run (2,4)")
    parser.add_argument("--sizes", type=parse_sizes, default=[14, 256], help="agent sizes in MB (14,256)")
    parser.add_argument("--repeats", type=int, default=5, help="lost-time rounds, after one warm-up (5)")
    parser.add_argument("--stall-repeats", type=int, default=15, help="quiet saves of each kind, after one (15)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait after deleting a checkpoint (1)")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (results/distributed_<date>.json)")
    args = parser.parse_args()
    if args.repeats < 1 or args.stall_repeats < 1:
        parser.error("--repeats and --stall-repeats must be >= 1")
    started = dt.datetime.now(dt.timezone.utc)
    target, info = make_target(args.dir, "bench-distributed-", 3 * max(args.sizes))
    results: dict[str, dict[str, Any]] = {}
    try:
        for size in args.sizes:
            for world in args.world_sizes:
                print(f"{world} ranks, {size} MB ...", flush=True)
                results[f"{world}x{size}"] = summarize(distributed(world, size, args, target))
    finally:
        shutil.rmtree(target, ignore_errors=True)
    print_table(results)
    out = args.out or RESULTS_DIR / f"distributed_{started:%Y-%m-%d}.json"
    settings = {k: getattr(args, k) for k in ("world_sizes", "sizes", "repeats", "stall_repeats", "settle")}
    body = {"machine": info, "load_at_end": load(), "settings": settings, "batch": BATCH, "results": results}
    write_report(out, "distributed", started, body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
