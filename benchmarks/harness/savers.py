"""The ways of saving the scenarios compare, each behind one small interface, ``Saver``.

Baselines: ``copy_limit`` (``copy_`` into existing buffers, the least a snapshot can cost),
``disk_fsync`` / ``disk_direct`` (the disk's own write + fsync, through the page cache or past it)
and ``sync_torch_save`` (``torch.save`` + fsync). bgsave: ``bgsave`` and ``bgsave_crc32``. Peers:
DCP's ``async_save`` in thread and process mode, Lightning's ``AsyncCheckpointIO``; what each takes
to make its checkpoint durable is in ``bench_suite.py``'s docstring. A method whose peer library is
missing, or that cannot run here, raises ``UnavailableError`` (or fails its first save) and is
skipped with a note. Used by ``bench_suite.py``, ``bench_gpu.py`` and ``bench_writer_cost.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from bgsave import CheckpointManager
from harness.measure import (
    disk_writer,
    fsync_path,
    model_bytes,
    own_rss,
    private_rss,
    remove,
    torch_save_fsync,
    trim_heap,
)


class UnavailableError(Exception):
    """A method's peer is missing or cannot run here: the method is skipped with this note."""


@dataclass
class Saver:
    """One way of saving the model.

    ``start(n)`` is the call the training loop blocks on (its stall); ``done()`` says without
    blocking whether the last save is durable; ``wait()`` blocks until it is. ``clean()`` deletes what
    was written (untimed); ``close()`` releases the method's resources.
    """

    name: str
    start: Callable[[int], object]
    done: Callable[[], bool] = lambda: True
    wait: Callable[[], object] = lambda: None
    clean: Callable[[], object] = lambda: None
    close: Callable[[], object] = lambda: None
    kept: int = 0  # memory the method holds between saves, from before the rounds (copy_limit's buffers)
    spawns: bool = False  # its child processes are its own (DCP's checkpoint process)
    frees: bool = True  # clean() frees model-sized memory (page cache, heap): run_rounds settles after it


# ---- the methods ------------------------------------------------------------------------------------
def copy_limit(model: nn.Module, work: Path) -> Saver:
    params = [p.detach() for p in model.parameters()]
    buffers = [torch.empty_like(p).zero_() for p in params]

    def start(_: int) -> None:
        for b, p in zip(buffers, params, strict=True):
            b.copy_(p)

    return Saver("copy_limit", start, close=buffers.clear, kept=model_bytes(model), frees=False)


def disk_fsync(model: nn.Module, work: Path) -> Saver:
    path = str(work / "raw.bin")
    write = disk_writer(path, model_bytes(model))
    return Saver("disk_fsync", lambda _: write(), clean=lambda: remove(path))


def disk_direct(model: nn.Module, work: Path) -> Saver:
    path = str(work / "raw_direct.bin")
    write = disk_writer(path, model_bytes(model), 64 * 2**20, direct=True)
    return Saver("disk_direct", lambda _: write(), clean=lambda: remove(path))


def sync_torch_save(model: nn.Module, work: Path) -> Saver:
    path = str(work / "sync.pt")
    return Saver("sync_torch_save", lambda _: torch_save_fsync(model, path), clean=lambda: remove(path))


def bgsave(model: nn.Module, work: Path, name: str = "bgsave", **options: Any) -> Saver:
    manager = CheckpointManager(str(work / name), "bench", **options)
    last = [-1]

    def start(epoch: int) -> None:
        last[0] = epoch
        manager.save_agent(model, epoch)

    def done() -> bool:
        # A save's record is added once it is committed (written, fsynced, renamed).
        records = manager.records
        return bool(records) and records[-1].epoch == last[0]

    return Saver(
        name,
        start,
        done,
        manager.wait,
        clean=lambda: remove(os.path.join(manager.checkpoint_dir, "model_*")),
        close=manager.close,
    )


def bgsave_crc32(model: nn.Module, work: Path) -> Saver:
    """bgsave with ``crc32=True``: the ``.pt`` carries torch's per-record CRC32s, as a plain ``torch.save``."""
    return bgsave(model, work, "bgsave_crc32", crc32=True)


def default_max_pending() -> int:
    return int(inspect.signature(CheckpointManager).parameters["max_pending"].default)


def dcp_saver(kind: str) -> Callable[[nn.Module, Path], Saver]:
    def make(model: nn.Module, work: Path) -> Saver:
        try:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        except ImportError as exc:
            raise UnavailableError(f"torch.distributed.checkpoint cannot be imported: {exc}") from None
        # DCP warns on every single-process save, even when told so (no_dist=True).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        process = kind == "process"
        if process:
            one_rank_process_group()
        futures: list[Any] = []

        def start(n: int) -> None:
            futures.append(
                dcp.async_save(
                    model.state_dict(),
                    checkpoint_id=str(work / f"dcp_{kind}_{n}"),
                    async_checkpointer_type=AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD,
                    no_dist=not process,
                )
            )

        def clean() -> None:
            futures.clear()
            for path in work.glob(f"dcp_{kind}_*"):
                shutil.rmtree(path, ignore_errors=True)

        def done() -> bool:
            return bool(futures[-1].done())

        def wait() -> None:
            futures[-1].result()

        return Saver(f"dcp_{kind}", start, done, wait, clean, spawns=process)

    return make


