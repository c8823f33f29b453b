"""bgsave: background, atomic checkpoints for PyTorch training runs, on local disk or in a bucket.

Example:
    >>> from bgsave import CheckpointManager
    >>> with CheckpointManager("runs/exp1", "exp1") as mgr:  # doctest: +SKIP
    ...     start = mgr.start_run(make_agent)
    ...     mgr.save_agent(start.agent, epoch=1, metadata={"agent_step": 2048, "score": 0.4})
"""

from bgsave.errors import (
    BgsaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    InvalidArgumentError,
    ManagerClosedError,
    RunLockedError,
    WandbUploadError,
    WorkerError,
    WorkerTimeoutError,
)
from bgsave.index import CheckpointInfo, find_latest_checkpoint, load_checkpoint
from bgsave.manager import CheckpointManager, RunStart, Stateful
from bgsave.retry import RetryPolicy
from bgsave.wandb import upload_to_wandb
from bgsave.worker import SaveRecord

__all__ = (
    "BgsaveError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "InvalidArgumentError",
    "ManagerClosedError",
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
