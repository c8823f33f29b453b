"""bgsave: background, atomic checkpoints for PyTorch training runs, on local disk or in a bucket.

Example:
    >>> from bgsave import CheckpointManager
    >>> with CheckpointManager("runs/exp1", "exp1") as mgr:  # doctest: +SKIP
    ...     start = mgr.start_run(make_agent)
    ...     mgr.save_agent(start.agent, epoch=1, metadata={"agent_step": 2048, "score": 0.4})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bgsave.catalog import CheckpointInfo, find_latest_checkpoint
from bgsave.errors import (
    BgsaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    DistributedError,
    InvalidArgumentError,
    ManagerClosedError,
    MirrorError,
    RunLockedError,
    WandbUploadError,
    WorkerError,
    WorkerTimeoutError,
)
from bgsave.jobs import SaveRecord
from bgsave.storage import RetryPolicy
from bgsave.tiers import MirrorStatus
from bgsave.wandb import upload_to_wandb

if TYPE_CHECKING:
    from bgsave.loading import RunStart, load_checkpoint
    from bgsave.manager import CheckpointManager, Stateful

__all__ = (
    "BgsaveError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "DistributedError",
    "InvalidArgumentError",
    "ManagerClosedError",
    "MirrorError",
    "MirrorStatus",
    "RetryPolicy",
    "RunLockedError",
    "RunStart",
    "SaveRecord",
    "Stateful",
    "WandbUploadError",
    "WorkerError",
    "WorkerTimeoutError",
    "find_latest_checkpoint",
    "load_checkpoint",
    "upload_to_wandb",
)

__version__ = "0.1.0"

# The names whose modules import torch, imported on first use: `bgsave ls` and the catalog never
# pay for `import torch` (about 2 s), and `from bgsave import CheckpointManager` works as ever.
_LAZY = {
    "CheckpointManager": "bgsave.manager",
    "Stateful": "bgsave.manager",
    "RunStart": "bgsave.loading",
    "load_checkpoint": "bgsave.loading",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bgsave' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
