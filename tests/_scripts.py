"""Running the repository's own scripts (examples, benchmarks) as a user would, from its root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(
    path: str, *args: str, timeout: float, env: dict[str, str] | None = None, expect: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run ``python <path> <args>`` from the repository root with a deadline; fail the test on another exit code.

    The deadline matters: a script that hangs at exit (an S3 file left open, say) fails instead of
    stalling the suite. Both outputs are in the failure message.
    """
    proc = subprocess.run(
        [sys.executable, path, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != expect:
        pytest.fail(f"{path} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
