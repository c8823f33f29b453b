"""The CUDA path: pinned, reused host buffers filled by non-blocking copies on a side stream.

Skipped without a CUDA device (CI has none). What is checked is what a GPU user relies on: the file
holds the weights as they were at the call even when the caller's stream overwrites them at once,
the file's tensors are CPU tensors, buffers are pinned and reused, and optimizer state on the device
is saved the same way.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from bgsave import CheckpointManager
from bgsave.snapshot import SnapshotPool

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(120),
]


def big_model() -> nn.Module:
    """~64 MB of weights on the GPU, so a device-to-host copy takes long enough for a race to show."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 8)).cuda()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def test_the_file_holds_the_weights_at_the_call_even_when_the_caller_overwrites_them_at_once(
    tmp_path: os.PathLike[str],
) -> None:
    """Kernels queued on the caller's stream right after save_agent cannot reach the copy in flight."""
    model = big_model()
    with CheckpointManager(os.fspath(tmp_path), "gpu") as mgr:
        for epoch in range(3):
            expected = cpu_state(model)
            mgr.save_agent(model, epoch)
            with torch.no_grad():  # overwrite every weight immediately, on the caller's stream
                for p in model.parameters():
                    p.mul_(-2.0).add_(1.0)
            mgr.wait()
            loaded = mgr.load_agent(epoch)
            state = loaded.state_dict()
            assert all(t.device.type == "cpu" for t in state.values())
            assert all(torch.equal(state[k], expected[k]) for k in expected), f"epoch {epoch}"


def test_snapshot_buffers_are_pinned_and_reused() -> None:
    """The second snapshot of the same model reuses the first one's pinned buffers (no new allocation)."""
    model = big_model()
    pool = SnapshotPool()
    first = pool.take("agent", model)
    first.wait_ready()
    assert first.buffers and all(b.is_pinned() for b in first.buffers)
    pointers = sorted(b.data_ptr() for b in first.buffers)
    pool.release(first)
    second = pool.take("agent", model)
    second.wait_ready()
    assert sorted(b.data_ptr() for b in second.buffers) == pointers
    state = second.value.state_dict()
    expected = cpu_state(model)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    pool.release(second)


def test_optimizer_state_on_the_device_is_saved_as_at_the_call(tmp_path: os.PathLike[str]) -> None:
    """Adam's CUDA moments are saved as CPU tensors, as they were when save_trainer_state was called."""
    model = big_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(16, 4096, device="cuda")).sum().backward()
    optimizer.step()
    expected = {
        i: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in optimizer.state_dict()["state"].items()
    }
    with CheckpointManager(os.fspath(tmp_path), "gpu-opt") as mgr:
        mgr.save_agent(model, 1)
        mgr.save_trainer_state(optimizer, 1, agent_step=16)
        optimizer.step()  # moves every moment on the device right away
        mgr.wait()
        saved = mgr.load_trainer_state()
    assert saved is not None
    state = saved["optimizer_state"]["state"]
    for i, moments in expected.items():
        for k, v in moments.items():
            if torch.is_tensor(v):
                assert state[i][k].device.type == "cpu"
                assert torch.equal(state[i][k], v), (i, k)


def test_mixed_devices_in_one_agent(tmp_path: os.PathLike[str]) -> None:
    """An agent holding CPU and CUDA tensors (a CPU buffer beside CUDA weights) is saved whole."""
    model = big_model()
    model.register_buffer("cpu_counter", torch.arange(10))
    expected = cpu_state(model)
    with CheckpointManager(os.fspath(tmp_path), "gpu-mixed") as mgr:
        mgr.save_agent(model, 0)
        mgr.wait()
        state = mgr.load_agent(0).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
