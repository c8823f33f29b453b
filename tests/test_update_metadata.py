"""Scores that arrive after the save: update_metadata rewrites the sidecar atomically, on every backend."""

from __future__ import annotations

import pytest
import torch

from bgsave import CheckpointManager, CheckpointWriteError


def test_late_score_changes_the_best(any_run_dir: str) -> None:
    """A score added later is what find_best / by_score see; other sidecar values are kept."""
    with CheckpointManager(any_run_dir, "r") as mgr:
        for epoch in range(3):
            mgr.save_agent(torch.nn.Linear(2, 2), epoch, {"agent_step": epoch * 7, "score": 0.1 * epoch})
        assert str(mgr.find_best_checkpoint()).endswith("model_0002.pt")
        mgr.update_metadata(0, score=5.0, eval_episodes=32)
        assert str(mgr.find_best_checkpoint()).endswith("model_0000.pt")
        assert [p.rsplit("/", 1)[-1] for p in mgr.find_checkpoints_by_score(1.0)] == ["model_0000.pt"]
        [first] = [i for i in mgr.checkpoints() if i.epoch == 0]
        assert first.sidecar["eval_episodes"] == 32
        assert first.sidecar["agent_step"] == 0 and first.sidecar["run"] == "r"


def test_update_of_a_missing_epoch_fails_at_the_next_call(local_run_dir: str) -> None:
    """Updating an epoch that was never committed reaches the caller as a CheckpointWriteError naming it."""
    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
        mgr.update_metadata(9, score=1.0)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.wait()
        assert info.value.epoch == 9
