"""Measure checkpoint save latency on a target (local disk, NFS, s3://...), to choose where runs live.

All saves go to a fresh scratch run, RUN_DIR_URL/.bgsave-bench-<random>/, deleted afterwards (also on
an error or Ctrl-C): your checkpoints and your run's writer lock are never touched. For each size a
float32 model of a few big Linear layers (random weights, which no compressing filesystem can shrink)
is saved by three methods, interleaved so that they all see the same load:

  sync    torch.save in the calling thread through bgsave's own atomic, durable write (temp file +
          fsync + rename on disk, one upload committed at the end on object stores), without the
          sidecar, lock or CPU copy: the least a safe synchronous save costs. Stall = durable.
  bgsave  CheckpointManager.save_agent, then wait(). stall: how long save_agent blocks (the CPU
          copy); durable: until the .pt and its sidecar are committed. "first stall" is the first
          save of a run, which also takes the writer lock and allocates the snapshot buffers.
  burst   max_pending + 2 saves back to back, as a loop that saves faster than storage writes: the
          last one waits for a free slot. stall: the longest; durable: until all are committed.

Times are medians of --repeats rounds after one warm-up round; MB/s = bytes / durable; MB = 10^6
bytes. Memory: about max_pending + 3 copies of the largest model (larger sizes are refused).
Progress is drawn on stderr when it is a terminal (rich's bar, or one plain line without rich), and
not at all otherwise. Ctrl-C removes the scratch run and exits 130.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bgsave import layout
from bgsave.errors import InvalidArgumentError, check_int
from bgsave.manager import CheckpointManager
from bgsave.storage import Storage, open_storage

__all__ = ("Report", "Result", "progress", "run", "steps", "table")

logger = logging.getLogger(__name__)

MB = 1_000_000
SCRATCH_PREFIX = ".bgsave-bench-"
_LAYERS = 4


@dataclass(frozen=True, slots=True)
class Result:
    """One method at one size (see the module docstring); times in seconds, None where not measured."""

    size_mb: int
    method: str  # "sync", "bgsave" or "burst"
    saves: int  # how many timed saves the numbers come from
    bytes: int  # written by one save (bgsave: the .pt and its sidecar)
    first_stall_s: float | None
    stall_s: float
    durable_s: float
    mb_per_s: float


@dataclass(frozen=True, slots=True)
class Report:
    """A whole benchmark: where it ran, how, and one :class:`Result` per size and method."""

    target: str
    repeats: int
    max_pending: int
    results: tuple[Result, ...]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready dicts."""
        return asdict(self)


def steps(sizes: Sequence[int], repeats: int, max_pending: int) -> int:
    """How many times :func:`run` calls ``on_step``: once per save."""
    return len(sizes) * (2 * (repeats + 1) + max_pending + 2)


