"""bgsave.wandb against the real wandb in offline mode: what the run's .wandb file records.

``mode="disabled"`` would hand back no-op objects, so every run here is a real offline run whose
directories all live under the test's tmp dir (the ``wandb_dirs`` fixture); the assertions read the
records W&B wrote (see ``wandb_records``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from bgsave import sidecar as sidecar_schema
from bgsave.errors import CheckpointError, InvalidArgumentError
from bgsave.policies import EveryNth
from bgsave.wandb import (
    WandbUploadError,
    artifact_name,
    epoch_alias,
    require_wandb,
    upload_to_wandb,
)
from wandb_records import artifact_records

wandb = pytest.importorskip("wandb")


@pytest.fixture
def wandb_run(wandb_dirs: str) -> Iterator[Any]:
    """A real offline W&B run named ``ppo run/1:a`` (finished at teardown if the test did not)."""
    run = wandb.init(project="bgsave-tests", dir=wandb_dirs, name="ppo run/1:a")
    yield run
    run.finish()


def save_model(path: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    torch.save(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)), path)
    return path


def md5_b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(hashlib.md5(f.read()).digest()).decode()


def test_local_checkpoint_logged_as_model_artifact(wandb_run: Any, wandb_dirs: str, tmp_path: Any) -> None:
    """A local checkpoint becomes a "model" artifact named after the run, with the sidecar and both aliases."""
    path = save_model(os.path.join(tmp_path, "model_0010.pt"))
    sidecar = sidecar_schema.build(
        "ppo run/1:a", 10, {"agent_step": 40960, "score": 0.82, "avg_reward": 1.5, "seed": 3}
    )

    upload_to_wandb(wandb_run, path, 10, metadata=sidecar)
    wandb_run.finish()

    [record] = artifact_records(wandb_dirs)
    assert record.name == "ppo-run-1-a"  # the W&B run's name, cleaned
    assert record.type == "model"
    assert sorted(record.aliases) == ["epoch_0010", "latest"]
    assert json.loads(record.metadata) == sidecar
    [entry] = record.manifest.contents
    assert entry.path == "model_0010.pt"
    assert entry.size == os.path.getsize(path)
    assert entry.digest == md5_b64(path)
    # policy="immutable": the manifest points at the checkpoint itself, no staged copy was made.
    assert entry.local_path == path
    staged = [f for _, _, files in os.walk(os.path.join(wandb_dirs, "data")) for f in files]
    assert staged == []


def test_each_checkpoint_is_a_new_version_with_json_safe_metadata(
    wandb_run: Any, wandb_dirs: str, tmp_path: Any
) -> None:
    """Two epochs give two versions of one artifact (named from run_name); a NaN score is stored as "nan".

    The uploads run on a background thread, as bgsave's worker runs them.
    """
    first = save_model(os.path.join(tmp_path, "model_0000.pt"), seed=0)
    second = save_model(os.path.join(tmp_path, "model_0010.pt"), seed=1)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(upload_to_wandb, wandb_run, first, 0, run_name="exp1").result(timeout=60)
        meta = {"score": math.nan, "total_time": 5.0}
        pool.submit(upload_to_wandb, wandb_run, second, 10, metadata=meta, run_name="exp1").result(timeout=60)
    wandb_run.finish()

    records = artifact_records(wandb_dirs)
    assert [r.name for r in records] == ["exp1", "exp1"]
    assert [sorted(r.aliases) for r in records] == [["epoch_0000", "latest"], ["epoch_0010", "latest"]]
    assert json.loads(records[0].metadata) == {"epoch": 0}
    assert json.loads(records[1].metadata) == {"epoch": 10, "score": "nan", "total_time": 5.0}
    assert [r.manifest.contents[0].digest for r in records] == [md5_b64(first), md5_b64(second)]


@pytest.mark.timeout(60)
def test_bucket_checkpoint_added_as_reference(wandb_run: Any, wandb_dirs: str, s3_run_dir: str) -> None:
    """An s3:// checkpoint is recorded as a reference (URI, ETag, size), not downloaded; a missing key fails."""
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"{s3_run_dir}/checkpoints/model_0020.pt"
    data = b"x" * 4096
    fs.pipe_file(url, data)

    upload_to_wandb(wandb_run, url, 20, metadata={"epoch": 20, "run": "exp1"}, run_name="exp1")
    with pytest.raises(WandbUploadError, match=r"model_0030\.pt"):
        upload_to_wandb(wandb_run, f"{s3_run_dir}/checkpoints/model_0030.pt", 30, run_name="exp1")
    wandb_run.finish()

    [record] = artifact_records(wandb_dirs)
    assert sorted(record.aliases) == ["epoch_0020", "latest"]
    [entry] = record.manifest.contents
    assert (entry.path, entry.ref, entry.size) == ("model_0020.pt", url, len(data))
    assert entry.digest == hashlib.md5(data).hexdigest()  # the ETag of a single-part upload
    assert not entry.local_path


