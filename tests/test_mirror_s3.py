"""A mirror in a real bucket (moto on loopback): refused when unusable, failures reported, a killed upload repaired.

Faults come from tests/faulty_s3.py (moto's own app behind a fault layer, in this process); the
SIGKILL test kills a child writer while the server, outside it, holds one of its requests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bgsave
from bgsave import CheckpointManager, MirrorError, RetryPolicy
from bgsave import sidecar as sidecar_schema
from faulty_s3 import FaultyS3
from test_mirror import listings

s3fs = pytest.importorskip("s3fs")

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_client_retries")]

FAST = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.05)
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def bucket(s3_endpoint: str, faulty: FaultyS3) -> str:
    faulty.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"mirror-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(name)
    return name


def through(faulty: FaultyS3) -> dict[str, Any]:
    """mirror_storage_options reaching the bucket through the faulty endpoint, one HTTP attempt per request."""
    return {
        "client_kwargs": {"endpoint_url": faulty.endpoint},
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
    }


def names(clean: Any, url: str) -> set[str]:
    try:
        return {k.rsplit("/", 1)[-1] for k in clean.ls(url.removeprefix("s3://") + "/checkpoints", refresh=True)}
    except FileNotFoundError:
        return set()


def uploads(clean: Any, bucket: str) -> list[Any]:
    return list(clean.list_multipart_uploads(bucket))


class Big(nn.Module):
    """About 13 MB of float32: two 8 MiB parts and a bit."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.layer = nn.Linear(1800, 1800)
        torch.manual_seed(seed)
        nn.init.normal_(self.layer.weight)


def test_a_mirror_in_a_missing_bucket_is_refused_at_construction(local_run_dir: str, s3_endpoint: str) -> None:
    """No such bucket: MirrorError naming the URL, before anything is written."""
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs/exp"
    with pytest.raises(MirrorError, match=url) as caught:
        CheckpointManager(local_run_dir, "exp", mirror=url)
    assert caught.value.url == url
    assert not os.path.exists(os.path.join(local_run_dir, "checkpoints"))


def test_a_mirror_that_denies_listing_is_refused_at_construction(
    local_run_dir: str, bucket: str, faulty: FaultyS3
) -> None:
    """Access denied on listing the mirror: MirrorError naming the URL at construction, nothing written."""
    url = f"s3://{bucket}/runs/exp"
    faulty.fail("ListObjectsV2", "403")
    with pytest.raises(MirrorError, match=url):
        CheckpointManager(local_run_dir, "exp", mirror=url, mirror_storage_options=through(faulty), retry=FAST)
    assert not os.path.exists(os.path.join(local_run_dir, "checkpoints"))


def test_a_mirror_that_denies_writes_is_refused_at_the_first_save(
    local_run_dir: str, bucket: str, faulty: FaultyS3
) -> None:
    """Access denied on the mirror's lock: the first save raises MirrorError naming the URL."""
    url = f"s3://{bucket}/runs/exp"
    faulty.fail("PutObject", "403", key=".bgsave-writer.lock")
    mgr = CheckpointManager(local_run_dir, "exp", mirror=url, mirror_storage_options=through(faulty), retry=FAST)
    with pytest.raises(MirrorError, match=url):
        mgr.start_run(Big)
    mgr.close()


def test_persistent_5xx_fails_the_upload_keeps_the_local_commit_and_leaves_no_upload(
    local_run_dir: str, bucket: str, faulty: FaultyS3, clean: Any
) -> None:
    """Every part answered 500: wait() raises MirrorError (URL, epoch); the local checkpoint loads; no MPU left."""
    url = f"s3://{bucket}/runs/exp"
    mgr = CheckpointManager(local_run_dir, "exp", mirror=url, mirror_storage_options=through(faulty), retry=FAST)
    faulty.fail("UploadPart", "500")
    mgr.save_agent(Big(seed=1), 1)
    with pytest.raises(MirrorError) as caught:
        mgr.wait()
    assert caught.value.epoch == 1 and url in str(caught.value)
    assert torch.equal(mgr.load_agent(1).layer.weight, Big(seed=1).layer.weight)
    mgr.close()
    assert not {"model_0001.pt", "model_0001.yaml"} & names(clean, url)
    assert uploads(clean, bucket) == []


