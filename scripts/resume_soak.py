"""Resume soak: SIGKILL the RL example hundreds of times, re-run it each time, and compare its final weights.

The long version of ``tests/test_exact_resume.py`` (same harness, ``tests/resume_harness.py``). Every job
is ``python examples/train_rl.py --run-dir RUN --epochs 40 --save-every 1 --keep-last 2 --stop-after 0
--print-digest`` in a new process; each is killed at a random moment (a seeded RNG; the seed is printed),
and the next one must resume the newest committed epoch with that epoch's own trainer state. Each run
directory is re-run until a job finishes, and its final digest must equal the uninterrupted run's; then
the next run directory starts, until ``--kills`` kills are made.

On ``--backend s3`` the run directories are ``s3://BUCKET/runs/runN`` on moto's server, in its own process
on 127.0.0.1 (it outlives the killed jobs), with the endpoint and dummy credentials in the environment.

Usage::

    python scripts/resume_soak.py --backend local --kills 100
    python scripts/resume_soak.py --backend s3 --kills 50

Prints one line per kill and the figures; writes them, every kill's record, the machine and the git SHA
as JSON to ``benchmarks/results/resume_soak_<backend>_<date>.json`` (``--json`` elsewhere). Exits 1 on
the first wrong resume or differing digest (the JSON then holds the failure).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness.report import REPO, RESULTS_DIR, machine, write_report

import crash_child  # the moto server in its own process, the bucket, the S3 environment
import resume_harness
from resume_harness import Command, KillRecord, ResumeCheckError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "s3"), default="local", help="where the runs live")
    parser.add_argument("--kills", type=int, default=100, help="how many SIGKILLs (default 100)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed for the kill delays (default ${resume_harness.SEED_ENV} or random)",
    )
    parser.add_argument("--keep-last", type=int, default=2, help="the example's --keep-last; 0 keeps all (default 2)")
    parser.add_argument("--epochs", type=int, default=40, help="the example's --epochs (default 40)")
    parser.add_argument("--save-every", type=int, default=1, help="the example's --save-every (default 1)")
    parser.add_argument(
        "--max-delay", type=float, default=0.6, help="longest delay after a job's start line, seconds (default 0.6)"
    )
    parser.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--quiet", action="store_true", help="no line per kill")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    return args


def progress(record: KillRecord) -> None:
    """One line per kill, once the next job has resumed."""
    resumed = "new run" if record.resumed_epoch is None else f"resumed {record.resumed_epoch} ({record.restored})"
    print(
        f"kill {record.kill:4d}  round {record.round}  after {record.after_epoch_lines} epoch lines + "
        f"{record.delay_s:.3f}s  last printed {record.last_epoch_printed}  committed {record.newest_committed}  "
        f"temps {record.temps_left}  uncommitted {record.uncommitted_files}"
        + (f"  uploads {record.uploads}" if record.uploads is not None else "")
        + f"  -> {resumed}"
        + ("  (late commit)" if record.late_commit else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every resume was right and every digest equal, 1 otherwise."""
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    seed = args.seed if args.seed is not None else resume_harness.seed_from_env()
    command = Command(args.epochs, save_every=args.save_every, keep_last=args.keep_last)
    print(
        f"resume soak: {args.kills} kills on {args.backend}, seed {seed}, "
        f"{command.shell('RUN')}, delays up to {args.max_delay}s",
        flush=True,
    )
    records: list[KillRecord] = []

    def on_kill(record: KillRecord) -> None:
        records.append(record)
        if not args.quiet:
            progress(record)

    # benchmarks/out/ is git-ignored and on the repository's disk (not a tmpfs /tmp, where fsync is free).
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bgsave-resume-soak-", dir=REPO / "benchmarks" / "out"))
    (scratch / "stderr").mkdir()
    failure: str | None = None
    result = None
    with contextlib.ExitStack() as stack:
        if args.backend == "s3":
            endpoint = stack.enter_context(crash_child.moto_server())
            bucket = f"resume-{uuid.uuid4().hex[:12]}"
            crash_child.make_bucket(endpoint, bucket)
            env = crash_child.s3_env(endpoint)
            os.environ.update(env)  # this process lists the bucket after each kill
            root = f"s3://{bucket}"
        else:
            env, root = {}, str(scratch)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference"))
        # The uninterrupted run trains while the first kills are made.
        reference = pool.submit(
            resume_harness.run_reference, command.args(f"{root}/reference/run"), scratch / "reference.stderr", env
        )
        try:
            result = resume_harness.kill_loop(
                command,
                lambda n: f"{root}/runs/run{n}",
                kills=args.kills,
                seed=seed,
                max_delay=args.max_delay,
                reference=reference.result,
                env=env,
                stderr_dir=scratch / "stderr",
                on_kill=on_kill,
            )
        except (ResumeCheckError, RuntimeError, TimeoutError) as exc:  # a wrong resume, or a job that broke
            failure = f"{type(exc).__name__}: {exc}"
        reference.result()
    summary = result.summary() if result is not None else {"seed": seed, "kills": len(records)}
    summary["failure"] = failure
    print(json.dumps(summary, indent=2))
    out = args.json or RESULTS_DIR / f"resume_soak_{args.backend}_{started:%Y-%m-%d}.json"
    body: dict[str, Any] = {
        "backend": args.backend,
        "job_command": command.shell("RUN"),
        "kills_asked": args.kills,
        "max_delay_s": args.max_delay,
        "save_window_s": resume_harness.SAVE_WINDOW_S,
        **summary,
        "round_details": [vars(r) for r in result.rounds] if result is not None else None,
        "records": [vars(r) for r in records],
        "machine": machine(scratch),
    }
    write_report(out, "resume_soak", started, body)
    print(f"wrote {out}")
    if failure is None:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"kept {scratch} (jobs' stderr, local runs) for inspection", file=sys.stderr)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