def test_upload_to_finished_run_raises_clear_error(wandb_run: Any, wandb_dirs: str, tmp_path: Any) -> None:
    """Logging to a finished run raises WandbUploadError naming the epoch and file, W&B's error chained."""
    path = save_model(os.path.join(tmp_path, "model_0005.pt"))
    wandb_run.finish()

    with pytest.raises(WandbUploadError, match=r"epoch 5 .*model_0005\.pt.*is finished") as info:
        upload_to_wandb(wandb_run, path, 5)

    assert isinstance(info.value, CheckpointError)
    assert (info.value.epoch, info.value.path) == (5, path)
    assert isinstance(info.value.__cause__, wandb.errors.UsageError)
    assert artifact_records(wandb_dirs) == []


def test_missing_local_file_raises_clear_error(wandb_run: Any, tmp_path: Any) -> None:
    """A checkpoint path that is not a file raises WandbUploadError; the run stays usable."""
    missing = os.path.join(tmp_path, "model_0001.pt")
    with pytest.raises(WandbUploadError, match=r"model_0001\.pt.*not a file"):
        upload_to_wandb(wandb_run, missing, 1)
    upload_to_wandb(wandb_run, save_model(missing), 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epoch": -1}, "epoch must be a non-negative int"),
        ({"path": ""}, "path must be a non-empty path or URL"),
        ({"metadata": [("score", 1.0)]}, "metadata must be a mapping"),
        ({"run_name": 3}, "run_name must be a string"),
    ],
)
def test_bad_arguments_rejected_before_logging(
    wandb_run: Any, tmp_path: Any, kwargs: dict[str, Any], match: str
) -> None:
    """Bad arguments raise InvalidArgumentError naming the argument."""
    call: dict[str, Any] = {"wandb_run": wandb_run, "path": os.path.join(tmp_path, "m.pt"), "epoch": 1, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        upload_to_wandb(**call)


def test_missing_wandb_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Without wandb importable, the ImportError says pip install 'bgsave[wandb]'."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match=r"pip install 'bgsave\[wandb\]'"):
        require_wandb()
    with pytest.raises(ImportError, match=r"pip install 'bgsave\[wandb\]'"):
        upload_to_wandb(object(), os.path.join(tmp_path, "m.pt"), 1)


def test_importing_bgsave_does_not_import_wandb() -> None:
    """bgsave and bgsave.wandb import without importing wandb (it costs about a second)."""
    code = "import sys, bgsave, bgsave.wandb; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_every_nth_checkpoint_starting_with_the_first() -> None:
    """EveryNth counts committed checkpoints from 0: the 1st, (N+1)-th, ... are uploaded."""
    assert [i for i in range(10) if EveryNth(3).due(i)] == [0, 3, 6, 9]
    assert all(EveryNth(1).due(i) for i in range(5))
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(InvalidArgumentError, match="wandb_every_n must be an int >= 1"):
            EveryNth(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="index must be an int >= 0"):
        EveryNth(2).due(-1)


def test_names_and_aliases() -> None:
    """Artifact names keep only W&B's allowed characters (128 at most); the epoch alias is zero-padded."""
    assert artifact_name("ppo run/seed:1") == "ppo-run-seed-1"
    assert artifact_name("exp_1.v2-b") == "exp_1.v2-b"
    assert len(artifact_name("x" * 300)) == 128
    with pytest.raises(InvalidArgumentError):
        artifact_name("")
    assert (epoch_alias(10), epoch_alias(12345)) == ("epoch_0010", "epoch_12345")
