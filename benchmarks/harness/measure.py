"""Measuring a save: the model saved, CPU and memory, round-robin rounds with medians, the disk's own speed.

``BenchModel`` is the checkpoint every save scenario writes (float32 ``Linear`` layers of a given size).
``run_rounds`` runs a set of ``Method`` s once per round, round-robin, so all of them see the same
background load on a shared machine: compare ratios from one run, not absolute figures across runs.
``disk_writer`` is the disk's own write + fsync (``dd``-like), the bound any writer is held to.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import glob
import mmap
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

MB = 2**20


# ---- the model ------------------------------------------------------------------------------------
class BenchModel(nn.Module):
    """``layers`` square ``Linear`` layers holding about ``size_mb`` MiB of float32 parameters."""

    def __init__(self, size_mb: float, layers: int = 4) -> None:
        super().__init__()
        width = max(1, int((size_mb * MB / 4 / layers) ** 0.5))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.config = {"size_mb": size_mb, "layers": layers, "width": width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- measuring ------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``), where available."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def own_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def private_rss(processes: list[psutil.Process]) -> int:
    """Resident memory of ``processes`` less file-backed and shared pages (shared memory counts once, here)."""
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            info = process.memory_info()
            total += info.rss - info.shared
    return total


def current_rss() -> int:
    """This process's RSS plus its child processes' private memory (a helper such as DCP's checkpoint process)."""
    return own_rss() + private_rss(psutil.Process().children(recursive=True))


class PeakRSS:
    """Peak resident memory during a ``with`` block: this process's, plus its child processes' private memory.

    This process: the kernel's high-water mark (reset by writing 5 to ``/proc/self/clear_refs``, read from
    ``VmHWM``): exact and free. Where that is unavailable, a thread samples RSS every 2 ms. Child
    processes (only those alive when the block starts) are sampled by that thread every 2 ms; their
    shared pages are left out, as the parent's RSS already holds shared memory it touched.
    """

    def __init__(self) -> None:
        self._use_hwm = self._reset_hwm()
        self.peak = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return PeakRSS._read_hwm() is not None

    @staticmethod
    def _read_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @contextlib.contextmanager
    def measure(self, *, children_too: bool = False) -> Iterator[None]:
        # Child processes are sampled (psutil reads their smaps every 2 ms: CPU taken from the method
        # measured) only for a method that owns them; others would be slowed by another's helper.
        children = psutil.Process().children(recursive=True) if children_too else []
        peaks = {"own": own_rss(), "children": private_rss(children)}
        sample_own = not (self._use_hwm and self._reset_hwm())
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.002):
                if sample_own:
                    peaks["own"] = max(peaks["own"], own_rss())
                if children:
                    peaks["children"] = max(peaks["children"], private_rss(children))

        sampler = threading.Thread(target=sample, daemon=True) if sample_own or children else None
        if sampler is not None:
            sampler.start()
        try:
            yield
        finally:
            stop.set()
            if sampler is not None:
                sampler.join()
            hwm = 0 if sample_own else self._read_hwm() or 0
            peaks["own"] = max(peaks["own"], hwm, own_rss())
            peaks["children"] = max(peaks["children"], private_rss(children))
            self.peak = peaks["own"] + peaks["children"]


@dataclass
class Series:
    """Timings of one method at one size: a warm-up and the timed repeats."""

    first: float | None = None
    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    extra_rss: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"first_s": self.first, "samples_s": self.samples}
        if self.samples:
            out.update(median_s=statistics.median(self.samples), min_s=min(self.samples), max_s=max(self.samples))
        if self.cpu:
            out["cpu_s_median"] = statistics.median(self.cpu)
        if self.extra_rss:
            out["peak_extra_rss_bytes"] = max(self.extra_rss)
        return out

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(pattern: str) -> None:
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def torch_save_fsync(obj: Any, path: str) -> None:
    """``torch.save`` to a path, then ``fsync`` of the file: the synchronous baseline."""
    torch.save(obj, path)
    fsync_path(path)


def disk_writer(path: str, nbytes: int, chunk: int = 128 * 2**10, *, direct: bool = False) -> Callable[[], None]:
    """A function writing ``nbytes`` to ``path`` and fsyncing it: the disk's own fsync'd bandwidth (``dd``-like).

    Writes of ``chunk`` bytes from one buffer (no memory-sized copy). The default, 128 KiB, is the
    size bgsave's page-cache writes reach the kernel in: writes of 512 KiB or less were the fastest
    in every sweep on this project's VM, larger ones at times 2-4x slower (``bench_write_size.py``).
    ``direct``: ``O_DIRECT`` writes from a page-aligned buffer, past the page cache (``dd
    oflag=direct``), ``nbytes`` rounded up to whole 4 KiB blocks; buffered where it is refused.
    """
    if direct:
        nbytes = -(-nbytes // 4096) * 4096
        buffer = mmap.mmap(-1, chunk)  # page-aligned
        buffer[:] = os.urandom(chunk)
        data = memoryview(buffer)
    else:
        data = memoryview(bytearray(os.urandom(chunk)))

    def write() -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags | (getattr(os, "O_DIRECT", 0) if direct else 0), 0o644)
        except OSError:
            fd = os.open(path, flags, 0o644)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, data[: min(chunk, left)])
            os.fsync(fd)
        finally:
            os.close(fd)

    return write


