"""S3 faults: the real moto server behind a layer that fails chosen requests (tests/faulty_s3.py).

What a user would check after each fault: the checkpoint landed whole, or the error reached the
caller naming the epoch and URL with nothing left behind (no object, no unfinished multipart
upload) and the earlier checkpoints still loading. Retries are made fast here: bgsave's backoff is
patched down and the client libraries' own retries are switched off, so each fault meets bgsave's
policy directly.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest
import torch

import bgsave
import bgsave.storage
from bgsave.storage import RetryPolicy, open_storage
from faulty_s3 import FaultyS3
from test_storage_contract import Policy, same_state

s3fs = pytest.importorskip("s3fs")

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_client_retries")]

MiB = 2**20
FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
# An object of one part (8 MiB) is a single PUT; faults on the multipart steps need a larger agent.
MULTIPART_OPS = {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}
BIG_WIDTH = 1500  # ~9 MB of weights: two parts


@pytest.fixture
def run_dir(s3_run_dir: str, faulty: FaultyS3) -> str:
    """A fresh bucket's run directory; no faults armed, no requests recorded."""
    faulty.clear()
    return s3_run_dir


@pytest.fixture
def options(faulty: FaultyS3) -> dict[str, Any]:
    """storage_options that reach the bucket through the faulty endpoint, one HTTP attempt per request."""
    return {
        "client_kwargs": {"endpoint_url": faulty.endpoint},
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
    }


def bucket_of(run_dir: str) -> str:
    return run_dir.removeprefix("s3://").split("/", 1)[0]


