"""The optional W&B upload: each committed checkpoint logged as a ``model`` artifact of the run.

What is uploaded:
    One artifact version per checkpoint, of type ``"model"``, named after the run (the bgsave run
    name, else the W&B run's name, else its id), reduced to the characters W&B allows in artifact
    names: letters, digits, ``-``, ``_`` and ``.``; anything else becomes ``-``. Its metadata is the
    sidecar (epoch, agent_step, score, ...); non-finite floats, which W&B's JSON rejects, are stored
    as the strings ``"nan"``, ``"inf"`` and ``"-inf"``. Its aliases are ``"latest"`` and
    ``"epoch_{epoch:04d}"`` (``epoch_0010``), matching the ``model_0010.pt`` file name. The one file
    in it keeps its name (``model_0010.pt``).

    A local file is added with ``policy="immutable"`` and ``skip_cache=True``: W&B neither copies it
    into its staging directory (which would double the disk use of every checkpoint until it is
    uploaded) nor into its artifact cache afterwards. In exchange the file must stay in place,
    unchanged, until W&B has read it: online, until the run's uploads finish (``run.finish()`` waits
    for them); offline, until ``wandb sync``. A checkpoint in a bucket (``s3://``, ``gs://``, ...) is
    added as a reference: nothing is downloaded or re-uploaded, W&B records the URI with its
    checksum (ETag) and size, which it reads with its own client (boto3 for S3: credentials and
    endpoint come from the environment, not from bgsave's ``storage_options``).

When:
    :func:`upload_to_wandb` blocks while it hashes a local file (MD5, one read) and hands the
    artifact to W&B's service process; online, ``log_artifact`` also makes one API request (W&B
    checks the artifact's type). The bytes travel later, in W&B's own process, and ``run.finish()``
    waits for them. bgsave calls it on its worker, after the checkpoint committed, never in
    ``save_agent``; W&B's run methods may be called from any thread (they pass messages to W&B's own
    asyncio thread). :class:`bgsave.policies.EveryNth` decides which checkpoints go (every N-th).

Offline:
    With ``WANDB_MODE=offline`` the artifact is recorded in the run's ``offline-run-*/run-*.wandb``
    file and uploaded by ``wandb sync``. Nothing here calls ``artifact.wait()``, which raises offline.

``wandb`` itself is imported only inside these functions (it takes about a second to import), and
this is the only bgsave module that imports it; without it, :func:`require_wandb` says how to
install it.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from bgsave import sidecar as sidecar_schema
from bgsave.errors import InvalidArgumentError, WandbUploadError

__all__ = (
    "WandbUploadError",
    "artifact_name",
    "epoch_alias",
    "require_wandb",
    "upload_to_wandb",
    "validate_run",
)

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "model"
# W&B's server accepts these characters in artifact names, and at most 128 of them.
_NAME_MAXLEN = 128
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def require_wandb() -> ModuleType:
    """Import and return ``wandb``.

    Raises:
        ImportError: wandb is not installed; the message gives the install command.
    """
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("uploading checkpoints to W&B needs the wandb package: pip install 'bgsave[wandb]'") from exc
    return wandb


def validate_run(wandb_run: object, *, argument: str = "wandb_run") -> Any:
    """Return ``wandb_run`` if it looks like a W&B run (has ``log_artifact``), else raise InvalidArgumentError."""
    if not callable(getattr(wandb_run, "log_artifact", None)):
        raise InvalidArgumentError(
            f"{argument} must be a W&B run (the object wandb.init() returns), got {type(wandb_run).__name__}"
        )
    return wandb_run


def artifact_name(name: str) -> str:
    """``name`` reduced to an allowed W&B artifact name: letters, digits, ``-_.``, at most 128 characters.

    Example:
        >>> artifact_name("ppo run/seed:1")
        'ppo-run-seed-1'
    """
    cleaned = _NOT_ALLOWED.sub("-", name)[:_NAME_MAXLEN]
    if not cleaned:
        raise InvalidArgumentError(f"cannot make a W&B artifact name from {name!r}")
    return cleaned


def epoch_alias(epoch: int) -> str:
    """The alias naming a checkpoint's epoch: ``epoch_0010``, like the file ``model_0010.pt``."""
    return f"epoch_{epoch:04d}"