def test_a_transient_part_fault_is_retried_alone(local_run_dir: str, bucket: str, faulty: FaultyS3, clean: Any) -> None:
    """One 503 on one part: that part goes again, the checkpoint is mirrored intact."""
    url = f"s3://{bucket}/runs/exp"
    faulty.fail("UploadPart", "503", times=1, key="model_0001.pt")
    with CheckpointManager(local_run_dir, "exp", mirror=url, mirror_storage_options=through(faulty), retry=FAST) as mgr:
        mgr.save_agent(Big(seed=1), 1)
        mgr.wait()
    parts = faulty.count("UploadPart", faulted=False, key="model_0001.pt")
    assert faulty.count("UploadPart", key="model_0001.pt") == parts + 1
    with clean.open(f"{url}/checkpoints/model_0001.pt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=False).layer.weight, Big(seed=1).layer.weight)


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_mirror_s3 import Big
from bgsave import CheckpointManager
options = {{"client_kwargs": {{"endpoint_url": {endpoint!r}}}}}
mgr = CheckpointManager({run_dir!r}, "exp", mirror={url!r}, mirror_storage_options=options)
mgr.save_agent(Big(seed=1), 1)
print("saved", flush=True)
mgr.wait()
"""


@pytest.mark.parametrize(
    ("op", "key"), [("UploadPart", "model_0001.pt"), ("PutObject", "model_0001.yaml")], ids=["mid-part", "pre-sidecar"]
)
def test_sigkill_during_an_upload_is_repaired_by_the_next_writer(
    local_run_dir: str, bucket: str, faulty: FaultyS3, clean: Any, s3_endpoint: str, op: str, key: str
) -> None:
    """A writer killed mid-upload: the bucket never shows epoch 1 without its weights; the next writer
    aborts the multipart upload, removes what has no sidecar, and uploads epoch 1 again."""
    url = f"s3://{bucket}/runs/exp"
    faulty.fail(op, "hold", key=key)
    code = _CHILD.format(tests=str(TESTS), endpoint=faulty.endpoint, run_dir=local_run_dir, url=url)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.DEVNULL)
    try:
        assert faulty.wait_for(op, 1, timeout=60, key=key), "the child's upload never reached the held request"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        faulty.clear()
        faulty.release("reset")  # the killed writer's request never completes
    left = names(clean, url)
    assert "model_0001.yaml" not in left
    assert ("model_0001.pt" in left) == (op == "PutObject")  # weights without a sidecar: not committed
    assert bool(uploads(clean, bucket)) == (op == "UploadPart")
    with CheckpointManager(local_run_dir, "exp", mirror=url, mirror_storage_options=through(faulty)) as mgr:
        start = mgr.start_run(Big)
        assert start.epoch == 1  # from the local commit, which the kill did not touch
        mgr.wait()
        assert [(s.epoch, s.state) for s in mgr.mirror_status()] == [(1, "mirrored")]
    assert {"model_0001.pt", "model_0001.yaml"} <= names(clean, url)
    assert uploads(clean, bucket) == []
    with clean.open(f"{url}/checkpoints/model_0001.pt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=False).layer.weight, Big(seed=1).layer.weight)


def test_a_fresh_node_finds_the_latest_past_a_thousand_keys(tmp_path: Any, bucket: str, faulty: FaultyS3) -> None:
    """1,010 keys in the mirror (put straight into moto's store, fast): the construction's checks do not list
    them all, the listing is paginated, the newest epoch (second page) is found and loaded; a start lists each
    tier once."""
    from moto.core import DEFAULT_ACCOUNT_ID  # type: ignore[attr-defined]
    from moto.s3.models import s3_backends

    url = f"s3://{bucket}/runs/exp"
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    path = str(tmp_path / "newest.pt")
    torch.save(Big(seed=5), path)
    for epoch in range(505):
        data = Path(path).read_bytes() if epoch == 504 else b"not loaded"
        store.put_object(bucket, f"runs/exp/checkpoints/model_{epoch:04d}.pt", data)
        sidecar = sidecar_schema.dumps(sidecar_schema.build("exp", epoch, {"score": epoch}))
        store.put_object(bucket, f"runs/exp/checkpoints/model_{epoch:04d}.yaml", sidecar)
    with CheckpointManager(str(tmp_path / "fresh"), "exp", mirror=url, mirror_storage_options=through(faulty)) as mgr:
        assert faulty.count("ListObjectsV2") == 2  # the checks (the root, may it be listed) ask a key each
        assert mgr.find_latest_checkpoint() == f"{url}/checkpoints/model_0504.pt"
        assert faulty.count("ListObjectsV2") == 4  # two pages
        assert torch.equal(mgr.load_agent().layer.weight, Big(seed=5).layer.weight)
        counts = listings(mgr)
        assert mgr.start_run(Big).epoch == 504
        assert counts == {"local": 1, "mirror": 1}  # the claim's listing (two pages) is the resume's
    assert bgsave.find_latest_checkpoint(url) == f"{url}/checkpoints/model_0504.pt"
