"""A disk that fills up mid-write: a real small tmpfs, so ENOSPC comes from the kernel, not from a mock."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator

import pytest
import torch

from bgsave import CheckpointManager, CheckpointWriteError, load_checkpoint
from bgsave.storage.local import DIRECT_MIN, direct_writes_from

SIZE_MB = 8


@pytest.fixture
def small_fs(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """An 8 MB tmpfs mounted for this test (skipped where mounting is not permitted)."""
    mount_point = os.path.join(os.fspath(tmp_path), "small")
    os.makedirs(mount_point)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", mount_point],
        check=False,
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], check=False)


def _agent(megabytes: float, value: float) -> torch.nn.Module:
    n = int(megabytes * 2**20 / 4)
    agent = torch.nn.Module()
    agent.register_parameter("w", torch.nn.Parameter(torch.full((n,), float(value))))
    return agent


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_full_disk_fails_cleanly_and_recovers(small_fs: str, caplog: pytest.LogCaptureFixture, direct: bool) -> None:
    """ENOSPC mid-write: error names the epoch, no temp left, earlier files load, the next save works.

    ``o-direct``: checkpoints of 1 MiB or more take the O_DIRECT path (tmpfs takes it since Linux 6.6;
    elsewhere the page-cache fallback runs the same test).
    """
    run_dir = os.path.join(small_fs, "run")
    with direct_writes_from(2**20 if direct else DIRECT_MIN), CheckpointManager(run_dir, "full") as mgr:
        optimizer = torch.optim.SGD(_agent(0.1, 0.0).parameters(), lr=0.1)
        mgr.save_agent(_agent(1, 1.0), 1, {"score": 1.0})
        mgr.save_trainer_state(optimizer, 1, 10)
        mgr.wait()

        mgr.save_agent(_agent(2 * SIZE_MB, 2.0), 2)  # cannot fit
        with pytest.raises(CheckpointWriteError) as info:
            mgr.wait()
        assert info.value.epoch == 2
        assert "model_0002.pt" in str(info.value)
        cause = info.value.__cause__
        while cause is not None and not (isinstance(cause, OSError) and cause.errno):
            cause = cause.__cause__ or cause.__context__
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        assert any("only" in r.getMessage() and "free" in r.getMessage() for r in caplog.records)

        names = sorted(os.listdir(mgr.checkpoint_dir))
        assert names == ["model_0001.pt", "model_0001.yaml", "trainer_0001.pt"]
        assert mgr.find_latest_checkpoint() == os.path.join(mgr.checkpoint_dir, "model_0001.pt")
        assert torch.equal(mgr.load_agent().w, torch.full_like(mgr.load_agent().w, 1.0))
        assert mgr.load_trainer_state()["epoch"] == 1  # type: ignore[index]

        mgr.save_agent(_agent(1, 3.0), 3)  # fits again
        mgr.wait()
        assert torch.equal(load_checkpoint(mgr.find_latest_checkpoint()).w[:4], torch.full((4,), 3.0))  # type: ignore[arg-type]
