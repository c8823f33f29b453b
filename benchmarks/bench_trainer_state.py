"""Trainer-state benchmark: what saving the optimizer (and RNG) with the agent costs the training loop.

An MLP of each size (default 16 and 64 MB of float32 weights) with Adam after one step (its state is
twice the weights), saved to a local run directory, medians of --repeats rounds in rotating order:

  agent          save_agent(model, e)                              the agent alone
  two_calls      save_agent(model, e) + save_trainer_state(opt, e)  the same bytes as before this
                                                                    release's one commit per epoch
  one_commit     save_at_interval(model, e, optimizer=opt, rng=True)  agent, trainer state, RNG: one
                                                                    epoch, one sidecar

  stall_s    how long the save call(s) blocked the caller (the CPU copy)
  durable_s  from the first call to every file of the epoch being durable (``wait()`` returning; no
             retention, whose pruning would run after the commit and be counted by ``wait()``)

The target (exact-resume issue): ``one_commit`` within ``two_calls``'s stall and time to durable,
as ratios measured in this run. Each round waits for the previous one to be durable first.

Usage:
    python benchmarks/bench_trainer_state.py [--sizes 16,64] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.measure import parse_sizes
from harness.report import MB, RESULTS_DIR, make_target, write_report

from bgsave import CheckpointManager

METHODS = ("agent", "two_calls", "one_commit")


def make_model(size_mb: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP of about ``size_mb`` MB and an Adam optimizer with its state created by one step."""
    width = 1024
    layers = max(1, round(size_mb * MB / (4 * width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(method: str, mgr: CheckpointManager, model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> None:
    """One epoch's save, the way ``method`` makes it."""
    if method == "one_commit":
        mgr.save_at_interval(model, epoch, interval=1, optimizer=opt, rng=True)
        return
    mgr.save_agent(model, epoch)
    if method == "two_calls":
        mgr.save_trainer_state(opt, epoch, epoch)


def measure(size_mb: int, repeats: int, target: Path) -> dict[str, Any]:
    model, optimizer = make_model(size_mb)
    rows: dict[str, dict[str, list[float]]] = {m: {"stall_s": [], "durable_s": []} for m in METHODS}
    # No retention: its pruning runs after the commit, beside the next write, and wait() would count it.
    # The previous epoch's files are removed between rounds instead, untimed.
    with CheckpointManager(target / f"run{size_mb}", "bench") as mgr:
        epoch = 0
        for round_ in range(repeats + 1):  # round 0 warms the buffer pool and the page cache up
            order = METHODS[round_ % 3 :] + METHODS[: round_ % 3]
            for method in order:
                epoch += 1
                start = time.perf_counter()
                save(method, mgr, model, optimizer, epoch)
                stalled = time.perf_counter() - start
                mgr.wait()
                durable = time.perf_counter() - start
                for old in Path(mgr.checkpoint_dir).glob(f"*_{epoch - 1:04d}.*"):
                    old.unlink()
                if round_:
                    rows[method]["stall_s"].append(stalled)
                    rows[method]["durable_s"].append(durable)
    out: dict[str, Any] = {m: {k: statistics.median(v) for k, v in row.items()} for m, row in rows.items()}
    out["trainer_state_mb"] = (
        sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()) / MB
    )
    out["ratios"] = {
        f"one_commit_vs_two_calls_{k}": out["one_commit"][k] / out["two_calls"][k] for k in ("stall_s", "durable_s")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[16, 64], help="model sizes in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    target, info = make_target(None, "bgsave-trainer-state-", 3 * max(args.sizes) * 2)
    results = {}
    try:
        for size in args.sizes:
            results[size] = measure(size, args.repeats, target)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    for size, row in results.items():
        print(
            f"{size:4d} MB: "
            + "  ".join(
                f"{m} stall {row[m]['stall_s'] * 1e3:.1f} ms durable {row[m]['durable_s']:.3f} s" for m in METHODS
            )
            + "  ratios "
            + "  ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
        )
    out = args.out or RESULTS_DIR / f"trainer_state_{started:%Y-%m-%d}.json"
    write_report(out, "trainer_state", started, {"machine": info, "repeats": args.repeats, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