def run(
    url: str,
    *,
    sizes: Sequence[int] = (10, 100),
    repeats: int = 3,
    max_pending: int = 1,
    storage_options: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Report:
    """Benchmark saves in a scratch run under ``url``, then delete the scratch run.

    Args:
        url: Where runs live or would live: an existing local directory, or a URL.
        sizes: Model sizes in MB.
        repeats: Timed rounds per size, after one warm-up round.
        max_pending: The manager's ``max_pending``; a burst is ``max_pending + 2`` saves.
        storage_options: Passed to fsspec.
        on_step: Called after each save with what was just done (for a progress bar).

    Example:
        >>> run("/mnt/nfs/runs", sizes=(10,), repeats=1).results[1].stall_s  # doctest: +SKIP
        0.0027

    Raises:
        InvalidArgumentError: bad arguments, a missing local directory, or sizes that do not fit in memory.
        OSError: a storage error (CheckpointWriteError, for a bgsave save that failed).
    """
    if not sizes:
        raise InvalidArgumentError("sizes must name at least one size (MB)")
    for size in sizes:
        check_int("sizes", size, 1)
    check_int("repeats", repeats, 1)
    check_int("max_pending", max_pending, 0)
    root = open_storage(url, storage_options)
    # Also the first contact: an unreachable target fails here, before anything is created.
    if root.is_file(root.root) or (root.has_directories and not root.exists(root.root)):
        raise InvalidArgumentError(f"RUN_DIR_URL {url} is not an existing directory")
    copies = max_pending + 3  # the model, max_pending + 1 snapshot buffers, one serialized copy
    available = _available_memory()
    if available is not None and max(sizes) * MB * copies > available:
        raise InvalidArgumentError(
            f"--sizes: {max(sizes)} MB needs about {max(sizes) * copies} MB of memory ({copies} copies "
            f"with --max-pending {max_pending}), but only {available // MB} MB is available"
        )
    scratch = root.join(f"{SCRATCH_PREFIX}{secrets.token_hex(4)}")
    step = on_step or (lambda _: None)
    try:
        root.makedirs(scratch)
        results = [
            result
            for size in sizes
            for result in _bench_size(
                root, scratch, size, repeats=repeats, max_pending=max_pending, options=storage_options, step=step
            )
        ]
    finally:
        _remove_tree(root, scratch)
    return Report(root.display(root.root), repeats, max_pending, tuple(results))


def _bench_size(
    root: Storage,
    scratch: str,
    size_mb: int,
    *,
    repeats: int,
    max_pending: int,
    options: dict[str, Any] | None,
    step: Callable[[str], None],
) -> list[Result]:
    """The three methods at one size; bgsave in a run of its own, so its first save allocates afresh."""
    width = max(1, round(math.sqrt(size_mb * MB / 4 / _LAYERS)))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(_LAYERS)))
    run_dir = Storage.join_dir(scratch, f"{size_mb}mb")
    checkpoints = Storage.join_dir(run_dir, layout.CHECKPOINTS)
    plain = Storage.join_dir(scratch, f"sync_{size_mb}mb.pt")
    sync: list[float] = []
    stalls: list[float] = []
    durables: list[float] = []

    def remove(epochs: range) -> None:  # outside the timing, so that the target never fills up
        for epoch in epochs:
            for suffix in (layout.YAML, layout.PT):
                root.delete(Storage.join_dir(checkpoints, layout.checkpoint_name(epoch, suffix)))

    with CheckpointManager(
        root.display(run_dir), "bgsave-bench", max_pending=max_pending, storage_options=options
    ) as m:
        for epoch in range(repeats + 1):  # round 0 is the warm-up: it gives the "first" numbers
            start = time.perf_counter()
            nbytes = root.write_atomic(plain, lambda f: torch.save(model, f))
            sync.append(time.perf_counter() - start)
            root.delete(plain)
            step(f"{size_mb} MB sync {epoch}/{repeats}")
            start = time.perf_counter()
            m.save_agent(model, epoch, {"agent_step": epoch})
            stalls.append(time.perf_counter() - start)
            m.wait()
            durables.append(time.perf_counter() - start)
            remove(range(epoch, epoch + 1))
            step(f"{size_mb} MB bgsave {epoch}/{repeats}")
        burst = range(repeats + 1, repeats + 3 + max_pending)
        burst_stalls: list[float] = []
        worker_log = logging.getLogger("bgsave.worker")
        level = worker_log.level
        worker_log.setLevel(logging.ERROR)  # its "consider checkpointing less often" is what a burst is about
        try:
            start = time.perf_counter()
            for epoch in burst:
                before = time.perf_counter()
                m.save_agent(model, epoch, {"agent_step": epoch})
                burst_stalls.append(time.perf_counter() - before)
                step(f"{size_mb} MB burst {epoch - repeats}/{len(burst)}")
            m.wait()
            burst_s = time.perf_counter() - start
        finally:
            worker_log.setLevel(level)
        remove(burst)
        bg_bytes = m.records[-1].bytes
    sync_s, stall_s, durable_s = (statistics.median(values[1:]) for values in (sync, stalls, durables))
    n = len(burst)
    return [
        Result(size_mb, "sync", repeats, nbytes, sync[0], sync_s, sync_s, nbytes / MB / sync_s),
        Result(size_mb, "bgsave", repeats, bg_bytes, stalls[0], stall_s, durable_s, bg_bytes / MB / durable_s),
        Result(size_mb, "burst", n, bg_bytes, None, max(burst_stalls), burst_s, n * bg_bytes / MB / burst_s),
    ]


def _available_memory() -> int | None:
    with suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _remove_tree(root: Storage, path: str) -> None:
    """Delete the scratch run; a failure is logged with the path, never raised over the real outcome."""
    try:
        root.remove_tree(path)
    except Exception as exc:
        logger.warning("could not remove the benchmark's scratch directory %s: %s", root.display(path), exc)


# ---- presenting ---------------------------------------------------------------------------------
@contextmanager
def progress(total: int) -> Iterator[Callable[[str], None]]:
    """A step callback that draws progress on stderr: rich's bar, else one rewritten line; nothing off a TTY."""
    if not sys.stderr.isatty():
        yield lambda _: None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        done = 0

        def line(text: str) -> None:
            nonlocal done
            done += 1
            print(f"\rbgsave bench: {done}/{total} saves ({text})\033[K", end="", file=sys.stderr, flush=True)

        try:
            yield line
        finally:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bgsave bench", total=total)
        yield lambda text: bar.update(task, advance=1, description=f"bgsave bench: {text}")


def table(report: Report) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows and notes of the report's table."""
    headers = ["size", "method", "saves", "first stall", "stall", "durable", "MB/s"]
    rows = [
        [
            f"{r.size_mb} MB",
            r.method,
            str(r.saves),
            "-" if r.first_stall_s is None else _seconds(r.first_stall_s),
            _seconds(r.stall_s),
            _seconds(r.durable_s),
            f"{r.mb_per_s:.0f}" if r.mb_per_s >= 100 else f"{r.mb_per_s:.3g}",
        ]
        for r in report.results
    ]
    notes = [
        "sync: torch.save, atomic and durable, in the calling thread (blocked throughout)",
        "bgsave: stall = save_agent blocked (CPU copy); durable = .pt and sidecar committed (save_agent + wait)",
        "first stall: the first save of a run, which also takes the writer lock and allocates buffers",
        f"burst: {report.max_pending + 2} saves back to back (--max-pending {report.max_pending}): "
        "the longest stall; durable = all committed",
        f"medians of {report.repeats} after a warm-up; MB = 10^6 bytes; compare rows of one run, not across runs",
    ]
    return headers, rows, notes


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
