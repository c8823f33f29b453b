"""The exact-resume harness: ``kill -9`` the RL example at random moments, re-run it, compare the final weights.

Shared by ``tests/test_exact_resume.py`` (a short run in CI) and ``scripts/resume_soak.py`` (hundreds of kills).

Every job is the user's own command, ``python examples/train_rl.py --run-dir RUN ... --print-digest``, in a new
process. The loop (:func:`kill_loop`):

1. starts a job and reads its output until the line that says how it started: ``new run in ...`` or
   ``resumed from epoch N (agent_step S, optimizer and RNG state of epoch N restored)``;
2. checks that line against what the previous kill left, listed from outside the job: the job resumes
   the newest epoch whose sidecar (written last, the commit) is there, with that epoch's own trainer
   state; with nothing committed it starts a new run;
3. lets the job run for a delay drawn from ``random.Random(seed)`` (``proc.wait(timeout=delay)``: the
   delay *is* the kill time, nothing waits on it to synchronise), SIGKILLs it and lists what is left.
   Every other delay runs from the start line, up to ``max_delay`` (anywhere in the epochs); the others
   from the job's 1st to 3rd ``epoch N`` line, printed just after epoch N's save was submitted, up to 40 ms (the
   time its background write takes), so that many kills cut a save short;
4. after ``kills`` kills, lets the last job finish and compares the sha256 of its final weights with the
   uninterrupted run's.

So a kill lands while the job trains an epoch, while it writes a checkpoint in the background, between
the two, or after the last epoch (the next job then only resumes the finished run). A job that finishes
before its kill ends a *round*: its digest is compared and the next job starts a new run directory, until
``kills`` kills are made.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/train_rl.py"
SEED_ENV = "BGSAVE_RESUME_SEED"

START = re.compile(r"^(?:new run in (?P<new>\S+): |resumed from epoch (?P<epoch>\d+) \(agent_step \d+, (?P<how>.*)\)$)")
RESTORED = re.compile(r"^(?P<what>optimizer and RNG|RNG) state of epoch (?P<epoch>\d+) restored$")
EPOCH = re.compile(r"^epoch +(\d+) ")
DIGEST = re.compile(r"^digest sha256:([0-9a-f]{64})$")
SIDECAR = re.compile(r"^model_(\d{4,})\.yaml$")
EPOCH_FILE = re.compile(r"^(?:model|trainer)_(\d{4,})\.(?:pt|yaml)$")
TEMP_MARKER = ".bgsave-tmp"


class ResumeCheckError(AssertionError):
    """A job resumed the wrong epoch or without its trainer state, or its final weights differ."""


def seed_from_env() -> int:
    """``$BGSAVE_RESUME_SEED``, or a fresh random seed."""
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))


@dataclass(frozen=True)
class Command:
    """The example's options; every job of a loop, and the uninterrupted run, use the same ones."""

    epochs: int
    save_every: int = 1
    keep_last: int = 0  # 0: keep every checkpoint

    def args(self, run_dir: str) -> list[str]:
        """The command line after ``python``: one job that trains to the end (no simulated preemption)."""
        return [
            EXAMPLE,
            *("--run-dir", run_dir, "--epochs", str(self.epochs), "--save-every", str(self.save_every)),
            *("--keep-last", str(self.keep_last), "--stop-after", "0", "--print-digest"),
        ]

    def shell(self, run_dir: str) -> str:
        """The command line as a user types it."""
        return " ".join(["python", *self.args(run_dir)])


def _job_env(env: Mapping[str, str] | None) -> dict[str, str]:
    # Unbuffered: the start and epoch lines reach the harness when printed, not when a buffer fills.
    return {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}


