"""The SIGKILL crash harness: a child that saves until it is killed, and the parent loop that kills it.

Shared by ``tests/test_crash.py`` (a short run in CI) and ``scripts/crash_soak.py`` (hundreds of kills).

The child (:func:`child_main`, one process per kill) first *verifies* what the previous kill left,
then *resumes* the run and saves until it is killed:

1. Independently of the manager, from the listing: the epoch a resume must continue from (the newest
   committed epoch that has its ``trainer_{e}.pt``, or the newest if none has), plain ``torch.load``
   of its ``.pt``, its sidecar read with ``yaml.safe_load``, and its trainer state loaded. Every
   parameter of the agent saved at epoch ``e`` equals ``e``, its sidecar says ``epoch: e`` and
   ``agent_step: 100 * e``, and the trainer state is epoch ``e``'s: momentum buffers equal ``e``.
   Temp files the kill left are counted here, before a manager touches the run.
2. ``CheckpointManager(...).start_run(...)``: the library's resume, which must find the same epoch and
   hand back that epoch's trainer state.
3. One ``verified`` message to the parent, then a loop: fill every parameter and momentum buffer with
   the next epoch, ``save_agent`` + ``save_trainer_state`` (``max_pending=1``, ``keep_last=2``), one ``saved``
   message per epoch. The buffers are mutated right after each save returns, so a snapshot that is not
   a copy shows up as a checkpoint whose values disagree with its epoch. After the first epoch the
   child waits for its writes once and reports the temp files left: the kill's must be gone by then.

The parent (:func:`crash_loop`) waits for the first ``saved`` message, lets the child run for a random
delay drawn from a seeded RNG (the delay *is* the kill time, not a synchronisation), SIGKILLs it, and
starts the next child, which verifies the kill. Between kills it checks that the latest epoch never
goes backwards and that no more than the in-flight checkpoint is lost.

Children are forked from multiprocessing's fork server, which has imported torch, bgsave and s3fs but
never touched a run directory: each child is a fresh process (its own memory, nothing of the killed
one), without paying the 2-3 s torch import per kill. ``python tests/crash_child.py verify RUN_DIR``
runs the same verification in a brand-new interpreter and prints one JSON line; the harness ends with it.

The agent is an ``nn.Sequential`` of ``nn.Linear`` (torch's own classes): a class defined in a script's
``__main__`` could not be unpickled by the verifying process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import fsspec
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from torch import nn

import bgsave
from bgsave.storage.local import direct_writes_from

RUN_NAME = "crash"
LAYERS = 3
DIRECT_MIN_ENV = "BGSAVE_CRASH_DIRECT_MIN"  # set by the harness: the children's O_DIRECT threshold, bytes
WIDTH = 512  # 3 x (512 x 512 + 512) float32: 3.2 MB per agent, as much again for the momentum buffers
STEPS_PER_EPOCH = 100
# With max_pending=1 the worker holds at most two jobs (one written, one queued). Once save_agent(e)
# and save_trainer_state(e) have returned, agent(e - 1) is committed: a kill loses at most one epoch
# beyond what the parent saw reported.
MAX_PENDING = 1
MAX_LOST_EPOCHS = 1
# A save writes three files (.pt, .yaml, trainer_N.pt), one at a time: a kill leaves at most one
# temp file, and never more than these three names.
MAX_TEMPS_LEFT = 3
KEEP_EPOCHS = 2  # the children's retention (keep_last): long soaks stay within a few checkpoints on disk
CHILD_MAX_SECONDS = 120.0  # a child nobody kills stops by itself
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

_CHECKPOINT = re.compile(r"^model_(\d{4,})\.(pt|yaml)$")
_TRAINER = re.compile(r"^trainer_(\d{4,})\.pt$")


class CrashCheckError(AssertionError):
    """A checkpoint left by a kill is corrupt or does not match what was saved, or an invariant broke."""


# ---- the agent and what it holds at each epoch ------------------------------------------------
def make_agent(epoch: int = 0) -> nn.Sequential:
    """The test agent with every parameter equal to ``epoch``."""
    agent = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    with torch.no_grad():
        for p in agent.parameters():
            p.fill_(float(epoch))
    return agent


def set_epoch(agent: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Fill every parameter and momentum buffer with ``epoch``, in place."""
    with torch.no_grad():
        for p in agent.parameters():
            p.fill_(float(epoch))
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.full_like(p, float(epoch))
            else:
                state["momentum_buffer"].fill_(float(epoch))


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(LAYERS):
        shapes[f"{i}.weight"] = (WIDTH, WIDTH)
        shapes[f"{i}.bias"] = (WIDTH,)
    return shapes


