"""Interpreter exit: pending background writes are flushed, and the process exits promptly.

Each test runs a small script in a fresh Python process (a hang or a lost write there cannot take
the test runner with it), then checks from this process what a user would check: the process ended
in time, and the latest checkpoint is committed and holds what was saved. The script imports the
test agents from ``tests/_models.py`` (on ``PYTHONPATH``) so this process can unpickle them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pytest

from _models import Agent, assert_state_equal, state_of
from bgsave import find_latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = Path(__file__).resolve().parent
# Generous for a loaded 2-core CI machine (importing torch alone can take seconds); a hang is forever.
EXIT_DEADLINE_S = 60.0

PRELUDE = """
import gc, json, os, sys, threading
from bgsave import CheckpointManager
from _models import Agent, Gate, GatedAgent, UnwritableAgent
run_dir = sys.argv[1]
"""


def run_script(body: str, run_dir: str) -> subprocess.CompletedProcess[str]:
    """Run PRELUDE + body in a fresh interpreter with ``run_dir`` as argv[1]; fails the test on a hang."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(TESTS_DIR), env.get("PYTHONPATH", "")] if p)
    script = PRELUDE + textwrap.dedent(body)
    try:
        return subprocess.run(
            [sys.executable, "-c", script, run_dir],
            capture_output=True,
            text=True,
            timeout=EXIT_DEADLINE_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit within {EXIT_DEADLINE_S}s: {exc.stderr!r}")


def committed_epochs(checkpoint_dir: str) -> set[int]:
    """Epochs with both model_N.pt and model_N.yaml, read fresh from the backend."""
    fs, root = fsspec.core.url_to_fs(checkpoint_dir)
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
    return {int(n[6:-3]) for n in names if n.startswith("model_") and n.endswith(".pt") and n[:-3] + ".yaml" in names}


@pytest.mark.parametrize(
    ("backend", "ending"),
    [("local", "falls-off-the-end"), ("local", "uncaught-exception"), ("s3", "falls-off-the-end")],
    ids=["local-end", "local-exception", "s3-end"],
)
def test_pending_saves_are_committed_at_exit_without_close(
    request: pytest.FixtureRequest, backend: str, ending: str
) -> None:
    """A script that saves in the background and exits (normally or by an exception) without close() commits all."""
    run_dir: str = request.getfixturevalue(f"{backend}_run_dir")
    body = """
        mgr = CheckpointManager(run_dir, "exit")
        gate = Gate()
        mgr.save_agent(GatedAgent(gate, seed=1), 1, {"score": 1.0})
        assert gate.wait_entered(), "the first write never started"
        # Queued behind the write held at the gate: certainly still pending when the script ends.
        mgr.save_agent(Agent(width=256, seed=2), 2, {"score": 2.0})
        gate.let_through()
        print("ENDING", flush=True)
    """
    if ending == "uncaught-exception":
        body += """
        raise RuntimeError("training crashed")
        """
    result = run_script(body, run_dir)
    assert "ENDING" in result.stdout, result.stderr
    if ending == "uncaught-exception":
        assert result.returncode == 1
        assert "training crashed" in result.stderr
    else:
        assert result.returncode == 0, result.stderr

    checkpoint_dir = f"{run_dir}/checkpoints"
    assert committed_epochs(checkpoint_dir) == {1, 2}
    latest = find_latest_checkpoint(checkpoint_dir)
    assert latest is not None
    assert latest.endswith("model_0002.pt")
    assert_state_equal(state_of(Agent(width=256, seed=2)), load_checkpoint(latest))


def test_a_dropped_manager_finishes_its_save_and_lets_go_of_the_run(local_run_dir: str) -> None:
    """A manager dropped without close() (del + gc) still commits its save, then frees its threads and the run.

    After the dropped manager's write has committed, nothing of it may linger: no worker thread, and
    no hold on the run directory, so a new manager on the same run (a re-run notebook cell) can save.
    """
    body = """
        import time, weakref
        before = {t.ident for t in threading.enumerate()}
        mgr = CheckpointManager(run_dir, "dropped")
        path = mgr.save_agent(Agent(width=256, seed=3), 3)
        ref = weakref.ref(mgr)
        del mgr
        gc.collect()
        # The save goes on without its manager: wait for its commit marker, with a deadline.
        yaml_path = path[:-3] + ".yaml"
        deadline = time.monotonic() + 20
        while not os.path.exists(yaml_path) and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        committed = os.path.exists(yaml_path)
        gc.collect()
        # The abandoned manager closes itself on a thread of its own: give it a deadline to finish.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
            if not left:
                break
            threading.Event().wait(0.01)
        try:
            with CheckpointManager(run_dir, "dropped") as again:
                again.save_agent(Agent(width=4, seed=4), 4)
            second = "ok"
        except Exception as exc:
            second = f"{type(exc).__name__}: {exc}"
        report = {"committed": committed, "collected": ref() is None, "threads": left, "second": second}
        print(json.dumps(report), flush=True)
    """
    result = run_script(body, local_run_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["committed"], "the dropped manager's save was not committed"
    latest = find_latest_checkpoint(f"{local_run_dir}/checkpoints")
    assert latest is not None
    assert_state_equal(
        state_of(Agent(width=256, seed=3)), load_checkpoint(f"{local_run_dir}/checkpoints/model_0003.pt")
    )
    assert report["second"] == "ok", report
    assert report["threads"] == [], report


def test_a_failure_pending_at_exit_is_reported_and_exit_is_prompt(local_run_dir: str) -> None:
    """A save that fails while the script exits without close() is reported on stderr; the process still exits."""
    body = """
        mgr = CheckpointManager(run_dir, "exit-err")
        mgr.save_agent(Agent(seed=1), 1)
        mgr.wait()
        mgr.save_agent(UnwritableAgent(), 4)
    """
    result = run_script(body, local_run_dir)
    assert result.returncode == 0, result.stderr
    assert "4" in result.stderr
    assert "model_0004.pt" in result.stderr  # the failed save is named, not swallowed
    checkpoint_dir = f"{local_run_dir}/checkpoints"
    assert committed_epochs(checkpoint_dir) == {1}
    names = set(os.listdir(checkpoint_dir))
    assert not {n for n in names if "0004" in n}  # no .pt, sidecar or temp file of the failed save
