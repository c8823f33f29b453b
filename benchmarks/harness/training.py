"""Lost training time per save: a real training loop keeps running while a save is written beside it.

For each method, a round triggers one save at a step boundary and keeps training, polling at each
step boundary whether the save is durable, then trains ``TAIL_STEPS`` more steps. With ``elapsed``
the wall time from the save call to the end of the last of those ``n`` steps::

    lost = elapsed - n x baseline_step

i.e. the stall, plus whatever the write in flight slowed the steps down (CPU, memory bandwidth, the
GIL), plus the clean-up a method does in ``wait()``. ``baseline_step`` is the median step of the
save-free windows just before and just after the round, so drift on a shared machine cancels. A
``no_save`` control goes through the same motions without saving: its spread is the noise floor.
The order of the methods rotates every round; round 0 is a warm-up.

:class:`TrainLoop` is the CPU loop (an MLP, Adam); ``bench_gpu.DeviceLoop`` trains on the GPU
through the same interface (``activate``, ``retune``, ``step``, ``steps``, ``batch``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional

from harness.savers import CONTROL, Saver

TAIL_STEPS = 3  # steps trained after a save is durable, inside the measured span
SAVE_LIMIT_S = 600.0  # a save not durable by then is waited for without training


class Loop(Protocol):
    """What :func:`measure_lost` drives: :class:`TrainLoop`, or ``bench_gpu.DeviceLoop``."""

    batch: int

    def activate(self) -> None: ...
    def retune(self, measured: float) -> bool: ...
    def step(self) -> None: ...
    def steps(self, n: int) -> list[float]: ...


class TrainLoop:
    """An MLP trained with Adam on a fixed random batch, sized so that a step takes about ``step_s``.

    Narrow layers and a large batch keep the step compute-bound (time about proportional to the
    batch, so the calibration converges) and keep both threads busy when T = 2: with wide layers and
    a batch of a few dozen, a 2-thread step swung between 60 and 400 ms on a loaded 2-core VM.
    """

    WIDTH = 512
    DEPTH = 4

    def __init__(self, threads: int, step_s: float) -> None:
        self.threads = threads
        self.activate()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(self.DEPTH):
            layers += [nn.Linear(self.WIDTH, self.WIDTH), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.step_s = step_s
        self._set_batch(256)
        for _ in range(4):  # Adam's update does not grow with the batch: iterate towards the target
            self.steps(2)
            self.retune(statistics.median(self.steps(7)))

    def activate(self) -> None:
        torch.set_num_threads(self.threads)

    def retune(self, measured: float) -> bool:
        """Resize the batch if steps of ``measured`` seconds are more than 25% off the target; True if it did.

        A shared machine's load can change the step time several-fold between phases (2-thread steps
        of 12 to 37 ms against a calibration for 80 ms, seen here under other tenants' load).
        """
        factor = self.step_s / measured
        if 0.8 <= factor <= 1.25:
            return False
        self._set_batch(max(8, round(self.batch * min(4.0, max(0.25, factor)))))
        return True

    def _set_batch(self, batch: int) -> None:
        self.batch = batch
        self.x = torch.randn(batch, self.WIDTH)
        self.y = torch.randn(batch, self.WIDTH)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        functional.mse_loss(self.net(self.x), self.y).backward()
        self.optimizer.step()

    def steps(self, n: int) -> list[float]:
        return time_steps(self.step, n)


def time_steps(step: Callable[[], None], n: int) -> list[float]:
    """Run ``n`` training steps; each one's time (shared with ``bench_gpu.DeviceLoop``)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def save_while_training(loop: Loop, saver: Saver, epoch: int) -> dict[str, float]:
    """One save at a step boundary, training on until it is durable, then ``TAIL_STEPS`` more steps."""
    start = time.perf_counter()
    saver.start(epoch)
    stall = time.perf_counter() - start
    steps = 0
    while not saver.done() and time.perf_counter() - start < SAVE_LIMIT_S:
        loop.step()
        steps += 1
    saver.wait()
    durable = time.perf_counter() - start
    loop.steps(TAIL_STEPS)
    return {
        "stall_s": stall,
        "durable_s": durable,  # at step granularity: polled between steps
        "steps": steps + TAIL_STEPS,
        "elapsed_s": time.perf_counter() - start,
    }


def measure_lost(
    loop: Loop, savers: list[Saver], counter: Iterator[int], repeats: int, window: int
) -> dict[str, dict[str, Any]]:
    """Round-robin rounds of one save per method during training; round 0 is a warm-up."""
    loop.activate()
    everyone = [Saver(CONTROL, lambda _: None), *savers]
    raw: dict[str, list[dict[str, float]]] = {s.name: [] for s in everyone}
    before = loop.steps(window)
    if loop.retune(statistics.median(before)):
        before = loop.steps(window)
    for round_ in range(repeats + 1):
        shift = round_ % len(everyone)
        samples = {}
        for saver in everyone[shift:] + everyone[:shift]:
            loop.steps(2)  # back in step after the previous method's clean-up
            samples[saver.name] = save_while_training(loop, saver, next(counter))
            saver.clean()
        after = loop.steps(window)
        base = statistics.median(before + after)
        if round_ > 0:
            for name, sample in samples.items():
                lost = sample["elapsed_s"] - sample["steps"] * base
                sample.update(round=round_, batch=loop.batch, base_step_s=base, lost_s=lost)
                raw[name].append(sample)
        # The next round's baseline starts from this window, or from a fresh one at a new batch size.
        before = loop.steps(window) if loop.retune(statistics.median(after)) else after
    out = {}
    for name, rounds in raw.items():
        lost = [r["lost_s"] for r in rounds]
        out[name] = {
            "median_s": statistics.median(lost),
            "min_s": min(lost),
            "max_s": max(lost),
            "samples_s": lost,
            "rounds": rounds,
        }
    return out