class Job:
    """One run of the example in a new process; its stdout read line by line on a thread, with deadlines."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None, stderr: Path) -> None:
        self.args = args
        self.stderr = stderr
        with open(stderr, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=_job_env(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: list[str] = []
        self._eof = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"job-{self.proc.pid}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The next line matching ``pattern``; None if the job's output ends first, TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise TimeoutError(f"job {self.proc.pid} printed no {pattern.pattern!r} within {timeout}s") from None
            if line is None:
                self._eof = True
                break
            self.lines.append(line)
            if (m := pattern.match(line)) is not None:
                return m
        return None

    def wait_for_start(self, timeout: float) -> re.Match[str]:
        """The job's start line (new run or resumed); raises if it exits or stays silent for ``timeout``."""
        start = self.wait_for(START, timeout)
        if start is None:
            self.proc.wait(30)
            raise RuntimeError(
                f"job {self.proc.pid} exited with {self.proc.returncode} before its start line{self._stderr_tail()}"
            )
        return start

    def run_for(self, delay: float) -> bool:
        """Let the job run up to ``delay`` seconds; True if it exited by itself meanwhile."""
        try:
            self.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the job and reap it; its output up to the kill stays in :attr:`lines`."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._drain()

    def finish(self, timeout: float) -> None:
        """Wait for the job to exit (killing it past ``timeout``); raises unless it exited with 0."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"job {self.proc.pid} did not finish within {timeout}s") from None
        self._drain()
        if self.proc.returncode != 0:
            raise RuntimeError(f"job {self.proc.pid} exited with {self.proc.returncode}{self._stderr_tail()}")

    def _stderr_tail(self, lines: int = 20) -> str:
        try:
            tail = self.stderr.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; stderr ({self.stderr}):\n" + "\n".join(tail)

    def _drain(self) -> None:
        self._reader.join(30)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)

    @property
    def last_epoch(self) -> int | None:
        """The last ``epoch N`` line printed (its save, if any, was submitted before it)."""
        epochs = [int(m[1]) for line in self.lines if (m := EPOCH.match(line))]
        return epochs[-1] if epochs else None

    @property
    def digest(self) -> str | None:
        """The sha256 of the final weights, if the job printed it."""
        found = [m[1] for line in self.lines if (m := DIGEST.match(line))]
        return found[-1] if found else None


def run_reference(args: list[str], stderr: Path, env: Mapping[str, str] | None = None, timeout: float = 600.0) -> str:
    """The digest of one uninterrupted job (its stderr goes to ``stderr``)."""
    job = Job(args, env, stderr)
    job.finish(timeout)
    if job.digest is None:
        raise RuntimeError(f"the reference job printed no digest:\n{chr(10).join(job.lines)}")
    return job.digest


# ---- what a kill left, listed from outside the job ---------------------------------------------
@dataclass(frozen=True)
class Listing:
    """The run's ``checkpoints/`` after a kill."""

    committed: tuple[int, ...]  # epochs with a sidecar, the commit marker
    temp_names: tuple[str, ...]  # bgsave temp files (a local write cut short)
    uncommitted_names: tuple[str, ...]  # .pt files of epochs with no sidecar (a write cut short, or a pruning)
    uploads: int | None  # S3: unfinished multipart uploads in the bucket

    @property
    def temps(self) -> int:
        """How many temp files."""
        return len(self.temp_names)

    @property
    def uncommitted(self) -> int:
        """How many files of uncommitted epochs."""
        return len(self.uncommitted_names)

    @property
    def newest(self) -> int | None:
        """The newest committed epoch, the one a resume must pick."""
        return self.committed[-1] if self.committed else None


