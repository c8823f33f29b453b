"""Retention in the manager: applied on the worker after each commit, never touching the newest or best."""

from __future__ import annotations

import os

import torch

from bgsave import CheckpointManager


def _epochs(run_dir: str) -> list[int]:
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    return sorted(int(n[6:-5]) for n in names if n.startswith("model_") and n.endswith(".yaml"))


def test_keep_last_and_best_after_each_commit(local_run_dir: str) -> None:
    """keep_last=2, keep_best=1 leaves the two newest plus the best; pruned epochs lose .pt and sidecar."""
    scores = [0.1, 0.9, 0.3, 0.2, 0.4, 0.5]
    with CheckpointManager(local_run_dir, "r", keep_last=2, keep_best=1) as mgr:
        for epoch, score in enumerate(scores):
            mgr.save_agent(torch.nn.Linear(4, 4), epoch, {"score": score})
        mgr.wait()
        assert [info.epoch for info in mgr.checkpoints()] == [1, 4, 5]
        assert str(mgr.find_best_checkpoint()).endswith("model_0001.pt")
    files = sorted(os.listdir(os.path.join(local_run_dir, "checkpoints")))
    assert files == [
        "model_0001.pt",
        "model_0001.yaml",
        "model_0004.pt",
        "model_0004.yaml",
        "model_0005.pt",
        "model_0005.yaml",
    ]


def test_retention_sees_late_scores(local_run_dir: str) -> None:
    """A score set later with update_metadata makes that checkpoint the best, which retention then keeps."""
    with CheckpointManager(local_run_dir, "r", keep_last=1, keep_best=1) as mgr:
        mgr.save_agent(torch.nn.Linear(4, 4), 0, {"score": 0.5})
        mgr.save_agent(torch.nn.Linear(4, 4), 1, {"score": 0.1})
        mgr.update_metadata(1, score=0.99)
        mgr.save_agent(torch.nn.Linear(4, 4), 2, {"score": 0.2})
        mgr.wait()
        assert _epochs(local_run_dir) == [1, 2]


def test_concurrent_resaves_never_lose_latest_or_best(local_run_dir: str) -> None:
    """Saving fast with max_pending=2 and re-saving old epochs never prunes the newest, the best, or a re-save."""
    with CheckpointManager(local_run_dir, "r", keep_last=1, keep_best=1, max_pending=2) as mgr:
        for epoch in range(12):
            mgr.save_agent(torch.nn.Linear(64, 64), epoch, {"score": 10.0 if epoch == 3 else float(epoch) / 100})
            resaved = epoch - 2 if epoch % 4 == 3 else None
            if resaved is not None:
                mgr.save_agent(torch.nn.Linear(64, 64), resaved, {"score": 0.0})  # re-save an old epoch
            epochs = [info.epoch for info in mgr.checkpoints()]
            assert epochs[-1] == epoch, epochs  # the newest, even when an older epoch was committed after it
            if resaved is not None:
                assert resaved in epochs, epochs  # the re-save survives the prune that follows its commit
            if epoch >= 3:
                assert 3 in epochs, epochs  # the best
        mgr.wait()
        # 9 was re-saved last: a just-committed checkpoint survives its own prune; the next commit takes it.
        assert _epochs(local_run_dir) == [3, 9, 11]
        mgr.save_agent(torch.nn.Linear(64, 64), 12, {"score": 0.0})
        mgr.wait()
        assert _epochs(local_run_dir) == [3, 12]
