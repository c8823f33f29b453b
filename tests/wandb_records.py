"""Read the records of an offline W&B run (``offline-run-*/run-*.wandb``), for asserting what was logged.

wandb 0.31 no longer ships a Python reader (the Go service writes the file), so this reads the format
itself: leveldb's log format (https://github.com/google/leveldb/blob/main/doc/log_format.md) behind a
7-byte header ``":W&B"``, magic 0xBEE1, version. The file is cut into 32 KiB blocks; each chunk has
a 7-byte header (CRC-32 of type byte + data, little-endian length, type FULL/FIRST/MIDDLE/LAST) and a
block's last < 7 bytes are zero padding. Each reassembled record is a ``wandb_internal_pb2.Record``.

``run.finish()`` returns before W&B's service process has written the offline file (it was seen
holding only its header right after ``finish()``), so :func:`artifact_records` first waits, up to a
deadline, for every run file to end with its ``exit`` record, the last one W&B writes.
"""

from __future__ import annotations

import glob
import os
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def run_files(wandb_dir: str) -> list[str]:
    """The ``.wandb`` files of the offline runs under ``wandb_dir`` (WANDB_DIR)."""
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")))


def _payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, _version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"not a W&B run file (header {data[: _HEADER.size]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding after the last record
            pos += left
            continue
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"corrupt chunk at offset {pos}")
        pos += _CHUNK.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"unknown chunk type {kind} at offset {pos}")


def read_records(path: str) -> list[Any]:
    """Every record in one ``.wandb`` file, parsed as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    records = []
    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(payload)
        records.append(record)
    return records


def finished_records(wandb_dir: str, timeout: float = 30.0) -> list[Any]:
    """Every record of the finished offline runs under ``wandb_dir``, once each file holds its ``exit`` record.

    Raises:
        TimeoutError: a run file is still incomplete after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        paths = run_files(wandb_dir)
        try:
            runs = [read_records(path) for path in paths]
        except (ValueError, struct.error):  # a chunk being written
            runs = []
        if paths and len(runs) == len(paths) and all(_kinds(r)[-1:] == ["exit"] for r in runs):
            return [record for records in runs for record in records]
        if time.monotonic() > deadline:
            raise TimeoutError(f"W&B did not finish writing the run files under {wandb_dir} in {timeout}s")
        time.sleep(0.02)  # polling another process's file: there is no event to wait on


def _kinds(records: list[Any]) -> list[str]:
    return [record.WhichOneof("record_type") for record in records]


def artifact_records(wandb_dir: str, timeout: float = 30.0) -> list[Any]:
    """The ``ArtifactRecord``s logged by the finished offline runs under ``wandb_dir``, in order."""
    return [
        record.artifact
        for record in finished_records(wandb_dir, timeout)
        if record.WhichOneof("record_type") == "artifact"
    ]