def list_run(run_dir: str) -> Listing:
    """What ``run_dir/checkpoints`` holds now (fresh listing, no cache)."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints", detail=False, refresh=True)]
    except FileNotFoundError:
        names = []
    committed = sorted(int(m[1]) for n in names if (m := SIDECAR.match(n)))
    uncommitted = sorted(n for n in names if (m := EPOCH_FILE.match(n)) and int(m[1]) not in committed)
    uploads = None
    if hasattr(fs, "list_multipart_uploads"):
        uploads = len(fs.list_multipart_uploads(root.split("/", 1)[0]))
    temps = sorted(n for n in names if n.endswith(TEMP_MARKER))
    return Listing(tuple(committed), tuple(temps), tuple(uncommitted), uploads)


# ---- the loop ---------------------------------------------------------------------------------------
@dataclass
class KillRecord:
    """One kill, what it left, and how the next job resumed."""

    kill: int
    round: int
    after_epoch_lines: int  # the delay ran from the start line (0) or from the job's n-th epoch line (its save)
    delay_s: float
    last_epoch_printed: int | None  # the killed job's last "epoch N" line (None: killed before its first)
    newest_committed: int | None  # after the kill, listed from outside
    temps_left: int
    uncommitted_files: int
    uploads: int | None
    resumed_epoch: int | None = None  # what the next job printed (None: it started a new run)
    trainer_state_epoch: int | None = None
    restored: str | None = None  # "optimizer and RNG" / "RNG" (epoch 0 holds no optimizer state) / None
    late_commit: bool = False  # S3: a write the killed job had sent completed after the listing


@dataclass
class Round:
    """One run directory, from a new run to a job that finished: its kills and its final digest."""

    run_dir: str
    kills: int = 0
    jobs: int = 0
    digest: str | None = None
    # What the finished run still holds besides its committed checkpoints: temp files, and files of epochs
    # without a sidecar (left by a kill between a pruning's sidecar delete and its .pt deletes, say).
    left_at_end: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What :func:`kill_loop` did."""

    seed: int
    epochs: int
    reference_digest: str
    records: list[KillRecord] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The figures of the loop."""
        records = self.records
        return {
            "seed": self.seed,
            "kills": len(records),
            "resumes": sum(r.resumed_epoch is not None for r in records),
            "new_runs_after_a_kill": sum(r.resumed_epoch is None for r in records),
            "resumes_with_the_epochs_own_trainer_state": sum(
                r.resumed_epoch is not None and r.trainer_state_epoch == r.resumed_epoch for r in records
            ),
            "resumes_from_epoch_0_rng_only": sum(r.restored == "RNG" for r in records),
            "kills_timed_from_a_save": sum(r.after_epoch_lines > 0 for r in records),
            "kills_losing_the_last_submitted_save": sum(
                r.last_epoch_printed is not None and (r.newest_committed or 0) < r.last_epoch_printed for r in records
            ),
            "kills_leaving_partial_files": sum(bool(r.temps_left or r.uncommitted_files) for r in records),
            "kills_after_the_last_epoch": sum(r.last_epoch_printed == self.epochs for r in records),
            "late_commits": sum(r.late_commit for r in records),
            "rounds": len(self.rounds),
            "files_left_at_the_end_of_rounds": sum(len(r.left_at_end) for r in self.rounds),
            "jobs": sum(r.jobs for r in self.rounds),
            "reference_digest": self.reference_digest,
            "final_digests": [r.digest for r in self.rounds],
            "all_digests_equal": all(r.digest == self.reference_digest for r in self.rounds),
            "wall_s": round(self.wall_s, 1),
        }

    def records_as_dicts(self) -> list[dict[str, Any]]:
        """Every kill's record, for JSON."""
        return [asdict(r) for r in self.records]


def check_start(start: re.Match[str], listing: Listing | None, where: str) -> tuple[int | None, int | None, str | None]:
    """Check a job's start line against the listing before it; returns (resumed epoch, trainer epoch, restored).

    Raises:
        ResumeCheckError: a new run where a checkpoint was committed (or the reverse), another epoch
            than the newest committed, or not that epoch's own trainer state.
    """
    newest = listing.newest if listing is not None else None
    if start["new"] is not None:
        if newest is not None:
            raise ResumeCheckError(f"{where}: started a new run, but epoch {newest} is committed")
        return None, None, None
    epoch = int(start["epoch"])
    restored = RESTORED.match(start["how"])
    if restored is None:
        raise ResumeCheckError(f"{where}: resumed epoch {epoch} without restoring a trainer state: {start[0]!r}")
    trainer_epoch, what = int(restored["epoch"]), restored["what"]
    if trainer_epoch != epoch:
        raise ResumeCheckError(f"{where}: resumed epoch {epoch} with the trainer state of epoch {trainer_epoch}")
    # Epoch 0 is saved by start_run with the RNG states only; every later epoch with the optimizer's as well.
    if what != ("RNG" if epoch == 0 else "optimizer and RNG"):
        raise ResumeCheckError(f"{where}: epoch {epoch} resumed with {what} state restored: {start[0]!r}")
    if epoch != newest:
        raise ResumeCheckError(f"{where}: resumed epoch {epoch}, but the newest committed epoch is {newest}")
    return epoch, trainer_epoch, what


