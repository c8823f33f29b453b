"""GPU benchmark: what saving a CUDA model costs the caller's thread, the caller's stream and training.

For each size (float32 ``BenchModel`` on ``cuda:0``), in one run, round-robin, medians of
``--repeats`` rounds after a warm-up round:

``d2h_pinned_limit``
    ``copy_(non_blocking=True)`` of every parameter into preallocated pinned host buffers, then a
    synchronize: the device-to-host copy time, the least a snapshot can hold the stream.
``d2h_fresh``
    ``.cpu()`` of every parameter (fresh pageable memory each time): what a naive snapshot costs.
each saver (``sync_torch_save``, ``bgsave``, ``dcp_thread``, ``lightning_async``, as in the suite)
    *stall*: how long the call blocks the caller's thread. *stream held*: from the call until the
    caller's CUDA stream may run its next kernel (timing events recorded on the caller's stream
    just before and just after the call; bgsave makes the stream wait for its copy, so for bgsave
    this is about the pinned copy time). *durable*: the call + waiting for the save.
``lost``
    Lost training time per save, as in ``bench_suite.py`` (``harness.training``): the model itself
    is trained on the GPU (SGD, a batch sized for ``--step-ms`` steps, a synchronize per step as a
    loss read-out would do); one save at a step boundary, training on until it is durable; lost =
    elapsed - steps x the median step time around it. ``no_save`` is the control.

Usage::

    python benchmarks/bench_gpu.py                 # 100 MB and 1 GB, 3 repeats
    python benchmarks/bench_gpu.py --sizes 1000,4000 --repeats 5
    python benchmarks/bench_gpu.py --device cpu --sizes 2 --repeats 1   # checks the script, no GPU

Prints a table and writes ``benchmarks/results/gpu_<date>.json`` with the machine and GPU, after
each size (``"complete": false`` until the last one is done). Without
a CUDA device it says so and exits 0 (CI has none), unless ``--device cpu`` asks for the dry run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness.measure import BenchModel, model_bytes, parse_sizes, timed
from harness.report import RESULTS_DIR, make_target, versions, write_report
from harness.savers import CONTROL, Saver, make_savers, parse_names
from harness.training import measure_lost, time_steps

DEFAULT_METHODS = ["sync_torch_save", "bgsave", "dcp_thread", "lightning_async"]


class DeviceLoop:
    """Trains the saved model itself on its device: SGD on a fixed random batch, about ``step_s`` a step.

    The interface ``harness.training.measure_lost`` drives (``activate``, ``retune``, ``step``, ``steps``,
    ``batch``). Each step ends with a synchronize, as reading the loss each step would.
    """

    MAX_BATCH = 16384

    def __init__(self, model: BenchModel, device: torch.device, step_s: float) -> None:
        self.model, self.device, self.step_s = model, device, step_s
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-7)
        self._set_batch(64)
        for _ in range(6):
            self.steps(2)
            if not self.retune(statistics.median(self.steps(5))):
                break

    def activate(self) -> None:
        """Nothing to set: the device does the training."""

    def retune(self, measured: float) -> bool:
        factor = self.step_s / measured
        if 0.8 <= factor <= 1.25 or (factor > 1 and self.batch >= self.MAX_BATCH):
            return False
        self._set_batch(min(self.MAX_BATCH, max(8, round(self.batch * min(8.0, max(0.125, factor))))))
        return True

    def _set_batch(self, batch: int) -> None:
        self.batch = batch
        self.x = torch.randn(batch, self.model.config["width"], device=self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        self.optimizer.step()
        self.synchronize()

    def steps(self, n: int) -> list[float]:
        return time_steps(self.step, n)


def held_and_stall(saver: Saver, epoch: int, device: torch.device) -> tuple[float, float]:
    """(stall, stream held) of one ``saver.start``; without CUDA the stream figure is the stall."""
    if device.type != "cuda":
        start = time.perf_counter()
        saver.start(epoch)
        stall = time.perf_counter() - start
        return stall, stall
    stream = torch.cuda.current_stream(device)
    before = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    after = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    before.record(stream)
    saver.start(epoch)
    stall = time.perf_counter() - start
    after.record(stream)
    after.synchronize()  # type: ignore[no-untyped-call]
    return stall, before.elapsed_time(after) / 1e3  # type: ignore[no-untyped-call]


def bench_size(size_mb: int, args: argparse.Namespace, target: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BenchModel(size_mb).to(device)
    nbytes = model_bytes(model)
    params = [p.detach() for p in model.parameters()]
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=device.type == "cuda") for p in params]
    work = target / f"size_{size_mb}mb"
    work.mkdir(parents=True)
    print(f"{size_mb} MB ({nbytes / 1e6:.0f} MB of parameters) on {device}", flush=True)

    def d2h_pinned() -> None:
        for buf, p in zip(pinned, params, strict=True):
            buf.copy_(p, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def d2h_fresh() -> None:
        for p in params:
            if device.type == "cuda":
                p.cpu()
            else:
                p.clone()

    counter = itertools.count(1)
    savers, skipped = make_savers(args.methods, model, work, counter)
    series: dict[str, list[float]] = {}
    try:
        for round_ in range(args.repeats + 1):
            samples = {}
            samples.update(timed("d2h_pinned_limit", d2h_pinned)())
            samples.update(timed("d2h_fresh", d2h_fresh)())
            shift = round_ % len(savers)
            for saver in savers[shift:] + savers[:shift]:
                start = time.perf_counter()
                stall, held = held_and_stall(saver, next(counter), device)
                saver.wait()
                samples[f"{saver.name}/durable"] = time.perf_counter() - start
                samples[f"{saver.name}/stall"], samples[f"{saver.name}/stream_held"] = stall, held
                saver.clean()
            if round_ > 0:  # round 0 warms up (bgsave allocates its pinned buffers there)
                for name, value in samples.items():
                    series.setdefault(name, []).append(value)
            print(f"  round {round_}: " + ", ".join(f"{k} {v:.4f}s" for k, v in samples.items()), flush=True)
        loop = DeviceLoop(model, device, args.step_ms / 1e3)
        print(f"  lost training time, batch {loop.batch}: ...", flush=True)
        lost = measure_lost(loop, savers, counter, args.repeats, args.window)
    finally:
        for saver in savers:
            saver.close()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in series.items()}
    lost_medians = {name: entry["median_s"] for name, entry in lost.items()}

    def ratio(a: str, b: str, table: dict[str, float] = medians) -> float | None:
        return table[a] / table[b] if a in table and b in table and table[b] > 0 else None

    return {
        "size_mb": size_mb,
        "model_bytes": nbytes,
        "median_s": medians,
        "samples_s": series,
        "lost": lost,
        "lost_median_s": lost_medians,
        "base_step_s": lost[CONTROL]["rounds"][-1]["base_step_s"],
        "skipped": skipped,
        "ratios": {
            "bgsave stall / d2h_pinned_limit": ratio("bgsave/stall", "d2h_pinned_limit"),
            "bgsave stream_held / d2h_pinned_limit": ratio("bgsave/stream_held", "d2h_pinned_limit"),
            "bgsave stall / sync stall": ratio("bgsave/stall", "sync_torch_save/stall"),
            "bgsave durable / sync durable": ratio("bgsave/durable", "sync_torch_save/durable"),
            "bgsave lost / sync lost": ratio("bgsave", "sync_torch_save", lost_medians),
        },
    }


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        m, lost = r["median_s"], r["lost_median_s"]
        print(
            f"\n{r['size_mb']} MB: pinned D2H {m['d2h_pinned_limit']:.4f} s, fresh .cpu() {m['d2h_fresh']:.4f} s, "
            f"step {r['base_step_s'] * 1e3:.1f} ms"
        )
        print(f"{'method':<18}{'stall':>10}{'stream held':>13}{'durable':>10}{'lost':>10}")
        for name in [n.split("/")[0] for n in m if n.endswith("/stall")]:
            row = [m[f"{name}/stall"], m[f"{name}/stream_held"], m[f"{name}/durable"], lost.get(name, float("nan"))]
            print(f"{name:<18}" + "".join(f"{v:>{w}.4f}" for v, w in zip(row, (10, 13, 10, 10), strict=True)))
        print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items() if v is not None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=parse_sizes, default=[100, 1000], help="model sizes in MB (100,1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (3)")
    parser.add_argument("--methods", type=parse_names, default=DEFAULT_METHODS, help="savers, as in bench_suite.py")
    parser.add_argument("--step-ms", type=float, default=30.0, help="training step time to calibrate for (30)")
    parser.add_argument("--window", type=int, default=10, help="baseline steps between lost-time rounds (10)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script without a GPU")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/gpu_<date>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    started = dt.datetime.now(dt.timezone.utc)
    target, info = make_target(args.dir, "bench-gpu-", max(args.sizes))
    info["gpu"] = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    out = args.out or RESULTS_DIR / f"gpu_{started:%Y-%m-%d}.json"
    settings = {k: getattr(args, k) for k in ("sizes", "repeats", "methods", "step_ms", "window", "device")}
    results: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            results.append(bench_size(size, args, target))
            # Written after each size: a run stopped by a time limit (a lent GPU's) keeps what it measured.
            body = {
                "complete": len(results) == len(args.sizes),
                "settings": settings,
                "machine": info,
                "versions": {**versions(), "cuda": torch.version.cuda},
                "results": results,
            }
            write_report(out, "gpu", started, body)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    print_table(results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