def causes(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__
    return out


def keys(clean: Any, run_dir: str) -> set[str]:
    """Checkpoint objects in the run's bucket (dot files, such as the writer lock, left out)."""
    prefix = run_dir.removeprefix("s3://") + "/checkpoints"
    try:
        names = {k.rsplit("/", 1)[-1] for k in clean.ls(prefix, refresh=True)}
    except FileNotFoundError:
        return set()
    return {n for n in names if not n.startswith(".")}


# ---- transient faults: retried, the checkpoint lands --------------------------------------
@pytest.mark.parametrize(
    ("op", "action"),
    [
        ("CreateMultipartUpload", "503"),
        ("UploadPart", "500"),
        ("UploadPart", "reset"),
        ("CompleteMultipartUpload", "503"),
        ("PutObject", "503"),  # the sidecar
        ("PutObject", "reset"),
    ],
)
def test_transient_faults_are_retried_and_the_checkpoint_lands(
    run_dir: str,
    options: dict[str, Any],
    faulty: FaultyS3,
    clean: Any,
    caplog: pytest.LogCaptureFixture,
    op: str,
    action: str,
) -> None:
    """Two transient faults on one upload step: the save still commits, intact, with retries logged."""
    agent = Policy(width=BIG_WIDTH if op in MULTIPART_OPS else 16, seed=7)
    faulty.fail(op, action, times=2, key="model_0001")
    with (
        caplog.at_level(logging.WARNING, logger="bgsave.storage"),
        bgsave.CheckpointManager(run_dir, "transient", storage_options=options, retry=FAST) as mgr,
    ):
        url = mgr.save_agent(agent, 1, {"agent_step": 10, "score": 0.5})
        mgr.wait()
        assert faulty.count(op, faulted=True) == 2
        assert mgr.find_latest_checkpoint() == url
        assert same_state(mgr.load_agent(), agent)
    assert keys(clean, run_dir) == {"model_0001.pt", "model_0001.yaml"}
    assert clean.list_multipart_uploads(bucket_of(run_dir)) == []
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    if (op, action) != ("UploadPart", "reset"):  # parts in parallel: aiohttp resends each dropped PUT once itself
        assert retries, "each retry is logged"
    assert all(run_dir in m and "attempt" in m for m in retries)
    assert "testing" not in caplog.text  # the dummy credentials never reach the log


# ---- persistent faults: the error reaches the caller, nothing is left ----------------------
@pytest.mark.parametrize("action", ["503", "500", "reset"])
def test_persistent_faults_fail_the_save_and_leave_nothing(
    run_dir: str, options: dict[str, Any], faulty: FaultyS3, clean: Any, action: str
) -> None:
    """Every part upload of epoch 2 fails: wait() raises naming epoch and URL; epoch 1 still loads."""
    first = Policy(seed=1)
    with bgsave.CheckpointManager(run_dir, "persistent", storage_options=options, retry=FAST) as mgr:
        mgr.save_agent(first, 1, {"agent_step": 10})
        mgr.wait()
        faulty.fail("UploadPart", action, key="model_0002")
        url = mgr.save_agent(Policy(width=BIG_WIDTH, seed=2), 2, {"agent_step": 20})
        with pytest.raises(bgsave.CheckpointWriteError) as info:
            mgr.wait()
        error = info.value
        assert error.epoch == 2
        assert error.path == url
        assert "epoch 2" in str(error) and url in str(error)
        assert "after 3 attempts" in str(error)
        assert isinstance(error.__cause__, OSError) and url in str(error.__cause__)
        # The failing part was retried alone, FAST.attempts times; that is final: no restart of the file.
        assert faulty.count("CreateMultipartUpload", key="model_0002.pt") == 1

        faulty.clear()
        assert keys(clean, run_dir) == {"model_0001.pt", "model_0001.yaml"}
        assert clean.list_multipart_uploads(bucket_of(run_dir)) == []
        assert mgr.find_latest_checkpoint() is not None
        assert same_state(mgr.load_agent(), first)
        assert same_state(bgsave.load_checkpoint(mgr.find_latest_checkpoint() or "", storage_options=options), first)


def test_an_outage_on_every_request_leaves_the_earlier_checkpoint(
    run_dir: str, options: dict[str, Any], faulty: FaultyS3, clean: Any
) -> None:
    """Every request touching epoch 2's keys fails: the error reaches wait(), epoch 1 is untouched."""
    first = Policy(seed=1)
    with bgsave.CheckpointManager(run_dir, "outage", storage_options=options, retry=FAST) as mgr:
        mgr.save_agent(first, 1, {"agent_step": 10})
        mgr.wait()
        faulty.fail("*", "503", key="model_0002")
        url = mgr.save_agent(Policy(seed=2), 2, {"agent_step": 20})
        with pytest.raises(bgsave.CheckpointWriteError) as info:
            mgr.wait()
        assert info.value.epoch == 2 and url in str(info.value)
        faulty.clear()
        assert keys(clean, run_dir) == {"model_0001.pt", "model_0001.yaml"}
        assert clean.list_multipart_uploads(bucket_of(run_dir)) == []
        assert same_state(mgr.load_agent(), first)


def test_the_upload_error_reaches_the_caller_when_cleanup_fails_too(
    run_dir: str, options: dict[str, Any], faulty: FaultyS3
) -> None:
    """When the .pt upload fails and so does deleting it afterwards, wait() reports the upload failure."""
    with bgsave.CheckpointManager(run_dir, "cleanup", storage_options=options, retry=FAST) as mgr:
        mgr.save_agent(Policy(seed=1), 1, {"agent_step": 10})
        mgr.wait()
        faulty.fail("UploadPart", "503", key="model_0002.pt")
        faulty.fail("DeleteObject", "503", key="model_0002.pt")
        mgr.save_agent(Policy(width=BIG_WIDTH, seed=2), 2, {"agent_step": 20})
        with pytest.raises(bgsave.CheckpointWriteError) as info:
            mgr.wait()
        faulty.clear()
        assert "writing" in str(info.value.__cause__), info.value


def test_a_failed_abort_is_retried(run_dir: str, options: dict[str, Any], faulty: FaultyS3, clean: Any) -> None:
    """When aborting the failed upload itself fails once, it is retried: no multipart upload leaks."""
    storage = open_storage(run_dir, options, retry=FAST)
    faulty.fail("UploadPart", "503")
    faulty.fail("AbortMultipartUpload", "503", times=1)
    with pytest.raises(OSError, match="after 3 attempts"):
        storage.write_bytes_atomic(storage.join("big.bin"), b"x" * 17 * MiB)
    assert faulty.count("AbortMultipartUpload", faulted=True) == 1
    assert faulty.count("AbortMultipartUpload", faulted=False) == 1  # one upload: its parts' retries are final
    assert clean.list_multipart_uploads(bucket_of(run_dir)) == []
    assert not clean.exists(storage.join("big.bin"))


# ---- permanent faults: no retries ---------------------------------------------------------
def test_access_denied_fails_at_once(
    run_dir: str, options: dict[str, Any], faulty: FaultyS3, clean: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 on the upload is not retried (the long backoff set here is never waited) and names the URL."""
    faulty.fail("CreateMultipartUpload", "403", key="model_0003")
    faulty.fail("PutObject", "403", key="model_0003")
    slow = RetryPolicy(attempts=5, initial_delay=20.0)
    with bgsave.CheckpointManager(run_dir, "denied", storage_options=options, retry=slow) as mgr:
        started = time.monotonic()
        url = mgr.save_agent(Policy(), 3, {"agent_step": 30})
        with pytest.raises(bgsave.CheckpointWriteError) as info:
            mgr.wait()
        assert time.monotonic() - started < 10
        assert info.value.epoch == 3
        cause = info.value.__cause__
        assert isinstance(cause, PermissionError)
        assert url in str(cause)
        assert "AccessDenied" in " ".join(repr(e) for e in causes(cause))
        assert faulty.count(faulted=True) == 1
        faulty.clear()
    assert keys(clean, run_dir) == set()
    assert clean.list_multipart_uploads(bucket_of(run_dir)) == []


def test_a_missing_bucket_fails_at_once(options: dict[str, Any], faulty: FaultyS3) -> None:
    """Writing into a bucket that does not exist fails at once with FileNotFoundError naming the URL."""
    faulty.clear()
    storage = open_storage("s3://bgsave-no-such-bucket/run", options, retry=RetryPolicy(attempts=5, initial_delay=20.0))
    storage.makedirs(storage.join("checkpoints"))  # never creates the bucket
    url = "s3://bgsave-no-such-bucket/run/model_0001.pt"
    with pytest.raises(FileNotFoundError, match=url):
        storage.write_atomic(storage.join("model_0001.pt"), lambda f: torch.save(Policy(), f))
    assert faulty.count(faulted=False) == faulty.count() >= 1
    assert faulty.count("CreateBucket") == 0
    assert faulty.count(["CreateMultipartUpload", "PutObject", "UploadPart"]) == 1


# ---- reading: retried, and in few requests ------------------------------------------------
def test_reads_retry_transient_faults(run_dir: str, options: dict[str, Any], faulty: FaultyS3) -> None:
    """Listing, a sidecar batch, a whole file and a streamed torch.load all survive transient faults."""
    storage = open_storage(run_dir, options, retry=FAST)
    agent = Policy(seed=3)
    pt = storage.join("model.pt")
    storage.write_atomic(pt, lambda f: torch.save(agent, f))
    sidecars = [storage.join(f"s{i}.yaml") for i in range(3)]
    for i, p in enumerate(sidecars):
        storage.write_bytes_atomic(p, b"epoch: %d\n" % i)
    faulty.clear()

    faulty.fail("ListObjectsV2", "503", times=2)
    assert set(storage.list_files(storage.root)) == {"model.pt", "s0.yaml", "s1.yaml", "s2.yaml"}
    faulty.fail("GetObject", "reset", times=2, key="s1.yaml")
    assert storage.read_many(sidecars) == {p: b"epoch: %d\n" % i for i, p in enumerate(sidecars)}
    faulty.fail("GetObject", "500", times=2, key="model.pt")
    assert len(storage.read_bytes(pt)) == storage.list_files(storage.root)["model.pt"].size
    faulty.fail("GetObject", "503", times=2, key="model.pt")
    assert same_state(storage.read_with(pt, lambda f: torch.load(f, weights_only=False)), agent)
    assert faulty.count(faulted=True) == 8


def test_reading_a_run_costs_few_requests(run_dir: str, options: dict[str, Any], faulty: FaultyS3) -> None:
    """The writing manager finds its latest in one listing and no GET; a fresh reader in one listing and one GET.

    Listing everything reads each sidecar once, in a batch; a large .pt loads in 32 MiB reads.
    """
    with bgsave.CheckpointManager(run_dir, "requests", storage_options=options, retry=FAST) as mgr:
        for epoch in (1, 2, 3):
            mgr.save_agent(Policy(seed=epoch), epoch, {"agent_step": epoch, "score": float(epoch)})
        big = torch.nn.Linear(2600, 2600)  # ~27 MB of weights
        mgr.save_agent(big, 4, {"agent_step": 4})
        mgr.wait()
        faulty.clear()
        latest = mgr.find_latest_checkpoint()
        assert latest is not None and latest.endswith("model_0004.pt")
        assert faulty.count("ListObjectsV2") == 1
        assert faulty.count("GetObject") == 0  # it knows the sidecars it wrote
        assert faulty.count("HeadObject") == 0

        reader = bgsave.CheckpointManager(run_dir, "requests", storage_options=options, retry=FAST)
        faulty.clear()
        assert reader.find_latest_checkpoint() == latest
        assert (faulty.count("ListObjectsV2"), faulty.count("GetObject"), faulty.count("HeadObject")) == (1, 1, 0)
        faulty.clear()
        assert [info.epoch for info in reader.checkpoints()] == [1, 2, 3, 4]
        assert (faulty.count("ListObjectsV2"), faulty.count("GetObject")) == (1, 3)  # the three it had not read
        faulty.clear()
        best = reader.find_best_checkpoint()
        assert best is not None and best.endswith("model_0003.pt")
        assert reader.find_latest_checkpoint() == latest
        assert (faulty.count("ListObjectsV2"), faulty.count("GetObject")) == (2, 0)  # each sidecar read once
        reader.close()

        faulty.clear()
        loaded = mgr.load_agent()
        assert torch.equal(loaded.weight, big.weight)
        size = next(i.size for i in mgr.checkpoints() if i.epoch == 4)
        gets = [s for s in faulty.seen if s.op == "GetObject" and s.key.endswith("model_0004.pt")]
        assert len(gets) <= math.ceil(size / (32 * MiB)) + 2, [s.range for s in gets]


# ---- what counts as transient ---------------------------------------------------------------
def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    error: Exception = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )
    return error


def _translated(status: int, code: str) -> Exception:
    """What s3fs raises: an OSError whose cause is botocore's error."""
    error = OSError(f"translated {code}")
    error.__cause__ = _client_error(status, code)
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_translated(503, "SlowDown"), True),
        (_translated(500, "InternalError"), True),
        (_translated(502, "BadGateway"), True),
        (_translated(400, "RequestTimeout"), True),
        (_translated(429, "TooManyRequests"), True),
        (_translated(501, "NotImplemented"), False),
        (_translated(403, "AccessDenied"), False),
        (_translated(404, "NoSuchBucket"), False),
        (_translated(400, "InvalidArgument"), False),
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("timed out"), True),
        (PermissionError("denied"), False),
        (FileNotFoundError("gone"), False),
        (ValueError("a bug"), False),
        (RuntimeError("unexpected pos"), False),
    ],
    ids=lambda v: v if isinstance(v, bool) else f"{type(v).__name__}:{v}",
)
def test_what_is_transient(error: Exception, transient: bool) -> None:
    """HTTP answers decide by status and code; connection and timeout errors retry; the rest do not."""
    assert bgsave.storage.is_transient(error) is transient


def test_client_library_connection_errors_are_transient() -> None:
    """botocore's and aiohttp's connection errors are recognised without importing them in bgsave."""
    from aiohttp import ServerDisconnectedError
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    assert bgsave.storage.is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert bgsave.storage.is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert bgsave.storage.is_transient(ServerDisconnectedError())
    wrapped = RuntimeError("unexpected pos 64 vs 0")  # torch.save's wrapping of a failed write
    wrapped.__context__ = ConnectionClosedError(endpoint_url="http://x")
    assert bgsave.storage.is_transient(wrapped)