def one_rank_process_group() -> None:
    """A 1-rank gloo group on loopback: DCP's process mode asks the default group for rank and world size."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UnavailableError("torch.distributed is not available in this build of torch")
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DCP's checkpoint process reads MASTER_ADDR too (for its own store), else it resolves the host name.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)


def lightning_async(model: nn.Module, work: Path) -> Saver:
    try:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
    except ImportError as exc:
        raise UnavailableError(f"lightning is not installed ({exc}): pip install -e '.[bench]'") from None
    finished: list[str] = []

    class FsyncCheckpointIO(TorchCheckpointIO):  # type: ignore[misc]
        """Lightning's save, then an fsync of the file, which Lightning does not do."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            fsync_path(str(path))
            finished.append(str(path))

    io = AsyncCheckpointIO(FsyncCheckpointIO())
    started: list[str] = []

    def start(n: int) -> None:
        started.append(str(work / f"lightning_{n}.ckpt"))
        io.save_checkpoint({"state_dict": model.state_dict()}, started[-1])

    def clean() -> None:
        started.clear()
        finished.clear()
        remove(str(work / "lightning_*.ckpt"))

    return Saver(
        "lightning_async",
        start,
        lambda: bool(finished) and finished[-1] == started[-1],
        io.teardown,
        clean,
        close=io.teardown,
    )


FACTORIES: dict[str, Callable[[nn.Module, Path], Saver]] = {
    "copy_limit": copy_limit,
    "disk_fsync": disk_fsync,
    "disk_direct": disk_direct,
    "sync_torch_save": sync_torch_save,
    "bgsave": bgsave,
    "bgsave_crc32": bgsave_crc32,
    "dcp_thread": dcp_saver("thread"),
    "dcp_process": dcp_saver("process"),
    "lightning_async": lightning_async,
}
METHODS = tuple(FACTORIES)
CONTROL = "no_save"  # the lost-time control: the same motions as a save, without one


def parse_names(text: str) -> list[str]:
    """``--methods``: a comma list of method names, returned in :data:`METHODS`' order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--methods takes a comma list of {', '.join(METHODS)}; got {text!r}")
    return [n for n in METHODS if n in names]  # the suite's order, whatever the command line's


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at ``path``: processes spawned meanwhile (DCP's) keep logging there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def make_savers(
    names: list[str], model: nn.Module, work: Path, counter: Iterator[int]
) -> tuple[list[Saver], dict[str, str]]:
    """The methods that can run here, each tried with one untimed save; the others with the reason.

    A save of a tiny model goes first, so that imports and first-use costs are not counted. The
    memory a method keeps from its first real save on (bgsave's snapshot buffers) is added to its
    ``kept``, and for DCP's process mode the private memory of its checkpoint process.
    """
    savers: list[Saver] = []
    skipped: dict[str, str] = {}
    for name in names:
        saver = None
        try:
            # Logs of processes spawned now (DCP's checkpoint process) go to a file, not the table.
            with stderr_to(work.parent / f"{name}.log"):
                first_use(FACTORIES[name], work / "first_use")
                saver = FACTORIES[name](model, work)
                before = settled_rss()
                saver.start(next(counter))
                saver.wait()
            saver.clean()
            saver.kept += max(0, settled_rss() - before)
            if saver.spawns:  # its helper process is all its own, also where an earlier size spawned it
                saver.kept += private_rss(psutil.Process().children(recursive=True))
        except Exception as exc:
            note = str(exc) if isinstance(exc, UnavailableError) else f"failed here: {type(exc).__name__}: {exc}"
            skipped[name] = note
            print(f"  skipping {name}: {note}", flush=True)
            if saver is not None:
                with contextlib.suppress(Exception):
                    saver.clean()
                    saver.close()
            continue
        savers.append(saver)
    return savers, skipped


def first_use(factory: Callable[[nn.Module, Path], Saver], work: Path) -> None:
    """One save of a tiny model: lazy imports and first-use costs stay out of the method's figures."""
    work.mkdir(exist_ok=True)
    saver = factory(nn.Linear(4, 4), work)
    try:
        saver.start(0)
        saver.wait()
        saver.clean()
    finally:
        saver.close()


def settled_rss() -> int:
    """This process's RSS after a garbage collection and a heap trim."""
    gc.collect()
    trim_heap()
    return own_rss()
