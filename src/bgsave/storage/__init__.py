"""Storage: every file operation of a run directory, through fsspec, one atomic-write strategy per backend.

A reader must never see a half-written file, whatever is killed when. How that is achieved depends on
what the backend can promise, so each backend has its module, picked by :func:`open_storage` from
the filesystem's type (as fsspec's ``implementations/``):

* :mod:`~bgsave.storage.local`: local disk. Temp file in the target's directory, fsync, rename,
  fsync of the directory; large checkpoints past the page cache (:mod:`~bgsave.storage.diskfile`).
* :mod:`~bgsave.storage.object_store`: ``s3://``, ``gs://``... One multipart upload, completed
  only once the writer returned: all-or-nothing, aborted on any error. On S3 the parts go out
  several at once, from a few event-loop threads (:mod:`~bgsave.storage.parts`,
  :mod:`~bgsave.storage.lanes`), and large reads fetch ranges in parallel (:mod:`~bgsave.storage.ranges`).
* :mod:`~bgsave.storage.piped`: anything else (``memory://``): serialized in memory, one ``pipe_file``.

Atomicity is per file. A checkpoint is two files, so the writer orders them: the ``.pt`` first, then
the YAML sidecar, which is the commit marker every reader keys on (:mod:`bgsave.catalog`). The shared
part, the retry loop above all, is :mod:`~bgsave.storage.base`. Nothing outside this package looks at
which backend it has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bgsave.errors import InvalidArgumentError, check_int
from bgsave.storage.base import FileFacts, Reader, Storage, Writer
from bgsave.storage.local import LocalStorage
from bgsave.storage.object_store import OBJECT_STORES, ObjectStorage
from bgsave.storage.piped import PipedStorage
from bgsave.storage.retry import DEFAULT_RETRY, RetryPolicy, is_transient

__all__ = ("FileFacts", "Reader", "RetryPolicy", "Storage", "Writer", "is_transient", "open_storage")


def open_storage(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    retry: RetryPolicy | None = None,
    max_concurrency: int = 8,
    argument: str = "run_dir",
) -> Storage:
    """The storage of a local path, ``file://…`` or any fsspec URL (``s3://bucket/prefix``, ``memory://…``).

    Args:
        url: Where.
        storage_options: Passed to the fsspec filesystem (endpoint, credentials, ...).
        retry: How transient errors are retried; None for 3 attempts in all, waiting 0.5 to 1 s,
            then 1 to 2 s.
        max_concurrency: Requests in flight at once for one file on S3: the parts of an upload
            (memory: up to ``max_concurrency + 1`` parts of 8 MiB) and the ranges of a read (16 MiB
            each). Beyond botocore's connection pool (``max_pool_connections``, 10 by default) more
            only queue. Other backends ignore it.
        argument: What errors call ``url`` (the manager's ``run_dir`` or ``mirror``); its options are
            ``storage_options`` or ``{argument}_storage_options``.

    Raises:
        InvalidArgumentError: the URL's protocol is unknown to fsspec or its extra is not installed,
            ``storage_options`` is not a mapping of str keys, ``retry`` is not a :class:`RetryPolicy`,
            or ``max_concurrency`` is not an int >= 1.

    Example:
        >>> storage = open_storage("s3://bucket/runs/exp1", {"anon": False})  # doctest: +SKIP
    """
    options_name = "storage_options" if argument == "run_dir" else f"{argument}_storage_options"
    if not isinstance(url, (str, os.PathLike)):
        raise InvalidArgumentError(f"{argument} must be a path or URL string, got {type(url).__name__}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidArgumentError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
    check_int("max_concurrency", max_concurrency, 1)
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise InvalidArgumentError(f"{options_name} must be a mapping or None, got {type(storage_options).__name__}")
    url = os.fspath(url)
    if not url:
        raise InvalidArgumentError(f"{argument} must be a non-empty path or URL")
    options = dict(storage_options or {})
    if not all(isinstance(key, str) for key in options):
        raise InvalidArgumentError(f"{options_name} keys must be strings, got {sorted(map(repr, options))}")
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise InvalidArgumentError(
            f"{argument} {url!r} needs an fsspec backend that is not installed ({exc}); "
            "for s3:// install 'bgsave[s3]', for gs:// 'bgsave[gcs]'"
        ) from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"{argument} {url!r} has a protocol fsspec does not know ({exc})") from exc
    except TypeError as exc:
        raise InvalidArgumentError(f"{options_name} not accepted by the filesystem: {exc}") from exc
    policy = retry if retry is not None else DEFAULT_RETRY
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(fs, root, policy, max_concurrency)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if OBJECT_STORES & set(protocols):
        return ObjectStorage(fs, root, policy, max_concurrency)
    return PipedStorage(fs, root, policy, max_concurrency)