def kill_loop(
    command: Command,
    run_dir_of: Callable[[int], str],
    *,
    kills: int,
    seed: int,
    max_delay: float,
    reference: Callable[[], str],
    env: Mapping[str, str] | None = None,
    stderr_dir: Path,
    start_timeout: float = 120.0,
    finish_timeout: float = 600.0,
    on_kill: Callable[[KillRecord], None] | None = None,
) -> Result:
    """SIGKILL the example ``kills`` times at random moments, re-running it each time; every round ends equal.

    Args:
        command: The example's options, the same for every job.
        run_dir_of: The run directory of round ``n`` (1, 2, ...): a new one each round.
        kills: How many SIGKILLs in all.
        seed: Seeds the delays (uniform in ``[0, max_delay]`` seconds after a job's start line).
        max_delay: The longest delay.
        reference: Returns the uninterrupted run's digest (called once, when the first round ends).
        env: Extra environment for the jobs (the S3 endpoint and credentials).
        stderr_dir: Each job's stderr goes to a file here (named in a failure).
        start_timeout: Seconds a job may take to print its start line.
        finish_timeout: Seconds the last job of a round may take to finish.
        on_kill: Called with each record once the next job has resumed (progress output).

    Raises:
        ResumeCheckError: a resume not of the newest committed epoch with its own trainer state, or a
            round whose final digest differs from the reference (the message names the seed).
    """
    rng = random.Random(seed)
    began = time.monotonic()
    records: list[KillRecord] = []
    rounds: list[Round] = []
    ref: str | None = None
    job_no = 0
    while True:
        current = Round(run_dir_of(len(rounds) + 1))
        rounds.append(current)
        listing: Listing | None = None
        pending: KillRecord | None = None
        while True:
            job_no += 1
            stderr_path = stderr_dir / f"job_{job_no:04d}.stderr"
            job = Job(command.args(current.run_dir), env, stderr_path)
            current.jobs += 1
            where = f"round {len(rounds)} job {current.jobs} (seed {seed}, stderr {stderr_path})"
            try:
                start = job.wait_for_start(start_timeout)
                resumed, trainer_epoch, restored = _check_start_after(start, listing, pending, current.run_dir, where)
            except BaseException:
                with contextlib.suppress(Exception):
                    job.kill()
                raise
            if pending is not None:
                pending.resumed_epoch, pending.trainer_state_epoch, pending.restored = resumed, trainer_epoch, restored
                records.append(pending)
                if on_kill is not None:
                    on_kill(pending)
                pending = None
            if len(records) < kills:
                lines, delay = _draw_kill(rng, max_delay, len(records) + 1)
                # An epoch line is printed just after that epoch's save was submitted: the delay falls in its write.
                anchored = all(job.wait_for(EPOCH, start_timeout) is not None for _ in range(lines))
                if anchored and not job.run_for(delay):
                    job.kill()
                    current.kills += 1
                    listing = list_run(current.run_dir)
                    pending = KillRecord(
                        kill=len(records) + 1,
                        round=len(rounds),
                        after_epoch_lines=lines,
                        delay_s=round(delay, 4),
                        last_epoch_printed=job.last_epoch,
                        newest_committed=listing.newest,
                        temps_left=listing.temps,
                        uncommitted_files=listing.uncommitted,
                        uploads=listing.uploads,
                    )
                    continue
            job.finish(finish_timeout)
            current.digest = job.digest
            end = list_run(current.run_dir)
            current.left_at_end = [*end.temp_names, *end.uncommitted_names]
            break
        ref = ref if ref is not None else reference()
        if current.digest != ref:
            raise ResumeCheckError(
                f"round {len(rounds)} ({current.kills} kills, seed {seed}) ended with digest {current.digest}, "
                f"the uninterrupted run with {ref}; last job's output:\n" + "\n".join(job.lines)
            )
        if len(records) >= kills:
            return Result(seed, command.epochs, ref, records, rounds, time.monotonic() - began)


SAVE_WINDOW_S = 0.04
"""The delays after an epoch line: a checkpoint of this example takes 10-40 ms to write in the background."""


def _draw_kill(rng: random.Random, max_delay: float, kill: int) -> tuple[int, float]:
    """How many epoch lines to wait for, then the delay: odd kills from the start line (0 lines, anywhere in
    training), even ones within the background write of the 1st to 3rd epoch the job saves (alternating, so
    that even a short run has both)."""
    if kill % 2:
        return 0, rng.uniform(0.0, max_delay)
    return rng.randint(1, 3), rng.uniform(0.0, SAVE_WINDOW_S)


def _check_start_after(
    start: re.Match[str], listing: Listing | None, pending: KillRecord | None, run_dir: str, where: str
) -> tuple[int | None, int | None, str | None]:
    """:func:`check_start`, allowing on S3 for a write the killed job had sent that completed after the listing."""
    try:
        return check_start(start, listing, where)
    except ResumeCheckError:
        if pending is None or pending.uploads is None:
            raise
        # On S3 a request fully sent before the kill (a PUT, a CompleteMultipartUpload) can still complete
        # on the server after it: list again and check against what is there now.
        again = list_run(run_dir)
        checked = check_start(start, again, where)
        pending.late_commit = True
        return checked
