"""The .pt files' CRC32s: off by default on bgsave's writes, on with crc32=True, the caller's setting untouched.

Real ``torch.save`` / ``torch.load`` and Python's ``zipfile`` reading the bytes bgsave wrote.
"""

from __future__ import annotations

import io
import os
import zipfile

import fsspec
import pytest
import torch

from _models import Agent, assert_state_equal, make_optimizer, state_of, train
from bgsave import CheckpointManager, load_checkpoint
from bgsave.serialize import SETTINGS_PER_THREAD

pytestmark = pytest.mark.skipif(
    not SETTINGS_PER_THREAD, reason="this torch keeps the CRC32 setting process-wide, so bgsave leaves it alone"
)


def archive(url: str) -> zipfile.ZipFile:
    with fsspec.open(url, "rb") as f:
        return zipfile.ZipFile(io.BytesIO(f.read()))


def tensor_crcs(url: str) -> list[int]:
    """The CRC32 recorded for each tensor record (``archive/data/N``) of a torch.save file."""
    records = [info for info in archive(url).infolist() if "/data/" in info.filename and info.file_size]
    assert records, "no tensor records"
    return [info.CRC for info in records]


def save_both(mgr: CheckpointManager, agent: Agent) -> tuple[str, str]:
    optimizer = make_optimizer(agent)
    train(agent, optimizer, 1)  # Adam's moments: tensors in the trainer state too
    mgr.save_agent(agent, 1, {"score": 1.0})
    mgr.save_trainer_state(optimizer, 1, 0)
    mgr.wait()
    directory = mgr.checkpoint_dir
    return f"{directory}/model_0001.pt", f"{directory}/trainer_0001.pt"


def test_checkpoints_are_written_without_crc32_by_default(run_dir: str) -> None:
    """Both .pt files carry no CRC32s (torch.load reads them the same); zip tools see the CRCs missing."""
    agent = Agent(width=4)
    with CheckpointManager(run_dir, "crc") as mgr:
        pt, trainer_state = save_both(mgr, agent)
        expected = state_of(agent)
        for url in (pt, trainer_state):
            assert set(tensor_crcs(url)) == {0}, url
            assert archive(url).testzip() is not None  # zipfile checks CRCs: it reports the first record
        assert_state_equal(expected, load_checkpoint(pt))
        trainer_state_loaded = mgr.load_trainer_state()
        assert trainer_state_loaded is not None
        assert trainer_state_loaded["epoch"] == 1


def test_crc32_true_writes_the_crcs_that_zip_tools_check(run_dir: str) -> None:
    """crc32=True: torch's default records, every CRC32 correct (zipfile's testzip finds no bad record)."""
    agent = Agent(width=4)
    with CheckpointManager(run_dir, "crc", crc32=True) as mgr:
        for url in save_both(mgr, agent):
            assert 0 not in tensor_crcs(url)
            assert archive(url).testzip() is None


@pytest.mark.parametrize("crc32", [False, True])
def test_the_callers_own_crc32_setting_is_left_alone(local_run_dir: str, crc32: bool) -> None:
    """Writing on the caller's thread (background=False) switches CRC32 for bgsave's own torch.save only."""
    theirs = not crc32  # the caller's own setting, the opposite of the manager's
    own_file = os.path.join(os.path.dirname(local_run_dir), "own.pt")
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(theirs)
    try:
        with CheckpointManager(local_run_dir, "crc", background=False, crc32=crc32) as mgr:
            pt, _ = save_both(mgr, Agent(width=4))
            assert torch.serialization.get_crc32_options() is theirs
            torch.save(Agent(width=4), own_file)
    finally:
        torch.serialization.set_crc32_options(before)
    assert (0 in tensor_crcs(pt)) is not crc32
    assert (0 in tensor_crcs(own_file)) is not theirs
