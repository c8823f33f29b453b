"""Shared fixtures: run directories on each backend, a real S3 server on loopback, W&B offline dirs."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pytest

if TYPE_CHECKING:
    from faulty_s3 import FaultyS3


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--ranks4``: also run the slow 4-rank torch.distributed test (or set BGSAVE_RANKS4=1)."""
    parser.addoption(
        "--ranks4", action="store_true", default=False, help="run the 4-rank torch.distributed test (slow)"
    )


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto's threaded server) on 127.0.0.1, with dummy credentials in the environment."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_run_dir(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>/runs/test`` on the loopback server; s3fs's instance cache cleared."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bgsave-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(bucket)
    return f"s3://{bucket}/runs/test"


@pytest.fixture(scope="session")
def faulty(s3_endpoint: str) -> Iterator[FaultyS3]:
    """A fault-injecting endpoint (tests/faulty_s3.py) serving the same moto state as ``s3_endpoint``."""
    from faulty_s3 import FaultyS3

    with FaultyS3() as server:
        yield server


@pytest.fixture
def no_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3fs does not retry on its own: each fault meets bgsave's retry policy directly."""
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


@pytest.fixture
def clean(s3_endpoint: str) -> Any:
    """A filesystem on the clean endpoint, uncached, to inspect what the bucket really holds."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True, use_listings_cache=False
    )


@pytest.fixture
def memory_run_dir() -> Iterator[str]:
    """A fresh ``memory://`` run directory; the global memory store is cleared afterwards."""
    path = f"memory://bgsave-{uuid.uuid4().hex[:12]}/run"
    yield path
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def local_run_dir(tmp_path: os.PathLike[str]) -> str:
    """A run directory on local disk that does not exist yet."""
    return os.path.join(os.fspath(tmp_path), "run")


@pytest.fixture(params=["local", "memory"])
def run_dir(request: pytest.FixtureRequest) -> str:
    """Local disk and ``memory://``: the cheap backends, for semantics that must hold everywhere."""
    path: str = request.getfixturevalue(f"{request.param}_run_dir")
    return path


@pytest.fixture(params=["local", "memory", "s3"])
def any_run_dir(request: pytest.FixtureRequest) -> str:
    """The same test on local disk, ``memory://`` and the loopback S3 server."""
    name = {"local": "local_run_dir", "memory": "memory_run_dir", "s3": "s3_run_dir"}[request.param]
    run_dir: str = request.getfixturevalue(name)
    return run_dir


@pytest.fixture
def wandb_dirs(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Every W&B directory under the test's tmp dir, offline mode; returns WANDB_DIR."""
    root = os.path.join(os.fspath(tmp_path), "wandb")
    for var, sub in [
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
    ]:
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        monkeypatch.setenv(var, path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return root
