"""What the ``bgsave`` command imports: every command but ``bench`` runs without ever importing torch.

Each case runs in a fresh interpreter (this test process has torch loaded already) and checks, after
the command returned, which modules are in ``sys.modules``. The run directories are written by the
real manager, so the commands read real sidecars and listings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgsave import CheckpointManager
from bgsave.cli import EXIT_NOT_FOUND, EXIT_OK

pytestmark = pytest.mark.timeout(120)

# torch itself, and the bgsave modules that import it.
HEAVY = ("torch", "bgsave.manager", "bgsave.loading", "bgsave.cli.bench")

# Runs the command as `bgsave.cli.main` or as `python -m bgsave`, then prints the exit code and
# which HEAVY modules were imported, as one JSON line on stderr (stdout is the command's).
PROBE = """\
import json, runpy, sys
argv, how, heavy = json.loads(sys.argv[1])
if how == "main":
    import bgsave.cli
    code = bgsave.cli.main(argv)
else:
    sys.argv = ["bgsave", *argv]
    try:
        runpy.run_module("bgsave", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


def probe(argv: list[str], how: str = "main") -> tuple[int, list[str], str]:
    """Run ``bgsave ARGV`` in a fresh interpreter; returns the exit code, the heavy modules imported, stdout."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([argv, how, HEAVY])],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["imported"], done.stdout


def make_run(run_dir: str) -> str:
    """Three committed checkpoints, a trainer state and an uncommitted .pt; returns the checkpoint dir."""
    agent = torch.nn.Linear(4, 2)
    with CheckpointManager(run_dir, "imports-test", background=False) as mgr:
        for epoch in range(3):
            mgr.save_agent(agent, epoch, {"agent_step": epoch, "score": 0.1 * epoch})
        mgr.save_trainer_state(torch.optim.SGD(agent.parameters(), lr=0.1), 2, 2)
        checkpoint_dir = mgr.checkpoint_dir
    Path(checkpoint_dir, "model_0003.pt").write_bytes(b"a save in progress")
    return checkpoint_dir


@pytest.mark.parametrize("how", ["main", "python -m"])
@pytest.mark.parametrize(
    "command",
    [
        ["ls", "{run}"],
        ["ls", "{run}", "--json"],
        ["latest", "{run}"],
        ["best", "{run}", "--mode", "min"],
        ["best", "{run}", "--min"],
        ["show", "{checkpoints}/model_0001.pt"],
        ["show", "{checkpoints}/model_0003.pt", "--json"],
        ["prune", "{run}", "--keep-last", "1", "--dry-run"],
        ["--help"],
        ["best", "--help"],
    ],
)
def test_reading_commands_never_import_torch(command: list[str], how: str, local_run_dir: str) -> None:
    """ls, latest, best, show, prune and --help succeed without importing torch (nor manager, loading, bench)."""
    checkpoints = make_run(local_run_dir)
    argv = [a.replace("{run}", local_run_dir).replace("{checkpoints}", checkpoints) for a in command]
    code, imported, out = probe(argv, how)
    assert (code, imported) == (EXIT_OK, [])
    assert out


def test_bucket_listing_never_imports_torch(s3_run_dir: str) -> None:
    """On S3 too (s3fs and botocore loaded): ls and latest import no torch."""
    with CheckpointManager(s3_run_dir, "imports-test", background=False) as mgr:
        mgr.save_agent(torch.nn.Linear(4, 2), 7, {"score": 1.0})
    code, imported, out = probe(["ls", s3_run_dir, "--json"])
    assert (code, imported) == (EXIT_OK, [])
    assert [row["epoch"] for row in json.loads(out)] == [7]
    code, imported, out = probe(["latest", s3_run_dir])
    assert (code, imported, out.strip()) == (EXIT_OK, [], f"{s3_run_dir}/checkpoints/model_0007.pt")


def test_nothing_found_never_imports_torch(tmp_path: Path) -> None:
    """The failure paths too: latest on a run with nothing committed exits 1 without torch."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model_0001.pt").write_bytes(b"uncommitted")
    code, imported, out = probe(["latest", str(tmp_path)])
    assert (code, imported, out) == (EXIT_NOT_FOUND, [], "")


def test_bench_help_imports_the_benchmark_only_when_asked() -> None:
    """bench --help shows the benchmark's own description, which is the one help that loads it."""
    code, imported, out = probe(["bench", "--help"])
    assert code == EXIT_OK
    assert "bgsave.cli.bench" in imported
    assert "sync    torch.save in the calling thread" in out