def check_agent(agent: object, epoch: int, where: str) -> None:
    """Raise CrashCheckError unless ``agent`` is the test agent with every value equal to ``epoch``."""
    if not isinstance(agent, nn.Sequential):
        raise CrashCheckError(f"{where}: loaded a {type(agent).__name__}, not an nn.Sequential")
    state = agent.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != _expected_shapes():
        raise CrashCheckError(f"{where}: parameter shapes {shapes} are not the test agent's")
    wrong = {k: sorted({float(x) for x in v.unique()[:5]}) for k, v in state.items() if not bool(torch.all(v == epoch))}
    if wrong:
        raise CrashCheckError(f"{where}: saved as epoch {epoch} but holds other values: {wrong}")


# ---- verification (runs in the fresh process) -----------------------------------------------
def _listing(fs: Any, directory: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False, refresh=True)]
    except FileNotFoundError:
        return []


def _temps(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.startswith(".") and n.endswith(".bgsave-tmp"))


def _load(url: str) -> Any:
    with fsspec.open(url, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=False)


def verify(run_dir: str) -> dict[str, Any]:
    """Check the latest committed checkpoint of ``run_dir`` the way a user would; return what was found.

    Returns:
        ``epoch`` (-1 when nothing is committed), ``trainer_epoch`` (-1 when there is no trainer
        state), ``temps`` (temp files present), ``orphans`` (``.pt`` files newer than the latest
        without a sidecar) and, on S3, ``uploads`` (unfinished multipart uploads in the bucket).

    Raises:
        CrashCheckError: the checkpoint, its sidecar or the trainer state is not what was saved.
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    directory = f"{root}/checkpoints"
    names = _listing(fs, directory)
    parsed = [(int(m.group(1)), m.group(2)) for n in names if (m := _CHECKPOINT.match(n))]
    committed = {e for e, s in parsed if s == "yaml"} & {e for e, s in parsed if s == "pt"}
    trainers = {int(m.group(1)) for n in names if (m := _TRAINER.match(n))}
    latest = bgsave.find_latest_checkpoint(f"{run_dir}/checkpoints")
    if (latest is None) != (not committed) or (latest and not latest.endswith(f"/model_{max(committed):04d}.pt")):
        raise CrashCheckError(f"find_latest_checkpoint returned {latest!r}; committed epochs {sorted(committed)}")
    epoch = max(committed & trainers or committed, default=-1)  # what a resume must continue from
    if epoch >= 0:
        url = f"{run_dir}/checkpoints/model_{epoch:04d}.pt"
        try:
            agent = _load(url)
        except Exception as exc:
            raise CrashCheckError(f"{url}: torch.load failed: {type(exc).__name__}: {exc}") from exc
        check_agent(agent, epoch, url)
        sidecar_url = url[: -len(".pt")] + ".yaml"
        with fsspec.open(sidecar_url, "rb") as f:
            sidecar = yaml.safe_load(f.read())
        expected = {"epoch": epoch, "agent_step": STEPS_PER_EPOCH * epoch, "run": RUN_NAME}
        got = {k: sidecar.get(k) for k in expected} if isinstance(sidecar, dict) else sidecar
        if got != expected:
            raise CrashCheckError(f"{sidecar_url}: sidecar holds {got}, expected {expected}")
    trainer_epoch = -1
    if epoch in trainers:
        trainer_epoch = _check_trainer_state(f"{run_dir}/checkpoints/trainer_{epoch:04d}.pt", epoch)
    orphans = sorted(
        n for n in names if (m := _CHECKPOINT.match(n)) and m.group(2) == "pt" and int(m.group(1)) not in committed
    )
    found: dict[str, Any] = {"epoch": epoch, "trainer_epoch": trainer_epoch, "temps": _temps(names), "orphans": orphans}
    if not isinstance(fs, LocalFileSystem) and hasattr(fs, "list_multipart_uploads"):
        found["uploads"] = len(fs.list_multipart_uploads(root.split("/", 1)[0]))
    return found


def _check_trainer_state(url: str, agent_epoch: int) -> int:
    try:
        state = _load(url)
    except Exception as exc:
        raise CrashCheckError(f"{url}: torch.load failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not {"optimizer_state", "epoch", "agent_step"} <= set(state):
        raise CrashCheckError(f"{url}: not a trainer state: {type(state).__name__} {sorted(state)[:5]}")
    epoch = state["epoch"]
    if epoch != agent_epoch:  # trainer_{e}.pt holds epoch e's state, and only that
        raise CrashCheckError(f"{url}: trainer state of epoch {epoch!r}, in the file of epoch {agent_epoch}")
    if state["agent_step"] != STEPS_PER_EPOCH * epoch:
        raise CrashCheckError(f"{url}: epoch {epoch} with agent_step {state['agent_step']}")
    buffers = [s.get("momentum_buffer") for s in state["optimizer_state"]["state"].values()]
    if len(buffers) != 2 * LAYERS or not all(b is not None and bool(torch.all(b == epoch)) for b in buffers):
        raise CrashCheckError(f"{url}: the momentum buffers of epoch {epoch} hold other values")
    return agent_epoch


# ---- the child -----------------------------------------------------------------------------
def child_main(run_dir: str, conn: Connection, env: Mapping[str, str], max_seconds: float) -> None:
    """Verify the run, resume it and save epoch after epoch until killed, reporting on ``conn``."""
    os.environ.update(env)
    if DIRECT_MIN_ENV in env:  # the harness's own switch: this size and up go through O_DIRECT
        # Entered for the rest of this child's life (it is killed, never returns).
        direct_writes_from(int(env[DIRECT_MIN_ENV])).__enter__()
    logging.getLogger("bgsave").setLevel(logging.ERROR)  # the backpressure advice is expected here
    give_up_at = time.monotonic() + max_seconds
    try:
        started = time.perf_counter()
        found = verify(run_dir)
        found["late_commit"] = False
        manager = bgsave.CheckpointManager(run_dir, RUN_NAME, max_pending=MAX_PENDING, keep_last=KEEP_EPOCHS)
        with manager as mgr:
            start = mgr.start_run(lambda: make_agent(0))
            if start.epoch != found["epoch"] and start.resumed:
                # On S3 a request the killed child had fully sent (a CompleteMultipartUpload) can still
                # complete on the server after the kill: look again, and record it.
                found = {**verify(run_dir), "temps": found["temps"], "late_commit": True}
            if start.resumed != (found["epoch"] >= 0) or (start.resumed and start.epoch != found["epoch"]):
                raise CrashCheckError(
                    f"start_run resumed={start.resumed} at epoch {start.epoch}, but the latest is {found['epoch']}"
                )
            check_agent(start.agent, start.epoch, "start_run's agent")
            resumed_trainer = -1 if start.trainer_state is None else start.trainer_state["epoch"]
            if resumed_trainer != found["trainer_epoch"]:
                raise CrashCheckError(
                    f"start_run resumed epoch {start.epoch} with the trainer state of epoch {resumed_trainer}, "
                    f"but the run holds that of epoch {found['trainer_epoch']}"
                )
            found["verify_s"] = time.perf_counter() - started
            conn.send({"event": "verified", "start_epoch": start.epoch, **found})
            agent = start.agent
            optimizer = torch.optim.SGD(agent.parameters(), lr=0.1, momentum=0.9)
            if start.trainer_state is not None:
                set_epoch(agent, optimizer, 0)  # create the buffers the saved state is loaded into
                optimizer.load_state_dict(start.trainer_state["optimizer_state"])
            epoch = start.epoch + 1
            while time.monotonic() < give_up_at:
                set_epoch(agent, optimizer, epoch)
                mgr.save_agent(agent, epoch, {"agent_step": STEPS_PER_EPOCH * epoch})
                mgr.save_trainer_state(optimizer, epoch, STEPS_PER_EPOCH * epoch)
                message: dict[str, Any] = {"event": "saved", "epoch": epoch}
                if epoch == start.epoch + 1:
                    # Once this manager has written, the temp files the kill left must be gone
                    # (bgsave clears them when it opens the run or takes the writer lock).
                    mgr.wait()
                    fs, root = fsspec.core.url_to_fs(run_dir)
                    message["temps"] = _temps(_listing(fs, f"{root}/checkpoints"))
                conn.send(message)
                epoch += 1
        conn.send({"event": "done"})
    except CrashCheckError as exc:
        conn.send({"event": "corrupt", "message": str(exc)})
    except BaseException:
        conn.send({"event": "error", "message": traceback.format_exc()})
    finally:
        conn.close()


# ---- the parent ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KillRecord:
    """One kill and what the next fresh process found."""

    kill: int
    delay_s: float
    epoch_before: int  # latest committed epoch when the killed child started
    last_reported: int  # highest epoch the killed child reported saved (its start epoch if none)
    epoch_after: int  # latest committed epoch the next process verified
    lost: int  # last_reported - epoch_after, at least 0
    trainer_epoch: int
    temps_left: int  # temp files the kill left (removed when the next manager first wrote)
    orphans: int  # .pt files without a sidecar (killed between the .pt and its sidecar, or earlier)
    uploads: int | None  # S3: unfinished multipart uploads in the bucket after this kill
    late_commit: bool  # S3: a request sent before the kill completed after it (seen between two listings)
    verify_s: float


class _Child:
    """One forked child and its message pipe, read with deadlines."""

    def __init__(self, ctx: Any, run_dir: str, env: Mapping[str, str], max_seconds: float) -> None:
        self.conn, child_end = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=child_main, args=(run_dir, child_end, dict(env), max_seconds), name="bgsave-crash-child"
        )
        self.proc.start()
        child_end.close()
        self.saved: list[int] = []

    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message["event"] == "corrupt":
            raise CrashCheckError(message["message"])
        if message["event"] == "error":
            raise RuntimeError(f"crash child (pid {self.proc.pid}) failed:\n{message['message']}")
        if message["event"] == "done":
            raise RuntimeError(f"crash child (pid {self.proc.pid}) ran {CHILD_MAX_SECONDS}s without being killed")
        if message["event"] == "saved":
            self.saved.append(message["epoch"])
        return message

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        if not self.conn.poll(max(timeout, 0.0)):
            return None
        try:
            message: dict[str, Any] = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"crash child (pid {self.proc.pid}) exited with {self.proc.exitcode}") from None
        return self._handle(message)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """The next ``event`` message; raises on a failure message, an early exit or the deadline."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._receive(remaining)
            if message is not None and message["event"] == event:
                return message
        raise TimeoutError(f"crash child (pid {self.proc.pid}) sent no {event!r} message within {timeout}s")

    def run_until(self, when: float) -> None:
        """Keep reading the child's messages until ``when`` (time.monotonic)."""
        while (remaining := when - time.monotonic()) > 0:
            self._receive(remaining)

    def kill(self) -> None:
        """SIGKILL the child, reap it, and read what it sent before dying."""
        self.proc.kill()
        self.proc.join(30)
        if self.proc.exitcode != -signal.SIGKILL:
            raise RuntimeError(f"crash child (pid {self.proc.pid}) ended with {self.proc.exitcode}, not SIGKILL")
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(0):
                self._handle(self.conn.recv())

    def close(self) -> None:
        """Kill the child if it still runs and close the pipe."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)
        self.conn.close()


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # Takes effect if the fork server is not running yet; children only get slower otherwise. Only
    # installed modules: the fork server does not get the parent's sys.path on Python < 3.13. torch._dynamo
    # is what the first optimizer imports (seconds).
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "yaml", "fsspec", "bgsave", "s3fs"])
    return ctx


def crash_loop(
    run_dir: str,
    *,
    kills: int,
    seed: int,
    max_delay: float,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    stop_after: float | None = None,
    on_kill: Callable[[KillRecord], None] | None = None,
) -> list[KillRecord]:
    """SIGKILL a saving child ``kills`` times at random moments; check each kill in a fresh process.

    Args:
        run_dir: Local path or ``s3://`` URL of the run (created by the first child).
        kills: How many children to kill.
        seed: Seeds the kill delays (uniform in ``[0, max_delay]`` seconds after the first save).
        max_delay: The longest delay.
        env: Extra environment for the children (the S3 endpoint and credentials).
        timeout: Seconds a child may take to verify, resume and submit its first save.
        stop_after: Make no further kill after this many seconds (fewer than ``kills`` then).
        on_kill: Called with each record as soon as it is known (progress output).

    Raises:
        CrashCheckError: a verification failed, the latest went backwards, or more than the
            in-flight checkpoint was lost.
    """
    ctx = _context()
    stop_at = time.monotonic() + stop_after if stop_after is not None else math.inf
    rng = random.Random(seed)
    records: list[KillRecord] = []
    child = _Child(ctx, run_dir, env or {}, CHILD_MAX_SECONDS)
    try:
        verified = child.wait_for("verified", timeout)
        for kill in range(1, kills + 1):
            if time.monotonic() > stop_at:
                break
            epoch_before = verified["start_epoch"]
            first = child.wait_for("saved", timeout)
            if first.get("temps"):
                raise CrashCheckError(
                    f"kill {kill - 1} (seed {seed}): its temp files outlived the next manager's first write: "
                    f"{first['temps']}"
                )
            delay = rng.uniform(0.0, max_delay)
            child.run_until(time.monotonic() + delay)
            child.kill()
            last_reported = max([epoch_before, *child.saved])
            child.close()
            child = _Child(ctx, run_dir, env or {}, CHILD_MAX_SECONDS)
            try:
                verified = child.wait_for("verified", timeout)
            except CrashCheckError as exc:
                raise CrashCheckError(
                    f"after kill {kill} (seed {seed}, delay {delay:.4f}s, child had reported epochs "
                    f"{epoch_before}..{last_reported}): {exc}"
                ) from None
            record = KillRecord(
                kill=kill,
                delay_s=round(delay, 4),
                epoch_before=epoch_before,
                last_reported=last_reported,
                epoch_after=verified["epoch"],
                lost=max(0, last_reported - verified["epoch"]),
                trainer_epoch=verified["trainer_epoch"],
                temps_left=len(verified["temps"]),
                orphans=len(verified["orphans"]),
                uploads=verified.get("uploads"),
                late_commit=verified["late_commit"],
                verify_s=round(verified["verify_s"], 4),
            )
            _check_kill(record, verified, seed)
            records.append(record)
            if on_kill is not None:
                on_kill(record)
    finally:
        child.close()
    return records


def _check_kill(record: KillRecord, verified: Mapping[str, Any], seed: int) -> None:
    where = f"kill {record.kill} (seed {seed}, delay {record.delay_s}s)"
    if record.epoch_after < record.epoch_before:
        raise CrashCheckError(f"{where}: latest went back from epoch {record.epoch_before} to {record.epoch_after}")
    if record.lost > MAX_LOST_EPOCHS:
        raise CrashCheckError(
            f"{where}: the child reported epoch {record.last_reported} saved, but only epoch "
            f"{record.epoch_after} survived (more than the in-flight checkpoint lost)"
        )
    if record.epoch_after > record.last_reported + 1:
        raise CrashCheckError(f"{where}: epoch {record.epoch_after} committed, never submitted")
    if record.temps_left > MAX_TEMPS_LEFT:
        raise CrashCheckError(f"{where}: temp files accumulate: {verified['temps']}")
    if verified["late_commit"] and "uploads" not in verified:
        raise CrashCheckError(f"{where}: on local disk, a checkpoint was committed after its writer was killed")


def verify_in_fresh_interpreter(
    run_dir: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``python crash_child.py verify RUN_DIR`` (a new interpreter) and return its JSON report."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "verify", run_dir],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise CrashCheckError(f"fresh verification of {run_dir} failed ({result.returncode}):\n{result.stderr}")
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def summarize(records: list[KillRecord]) -> dict[str, Any]:
    """The figures of a crash run."""
    n = len(records)
    return {
        "kills": n,
        "corrupt_loads": 0,  # any corrupt load raises before a summary is made
        "max_epochs_lost_per_kill": max((r.lost for r in records), default=0),
        "kills_losing_an_epoch": sum(r.lost > 0 for r in records),
        "kills_interrupting_a_save": interrupted_saves(records),
        "kills_leaving_a_temp_file": sum(r.temps_left > 0 for r in records),
        "kills_leaving_an_orphan_pt": sum(r.orphans > 0 for r in records),
        "final_epoch": records[-1].epoch_after if records else -1,
        # trainer_{e}.pt holds epoch e's state and the resume takes it with epoch e's agent: both stay 0.
        "resumes_with_another_epochs_trainer_state": sum(r.trainer_epoch not in (-1, r.epoch_after) for r in records),
        "resumes_past_epoch_0_without_a_trainer_state": sum(
            r.trainer_epoch == -1 and r.epoch_after > 0 for r in records
        ),
        "kills_mid_upload": _mid_uploads(records),
        "late_commits": sum(r.late_commit for r in records),
        "unfinished_multipart_uploads": records[-1].uploads if records else None,
        "mean_verify_s": round(sum(r.verify_s for r in records) / n, 4) if n else 0.0,
    }


def interrupted_saves(records: list[KillRecord]) -> int:
    """How many kills visibly cut a save short (temp file, orphan ``.pt``, new unfinished upload, lost epoch)."""
    uploads = [0] + [r.uploads or 0 for r in records]
    return sum(
        bool(r.temps_left or r.orphans or r.lost or after > before)
        for r, (before, after) in zip(records, itertools.pairwise(uploads), strict=True)
    )


def _mid_uploads(records: list[KillRecord]) -> int | None:
    """S3: kills after which one more multipart upload was left unfinished (killed mid-upload)."""
    if not records or records[0].uploads is None:
        return None
    counts = [0] + [r.uploads or 0 for r in records]
    return sum(b > a for a, b in itertools.pairwise(counts))


def records_as_dicts(records: list[KillRecord]) -> list[dict[str, Any]]:
    """Records as plain dicts, for JSON."""
    return [asdict(r) for r in records]


# ---- a moto S3 server in its own process -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def moto_server(timeout: float = 30.0, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``python -m moto.server`` on 127.0.0.1 as a separate process (it outlives killed children); yields the URL.

    ``env``: variables set for the server's process only, on top of this one's.
    """
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=None if env is None else {**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = threading.Event()

    def drain() -> None:  # werkzeug logs every request to stderr: keep the pipe empty
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Running on" in line:
                ready.set()
        ready.set()  # EOF: the server died; the check below says so

    drainer = threading.Thread(target=drain, name="moto-stderr", daemon=True)
    drainer.start()
    try:
        if not ready.wait(timeout) or proc.poll() is not None:
            raise RuntimeError(f"moto server on port {port} did not start within {timeout}s ({proc.poll()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        drainer.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points s3fs at ``endpoint`` with dummy credentials."""
    return {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the server at ``endpoint``."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
    )
    fs.mkdir(bucket)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "verify":
        print("usage: python crash_child.py verify RUN_DIR", file=sys.stderr)
        return 2
    run_dir = argv[1]
    logging.getLogger("bgsave").setLevel(logging.ERROR)
    found = verify(run_dir)
    if found["epoch"] >= 0:  # and the library's own read path, as a reader that never writes
        with bgsave.CheckpointManager(run_dir, RUN_NAME) as mgr:
            check_agent(mgr.load_agent(found["epoch"]), found["epoch"], "load_agent")
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