def _json_metadata(metadata: Mapping[str, Any] | None, epoch: int) -> dict[str, Any]:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a mapping or None, got {type(metadata).__name__}")
    values: dict[str, Any] = {"epoch": epoch}
    for key, value in (metadata or {}).items():
        # W&B serialises metadata as strict JSON, which has no NaN or infinity.
        values[key] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
    return values


def _default_name(wandb_run: Any, run_name: str | None) -> str:
    for candidate in (run_name, getattr(wandb_run, "name", None), getattr(wandb_run, "id", None)):
        if isinstance(candidate, str) and candidate.strip():
            return candidate
    raise InvalidArgumentError("no artifact name: pass run_name, or use a W&B run that has a name or id")


def _add_checkpoint(artifact: Any, path: str, *, checksum: bool, copy: bool) -> None:
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not _URL.match(path):
        if copy:  # W&B stages its own copy: the checkpoint may be deleted before W&B reads it
            artifact.add_file(path, name=os.path.basename(path))
        else:
            artifact.add_file(path, name=os.path.basename(path), policy="immutable", skip_cache=True)
        return
    name = posixpath.basename(urlsplit(path).path)
    entries = artifact.add_reference(path, name=name or None, checksum=checksum)
    # For a missing S3 key, W&B silently falls back to listing the key as a prefix: insist on the one object.
    refs = [str(getattr(e, "ref", "")).split("?")[0] for e in entries]
    if refs != [path.split("?")[0]]:
        raise FileNotFoundError(f"expected the one object {path} behind the reference, found {refs or 'none'}")


def upload_to_wandb(
    wandb_run: Any,
    path: str | os.PathLike[str],
    epoch: int,
    *,
    metadata: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    checksum: bool = True,
    wait: bool = False,
    copy: bool = False,
) -> None:
    """Log one checkpoint file as a ``model`` artifact of ``wandb_run``, aliased ``latest`` and ``epoch_NNNN``.

    Blocks until W&B's service has the artifact (hashing a local file on the way); the upload itself
    happens later, in W&B's process. See the module docstring for what is recorded and for the
    condition that comes with not copying the file.

    Args:
        wandb_run: The run ``wandb.init()`` returned; it must not be finished.
        path: A committed checkpoint: a local path, or a bucket URL added as a reference.
        epoch: The checkpoint's epoch, for the ``epoch_NNNN`` alias.
        metadata: The sidecar; stored as the artifact's metadata (``epoch`` added if absent).
        run_name: The artifact's name before cleaning; default the W&B run's name, else its id.
        checksum: For bucket URLs, whether W&B reads the object's ETag and size (with its own
            client and the environment's credentials) or records the URI alone.
        wait: On an online run, block until W&B has uploaded the file (``artifact.wait()``), so
            it may be deleted afterwards; ignored offline, where ``wait()`` raises.
        copy: Let W&B stage a copy of a local file (twice the disk until it is uploaded) instead of
            reading it in place: needed offline when the file may be deleted before ``wandb sync``.

    Example:
        >>> run = wandb.init(project="ppo")  # doctest: +SKIP
        >>> upload_to_wandb(run, "runs/exp1/checkpoints/model_0010.pt", 10, metadata=sidecar)  # doctest: +SKIP

    Raises:
        ImportError: wandb is not installed.
        InvalidArgumentError: a bad argument (nothing was logged).
        WandbUploadError: W&B refused or failed (a finished run, a missing file, an unreachable
            bucket); the cause is chained.
    """
    wandb = require_wandb()
    validate_run(wandb_run)
    epoch = sidecar_schema.validate_epoch(epoch)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidArgumentError(f"path must be a non-empty path or URL, got {path!r}")
    path = os.fspath(path)
    if run_name is not None and not isinstance(run_name, str):
        raise InvalidArgumentError(f"run_name must be a string or None, got {type(run_name).__name__}")
    name = artifact_name(_default_name(wandb_run, run_name))
    values = _json_metadata(metadata, epoch)
    aliases = ["latest", epoch_alias(epoch)]
    try:
        artifact = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata=values)
        _add_checkpoint(artifact, path, checksum=checksum, copy=copy)
        wandb_run.log_artifact(artifact, aliases=aliases)
        if wait and not getattr(wandb_run, "offline", True):
            artifact.wait()
    except Exception as exc:
        raise WandbUploadError(
            f"logging epoch {epoch} ({path}) to W&B as artifact {name!r} failed: {type(exc).__name__}: {exc}",
            epoch=epoch,
            path=path,
        ) from exc
    logger.debug("logged %s to W&B as %s:%s", path, name, aliases[1])
