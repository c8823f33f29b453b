"""CheckpointManager(wandb_run=...) with the real wandb offline: uploads run on the worker, after commit."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from bgsave import CheckpointManager, load_checkpoint
from wandb_records import artifact_records

wandb = pytest.importorskip("wandb")


def _agent(value: float) -> torch.nn.Module:
    agent = torch.nn.Linear(8, 8)
    with torch.no_grad():
        agent.weight.fill_(value)
    return agent


def test_each_committed_checkpoint_is_logged_as_artifact(wandb_dirs: str, local_run_dir: str) -> None:
    """Every committed checkpoint is recorded as a "model" artifact named after the run, with its sidecar."""
    run = wandb.init(project="bgsave-tests", dir=wandb_dirs, name="w")
    with CheckpointManager(local_run_dir, "exp-1", wandb_run=run) as mgr:
        for epoch in range(3):
            mgr.save_agent(_agent(epoch), epoch, {"agent_step": epoch * 10, "score": float(epoch)})
        records = mgr.records
    run.finish()

    artifacts = artifact_records(wandb_dirs)
    assert [json.loads(a.metadata)["epoch"] for a in artifacts] == [0, 1, 2]
    assert {a.name for a in artifacts} == {"exp-1"}
    assert {a.type for a in artifacts} == {"model"}
    assert sorted(artifacts[2].aliases) == ["epoch_0002", "latest"]
    assert json.loads(artifacts[1].metadata)["score"] == 1.0
    assert [e.local_path for e in artifacts[0].manifest.contents] == [
        os.path.join(local_run_dir, "checkpoints", "model_0000.pt")
    ]
    assert all(r.ok and r.after_error is None for r in records)


def test_every_n_uploads_only_some(wandb_dirs: str, local_run_dir: str) -> None:
    """wandb_every_n=2 uploads the 1st, 3rd, 5th committed checkpoints; all of them commit locally."""
    run = wandb.init(project="bgsave-tests", dir=wandb_dirs, name="w")
    with CheckpointManager(local_run_dir, "exp", wandb_run=run, wandb_every_n=2) as mgr:
        for epoch in range(5):
            mgr.save_agent(_agent(epoch), epoch * 10)
        assert len(mgr.checkpoints()) == 5
    run.finish()
    assert [json.loads(a.metadata)["epoch"] for a in artifact_records(wandb_dirs)] == [0, 20, 40]


def test_upload_failure_is_recorded_and_never_undoes_the_commit(
    wandb_dirs: str, local_run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing upload (finished run) is logged and counted in records; the checkpoint stays committed."""
    run = wandb.init(project="bgsave-tests", dir=wandb_dirs, name="w")
    run.finish()
    with CheckpointManager(local_run_dir, "exp", wandb_run=run) as mgr:
        path = mgr.save_agent(_agent(3.0), 7, {"score": 1.0})
        mgr.wait()  # an upload failure is not a checkpoint failure: nothing raised
        [record] = mgr.records
        assert mgr.find_latest_checkpoint() == path
    assert record.ok
    assert record.after_error is not None and "WandbUploadError" in record.after_error
    assert any("epoch 7" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    loaded: Any = load_checkpoint(path)
    assert torch.equal(loaded.weight, torch.full((8, 8), 3.0))


def test_offline_run_with_retention_gets_copies_so_pruning_cannot_break_sync(
    wandb_dirs: str, local_run_dir: str
) -> None:
    """Offline + keep_last: W&B stages its own copy of each file, so pruned checkpoints stay syncable."""
    run = wandb.init(project="bgsave-tests", dir=wandb_dirs, name="w")
    with CheckpointManager(local_run_dir, "exp", wandb_run=run, keep_last=1) as mgr:
        for epoch in range(3):
            mgr.save_agent(_agent(epoch), epoch, {"score": float(epoch)})
        mgr.wait()
        assert [i.epoch for i in mgr.checkpoints()] == [2]
    run.finish()
    artifacts = artifact_records(wandb_dirs)
    assert [json.loads(a.metadata)["epoch"] for a in artifacts] == [0, 1, 2]
    for artifact in artifacts:
        [entry] = artifact.manifest.contents
        # The manifest points at W&B's staged copy, which still exists after the prune.
        assert entry.local_path and "checkpoints" not in entry.local_path
        assert os.path.exists(entry.local_path)
