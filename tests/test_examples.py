"""The RL example, run as a user runs it: a new run, preempted, resumed with its optimizer, its best checkpoint."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from _scripts import ROOT, run_script
from bgsave import CheckpointManager, load_checkpoint

EXAMPLES = ROOT / "examples"
# Small enough to take seconds: epochs 0, 2, 4, 6 are saved, the preemption after epoch 3 loses epoch 3,
# and retention keeps the newest two checkpoints and the best.
ARGS = ("--epochs", "6", "--save-every", "2", "--keep-last", "2")


def run_example(run_dir: Path, *args: str) -> str:
    """Run ``examples/train_rl.py`` from the repository root, as the README does; returns its stdout."""
    return run_script("examples/train_rl.py", "--run-dir", str(run_dir), *ARGS, *args, timeout=240).stdout


def files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime_ns) of every file in the run's checkpoint directory."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").iterdir()}


def sidecars(run_dir: Path) -> dict[int, dict[str, Any]]:
    with CheckpointManager(run_dir, run_dir.name) as mgr:
        return {info.epoch: dict(info.sidecar) for info in mgr.checkpoints()}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run of the example preempted after epoch 3, then resumed to epoch 6: its run dir and output."""
    run_dir = tmp_path_factory.mktemp("example") / "interrupted"
    return run_dir, run_example(run_dir, "--stop-after", "3")


def test_new_run_is_preempted_and_resumes_from_its_latest_checkpoint(interrupted: tuple[Path, str]) -> None:
    """Epoch 0 is saved first; after the preemption the run resumes from epoch 2 with its optimizer state."""
    _, out = interrupted
    assert "saved the initial policy as epoch 0" in out
    assert "-- preempted after epoch 3" in out
    step_at_2 = re.search(r"^epoch +2 +agent_step +(\d+)", out, re.M)
    assert step_at_2 is not None
    assert f"resumed from epoch 2 (agent_step {step_at_2[1]}, optimizer and RNG state of epoch 2 restored)" in out
    # Epoch 3 was lost with the preemption and trained again after the resume.
    assert len(re.findall(r"^epoch +3 ", out, flags=re.MULTILINE)) == 2


def test_run_dir_holds_the_kept_checkpoints_and_the_final_trainer_state(interrupted: tuple[Path, str]) -> None:
    """Agent, sidecar and trainer state of epochs 4 and 6 (and of the best); no temp files left."""
    run_dir, _ = interrupted
    kept = set(sidecars(run_dir))
    best = max((s["score"], e) for e, s in sidecars(run_dir).items() if s["score"] is not None)[1]
    assert {4, 6} <= kept <= {4, 6, best}
    expected = {f"model_{e:04d}.{ext}" for e in kept for ext in ("pt", "yaml")} | {f"trainer_{e:04d}.pt" for e in kept}
    assert set(files(run_dir)) == expected
    with CheckpointManager(run_dir, run_dir.name) as mgr:
        state = mgr.load_trainer_state()
    assert state is not None
    assert (state["epoch"], state["agent_step"]) == (6, sidecars(run_dir)[6]["agent_step"])


def test_best_checkpoint_is_printed_and_loads_back(interrupted: tuple[Path, str]) -> None:
    """The printed best is the highest score among the sidecars, and the loaded policy scores the same."""
    run_dir, out = interrupted
    match = re.search(r"^best: epoch (\d+), score ([\d.]+) \((.+)\); loaded back, it scores ([\d.]+)$", out, re.M)
    assert match is not None
    epoch, score, path, rescored = int(match[1]), match[2], match[3], match[4]
    scores = {e: s["score"] for e, s in sidecars(run_dir).items() if s["score"] is not None}
    assert scores[epoch] == max(scores.values())
    assert f"{scores[epoch]:.1f}" == score == rescored
    with CheckpointManager(run_dir, run_dir.name) as mgr:
        assert mgr.find_best_checkpoint() == path
    assert "training blocked" in out


def test_resumed_run_matches_an_uninterrupted_one(
    interrupted: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same scores, steps and final weights as without the preemption: the optimizer state really was restored."""
    run_dir, _ = interrupted
    straight = tmp_path / "straight"
    out = run_example(straight, "--stop-after", "0")
    assert "preempted" not in out
    assert "resumed from" not in out

    def comparable(run: Path) -> dict[int, tuple[object, ...]]:
        return {e: (s["agent_step"], s["score"], s["avg_reward"]) for e, s in sidecars(run).items()}

    assert comparable(run_dir) == comparable(straight)
    # The pickled policy's class lives in examples/agents.py: a loader needs it importable.
    monkeypatch.syspath_prepend(os.fspath(EXAMPLES))
    resumed = load_checkpoint(os.fspath(run_dir / "checkpoints" / "model_0006.pt"))
    uninterrupted = load_checkpoint(os.fspath(straight / "checkpoints" / "model_0006.pt"))
    assert resumed.state_dict().keys() == uninterrupted.state_dict().keys()
    assert all(torch.equal(a, uninterrupted.state_dict()[k]) for k, a in resumed.state_dict().items())


def test_rerun_of_a_finished_run_trains_and_writes_nothing(interrupted: tuple[Path, str]) -> None:
    """The same command again resumes at the last epoch, has nothing left to train, and leaves every file as it was."""
    run_dir, _ = interrupted
    before = files(run_dir)
    out = run_example(run_dir, "--stop-after", "3")
    assert "resumed from epoch 6" in out
    assert "nothing left to train" in out
    assert re.search(r"^epoch ", out, re.M) is None
    assert files(run_dir) == before
