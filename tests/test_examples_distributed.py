"""The DDP example under torchrun, as a user runs it: two gloo ranks, interrupted, resumed, files that load anywhere."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _scripts import ROOT
from bgsave import CheckpointManager, load_checkpoint

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed"),
]

# Epochs 0, 2, 4 are saved; the interruption after epoch 3 loses epoch 3, trained again after the resume.
ARGS = ("--epochs", "4", "--save-every", "2", "--print-digest")
PER_EPOCH = (("model", "pt"), ("model", "yaml"), ("trainer", "pt"))


def torchrun(run_dir: Path, *args: str) -> str:
    """``torchrun --standalone --nproc-per-node 2 examples/train_ddp.py`` from the repository root; its stdout.

    The deadline turns a hang (a rank stuck in a collective) into a failure with both outputs; the
    whole process group goes then, the ranks with torchrun.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["examples/train_ddp.py", "--run-dir", str(run_dir), *ARGS, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, even on a machine with GPUs
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 150 s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return stdout


def digest_of(out: str) -> str:
    match = re.search(r"^digest sha256:([0-9a-f]{64})$", out, re.M)
    assert match is not None, out
    return match[1]


def digest(policy: torch.nn.Module) -> str:
    """examples/train_rl.py's digest: sha256 of the state dict's names and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in policy.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_interrupted_ddp_run_resumes_to_the_same_weights_and_its_files_load_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after epoch 3, resumed from 2: the uninterrupted run's digest; the files load with no process group."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    out_straight = torchrun(straight, "--stop-after", "0")
    out = torchrun(interrupted, "--stop-after", "3")
    assert "resumed from" not in out_straight
    assert "-- stopped after epoch 3 --" in out
    assert "resumed from epoch 2" in out
    assert len(re.findall(r"^epoch +3 ", out, re.M)) == 2  # lost with the interruption, trained again
    assert digest_of(out) == digest_of(out_straight)

    # Rank 0 wrote every file, and only whole epochs: no temp file, no lock left behind.
    names = {p.name for p in (interrupted / "checkpoints").iterdir()}
    assert names == {f"{kind}_{e:04d}.{ext}" for e in (0, 2, 4) for kind, ext in PER_EPOCH}
    assert not (interrupted / ".bgsave-writer.lock").exists()

    # Outside any process group (this test process has none), with plain torch.load.
    assert not torch.distributed.is_initialized()
    monkeypatch.syspath_prepend(os.fspath(ROOT / "examples"))  # the policy's class lives in examples/agents.py
    policy = torch.load(interrupted / "checkpoints" / "model_0004.pt", weights_only=False)
    assert type(policy).__name__ == "Policy"  # the module itself, not its DDP wrapper
    assert digest(policy) == digest_of(out)
    assert digest(load_checkpoint(os.fspath(straight / "checkpoints" / "model_0004.pt"))) == digest(policy)
    trainer = torch.load(interrupted / "checkpoints" / "trainer_0004.pt", weights_only=False)
    assert trainer["epoch"] == 4 and trainer["optimizer_state"]["state"] and "rng" in trainer
    with CheckpointManager(interrupted, interrupted.name) as mgr:
        (info,) = [i for i in mgr.checkpoints() if i.epoch == 4]
    assert info.sidecar["world_size"] == 2
    assert info.sidecar["score"] is not None
