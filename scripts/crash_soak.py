"""Crash soak: SIGKILL a process saving checkpoints hundreds of times and verify every kill in a fresh process.

The long version of ``tests/test_crash.py`` (same harness, ``tests/crash_child.py``). Each kill lands at
a random moment after the child starts saving (a seeded RNG; the seed is printed); the next child
first verifies what the kill left: the latest committed checkpoint loads with ``torch.load``, every
parameter equals its epoch, its sidecar and the trainer state match, and at most the in-flight
checkpoint was lost. A final check runs in a brand-new interpreter.

Usage::

    python scripts/crash_soak.py --kills 200 --backend local
    python scripts/crash_soak.py --kills 200 --backend s3 --json crash-s3.json

Prints one line per kill and the figures (kills, corrupt loads, max epochs lost per kill, ...), and
writes them with every kill's record as JSON. Exits 1 on the first corrupt load or broken invariant,
keeping a local run directory for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="how many SIGKILLs (default 200)")
    parser.add_argument("--backend", choices=("local", "s3"), default="local", help="where the run lives")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill delays (default: random)")
    parser.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help="longest delay in seconds from the first save to the kill (default 0.4 local, 1.0 s3)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="start no kill after this long (reports fewer kills)"
    )
    parser.add_argument("--run-dir", default=None, help="local run directory (default: a new temp dir)")
    parser.add_argument("--json", default=None, help="write the figures and every kill's record here")
    parser.add_argument("--quiet", action="store_true", help="no line per kill")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every kill verified, 1 otherwise."""
    args = parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import crash_child

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    max_delay = args.max_delay if args.max_delay is not None else (0.4 if args.backend == "local" else 1.0)
    print(f"crash soak: {args.kills} kills on {args.backend}, seed {seed}, delays up to {max_delay}s", flush=True)
    records: list[Any] = []
    started = time.monotonic()

    def progress(record: Any) -> None:
        records.append(record)
        if not args.quiet:
            print(
                f"kill {record.kill:4d}  delay {record.delay_s:.3f}s  epoch {record.epoch_before} -> reported "
                f"{record.last_reported} -> latest {record.epoch_after}  lost {record.lost}  "
                f"temps {record.temps_left}  orphans {record.orphans}"
                + (f"  uploads {record.uploads}" if record.uploads is not None else ""),
                flush=True,
            )

    failure: str | None = None
    final: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        if args.backend == "s3":
            endpoint = stack.enter_context(crash_child.moto_server())
            bucket = f"crash-{uuid.uuid4().hex[:12]}"
            crash_child.make_bucket(endpoint, bucket)
            run_dir, env = f"s3://{bucket}/runs/crash", crash_child.s3_env(endpoint)
        else:
            run_dir, env = args.run_dir or os.path.join(tempfile.mkdtemp(prefix="bgsave-crash-"), "run"), {}
        try:
            crash_child.crash_loop(
                run_dir,
                kills=args.kills,
                seed=seed,
                max_delay=max_delay,
                env=env,
                stop_after=args.max_seconds,
                on_kill=progress,
            )
            final = crash_child.verify_in_fresh_interpreter(run_dir, env)
            if final["epoch"] < records[-1].epoch_after or len(final["temps"]) > crash_child.MAX_TEMPS_LEFT:
                failure = f"final verification: {final}"
        except crash_child.CrashCheckError as exc:
            failure = str(exc)
    if args.backend == "local" and not args.run_dir:
        if failure is None:
            shutil.rmtree(os.path.dirname(run_dir), ignore_errors=True)
        else:
            print(f"kept the run directory for inspection: {run_dir}", file=sys.stderr)

    figures = {
        "backend": args.backend,
        "seed": seed,
        "max_delay_s": max_delay,
        "kills_asked": args.kills,
        **crash_child.summarize(records),
        "corrupt_loads": int(failure is not None),
        "failure": failure,
        "final_verification": final,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "final_verification"}, indent=2))
    if args.json:
        Path(args.json).write_text(
            json.dumps({**figures, "records": crash_child.records_as_dicts(records)}, indent=2) + "\n"
        )
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
