"""Run a module-level function on N torch.distributed ranks (gloo on 127.0.0.1), each rank reporting JSON.

::

    results = dist_harness.run(scenario, workdir, nprocs=2)   # scenario(ctx: Rank, *args) on every rank
    results[1]["some_check"]                                 # what rank 1 reported

Every rank is a fresh ``spawn``ed interpreter (``sys.path`` is the parent's, so the test modules and
``_models`` import), with ``torch.set_num_threads(1)`` and a gloo default group whose timeout is 60 s:
a collective mismatch fails in a minute, not 30. A rank reports with :meth:`Rank.report` (written to
``{workdir}/rank{r}.json`` at once, atomically, so what a rank said before dying survives it).

Everything has a deadline: the parent waits on the processes' sentinels (no polling sleeps) until
``deadline_s``, then kills what is left and fails. A rank that raises, exits non-zero or dies of a
signal (a gloo abort is SIGABRT from a C++ thread) fails the call with its traceback, and the other
ranks are killed at once rather than left to time out in a collective. A rank meant to die
(:meth:`Rank.die`, for "a rank was killed" tests) is named in ``dies`` with its exit code; the
others must still exit 0.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, cast

__all__ = ("Rank", "RankFailedError", "digest", "files_under", "free_port", "reported", "run")

PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
# How much of a failed rank's report a failure shows (its last checks, with their tracebacks).
REPORT_TAIL = 6000


class RankFailedError(AssertionError):
    """A rank raised, exited with an unexpected code, died of a signal, or ran past the deadline."""


@dataclass
class Rank:
    """What the function run on every rank gets: its place, the shared work directory, its report."""

    rank: int
    world_size: int
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def result_file(self) -> Path:
        """``{workdir}/rank{r}.json``: this rank's report."""
        return self.workdir / f"rank{self.rank}.json"

    def report(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON) under ``key`` and write the report now (temp file + rename)."""
        self.results[key] = value
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.result_file)

    def die(self, code: int = 17) -> NoReturn:
        """End this process at once, as a killed rank would: no exit hooks, finalizers or collectives."""
        os._exit(code)


def digest(obj: Any) -> str:
    """A content hash of tensors, containers and plain values: equal digests, equal state."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    import torch  # the harness itself runs in processes that may not need it

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L")
        for item in obj:
            _feed(h, item)
    else:
        h.update(repr(obj).encode())


def files_under(root: Path) -> list[str]:
    """Every file under ``root`` (hidden ones too), relative, sorted; [] when it does not exist."""
    out = []
    for folder, _, names in os.walk(root):
        out += [Path(folder, name).relative_to(root).as_posix() for name in names]
    return sorted(out)


def reported(reports: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """What each rank reported under ``name``; fails the test with a rank's traceback if it raised."""
    import pytest  # here, not at the top: every spawned rank imports this module

    out = []
    for rank, report in enumerate(reports):
        value = report.get(name)
        if value is None:
            pytest.fail(f"rank {rank} reported nothing for {name}")
        if "error" in value:
            pytest.fail(f"rank {rank} failed in {name}:\n{value['error']}")
        out.append(value)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _entry(rank: int, world_size: int, port: int, workdir: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    """One rank: threads, process group, ``fn``; a traceback file if it raises (exit code 1).

    A rank that returns leaves by ``os._exit(0)`` once its group is destroyed: the interpreter's
    teardown after torch's compiler stack was imported (``DDP()`` does) costs 2-4 s and checks
    nothing here, as every manager is closed by then.
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ctx = Rank(rank, world_size, Path(workdir))
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
        fn(ctx, *args)
    except BaseException:
        text = traceback.format_exc()
        (ctx.workdir / f"rank{rank}.error").write_text(text)
        sys.stderr.write(text)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _describe(rank: int, code: int | None, workdir: Path) -> str:
    """Why ``rank`` failed: how it ended, its traceback, and the end of its report."""
    if code is None:
        how = "was still running at the deadline (killed)"
    elif code < 0:
        how = f"died of {signal.Signals(-code).name}"
    else:
        how = f"exited with code {code}"
    text = f"rank {rank} {how}"
    for name in (f"rank{rank}.error", f"rank{rank}.json"):
        file = workdir / name
        if file.exists():
            text += f"\n--- {name}:\n{file.read_text()[-REPORT_TAIL:]}"
    return text


def run(
    fn: Callable[..., None],
    workdir: Path,
    *,
    nprocs: int = 2,
    args: tuple[Any, ...] = (),
    deadline_s: float = 240.0,
    dies: Mapping[int, int] | None = None,
) -> list[dict[str, Any]]:
    """``fn(Rank, *args)`` on ``nprocs`` spawned ranks; every rank's report, in rank order.

    ``fn`` must be a module-level function (it is pickled by name), ``args`` picklable. ``dies``:
    rank -> the exit code it is meant to end with (:meth:`Rank.die`). A rank that did not report
    gives ``{}``.

    Raises:
        RankFailedError: any other rank did not exit 0 by the deadline (the rest are killed then).
    """
    dies = dict(dies or {})
    workdir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(
            target=_entry, args=(rank, nprocs, port, str(workdir), fn, args), name=f"rank{rank}", daemon=True
        )
        for rank in range(nprocs)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + deadline_s
    failures: list[str] = []
    try:
        running = {p.sentinel: (rank, p) for rank, p in enumerate(processes)}
        while running and not failures:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sentinel in multiprocessing.connection.wait(list(running), timeout=left):
                rank, process = running.pop(cast(int, sentinel))
                process.join()
                if process.exitcode != dies.get(rank, 0):
                    failures.append(_describe(rank, process.exitcode, workdir))
        for rank, _ in running.values():
            if not failures:  # past the deadline, with no failure to blame
                failures.append(_describe(rank, None, workdir))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    if failures:
        raise RankFailedError(f"{fn.__name__} on {nprocs} ranks: " + "\n".join(failures))
    reports: list[dict[str, Any]] = []
    for rank in range(nprocs):
        file = workdir / f"rank{rank}.json"
        reports.append(json.loads(file.read_text()) if file.exists() else {})
    return reports