@dataclass
class Method:
    """One way of saving (or copying) the model, timed once per round.

    ``call`` returns its timings by name (most return one; bgsave returns stall and time to durable);
    ``after`` runs untimed (deleting the file written).
    """

    name: str
    call: Callable[[], dict[str, float]]
    after: Callable[[], None] = lambda: None
    frees: bool = False  # after() frees a model-sized amount of memory (page cache or heap)
    retained: int = 0  # resident memory the method keeps between calls (measured over its warm-up)
    spawns: bool = False  # its child processes' memory is its own (DCP's checkpoint process)


def timed(name: str, fn: Callable[[], object]) -> Callable[[], dict[str, float]]:
    def call() -> dict[str, float]:
        start = time.perf_counter()
        fn()
        return {name: time.perf_counter() - start}

    return call


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` methods in which each follows every other equally often (Williams' Latin square).

    Rotating one order keeps each method's predecessor fixed (the one before it in the list), and
    whatever a method leaves behind (memory freed, files deleted, a server's state) then lands on the
    same method every round. Here each of the ``n * (n - 1)`` ordered pairs is adjacent once in ``n``
    rows (``n`` even) or twice in ``2n`` (odd: the rows and their reverses), and each method takes each
    place in a row equally often. Row ``i`` is the first row shifted by ``i``; the first row is
    ``0, 1, n-1, 2, n-2, ...``.

    Example:
        >>> balanced_orders(4)
        [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(m + shift) % n for m in first] for shift in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


def run_rounds(methods: list[Method], repeats: int, rss: PeakRSS, settle: float) -> dict[str, Series]:
    """Run every method once per round, round-robin: round 0 is the warm-up, then ``repeats`` rounds.

    Interleaving puts every method under the same background load of a shared machine, so the
    ratios between them hold even when the absolute figures drift from minute to minute. After a
    method frees memory (deletes its file, drops its clones) the run waits ``settle`` seconds: on a
    VM with free page reporting the guest hands freed memory back to the host after about 2 s, and
    memory taken back costs a host fault per page when touched again (writing 1 GiB into the page
    cache took 0.3 s right after a delete and 1.3 s three seconds later). Settling makes every write
    start from the same state, the one a training run saving every few seconds or less often sees.
    """
    series: dict[str, Series] = {}
    for round_ in range(repeats + 1):
        for method in methods:
            gc.collect()
            trim_heap()
            before = current_rss()
            cpu0 = cpu_seconds()
            with rss.measure(children_too=method.spawns):
                timings = method.call()
            cpu = cpu_seconds() - cpu0
            method.after()
            if method.frees and settle > 0:
                time.sleep(settle)
            if round_ == 0:
                gc.collect()
                trim_heap()
                method.retained = max(0, current_rss() - before)
                extra = max(0, rss.peak - before)
            else:
                # Memory the method kept from earlier calls (bgsave's snapshot buffers) counts as its own.
                extra = max(0, rss.peak - before) + method.retained
            for name, seconds in timings.items():
                if name.startswith("cpu:"):
                    continue
                entry = series.setdefault(name, Series())
                entry.extra_rss.append(extra)
                if round_ == 0:
                    entry.first = seconds
                else:
                    entry.samples.append(seconds)
                    entry.cpu.append(timings.get(f"cpu:{name}", cpu))
    return series


# ---- the options the save scenarios share ------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser, quick: str) -> None:
    """The options the save benchmarks share: --sizes, --repeats, --dir, --quick (helped by ``quick``), --settle."""
    parser.add_argument("--sizes", type=parse_sizes, default=[10, 100, 1000], help="model sizes in MB (10,100,1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method, after one warm-up (5)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where checkpoints are written (default: benchmarks/out)"
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds to wait after a method frees memory (3; 0 with --quick): see run_rounds",
    )


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply --quick (sizes up to 100 MB, at most 2 repeats, no settling) and check the shared options."""
    if args.quick:
        args.sizes, args.repeats = [s for s in args.sizes if s <= 100] or [10], min(args.repeats, 2)
    if args.settle is None:
        args.settle = 0.0 if args.quick else 3.0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers (MB), got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must be positive integers (MB), got {text!r}")
    return sizes
