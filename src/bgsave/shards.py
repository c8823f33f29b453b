"""Shards: ``sharding="dcp"``, for sharded agents too large to gather on one host.

Each rank writes its own shards with torch's ``torch.distributed.checkpoint.async_save`` into
``checkpoints/model_{epoch:04d}.dcp/``, and rank 0 writes the sidecar only once the save completed
on every rank: DCP's future completes without error on rank 0 only after every rank's data is
written and ``.metadata`` exists (its final ``all_reduce``), so the sidecar stays the one commit
marker. The path of one ``save_at_interval(model, 10, optimizer=opt)``, on every rank::

    caller's thread    wait for the previous DCP save (one in flight at a time)
                       rank 0: flush its worker, uncommit an earlier save of epoch 10
                       async_save({"model": ..., "optimizer": ...}): staged to CPU, then returns
    DCP's thread       plan, write this rank's shards, .metadata (on bgsave's DCP gloo group)
    rank 0's worker    wait for the future, then trainer_0010.pt (extra, RNG), then the sidecar

DCP writes shards under their final names and overwrites them in place, which is why an
uncommitted ``.dcp`` directory is removed by the next writer whatever its epoch
(:mod:`bgsave.lifecycle`). DCP runs its collectives from its own thread, so it gets a gloo group
of its own, apart from the training group and from bgsave's (:mod:`bgsave.distributed`).

A resume gives every rank a new ``make_agent()``; ``RunStart.restore(optimizer, model=model)``
then loads each rank's shards into the sharded model (and optimizer) with ``dcp.load``.
``bgsave consolidate RUN_DIR --epoch N`` turns a ``.dcp`` directory into a plain state-dict ``.pt``.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from bgsave.errors import CheckpointReadError, CheckpointWriteError, InvalidArgumentError

__all__ = ("SHARDING_MODES", "ShardedSaves", "consolidate", "load_shards")

SHARDING_MODES = ("full", "dcp")
"""How a sharded agent is saved: gathered into a whole agent (:mod:`bgsave.sharding`), or as DCP shards."""

logger = logging.getLogger(__name__)


def _state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


class ShardedSaves:
    """The DCP saves of one manager on one rank: its DCP group, and the save in flight.

    Args:
        rank: This process's rank.
        timeout_s: The DCP group's collective timeout.
    """

    def __init__(self, rank: int, timeout_s: float) -> None:
        self._rank = rank
        self._timeout_s = timeout_s
        self._group: Any = None
        self._future: Future[Any] | None = None
        self._what = ""
        self._epoch = -1

    def start(self, model: Any, optimizer: Any, epoch: int, path: str, shown: str) -> Future[Any]:
        """Every rank: wait for the previous save, then start this one (returns once staged)."""
        from torch.distributed.checkpoint.state_dict_saver import async_save

        self.wait()
        if self._group is None:  # every rank is in this call: the one place a new group can be made
            from bgsave.distributed import new_gloo_group

            self._group = new_gloo_group(self._timeout_s)
        future = async_save(_state(model, optimizer), checkpoint_id=path, process_group=self._group)
        assert isinstance(future, Future)  # no async_stager: a plain future
        self._future, self._what, self._epoch = future, shown, epoch
        return future

    def wait(self) -> None:
        """Every rank: wait for the save in flight.

        Raises:
            CheckpointWriteError: it failed (on rank 0 its write job raises it instead: once).
        """
        future, self._future = self._future, None
        if future is None:
            return
        try:
            future.result()
        except Exception as exc:
            if self._rank == 0:
                return  # the worker's job waits on the same future and raises it, in order
            raise CheckpointWriteError(
                f"rank {self._rank}: the sharded (DCP) save of epoch {self._epoch} to {self._what} failed: "
                f"{type(exc).__name__}: {exc}",
                epoch=self._epoch,
                path=self._what,
            ) from exc

    def close(self) -> None:
        """Wait for the save in flight (what it raises was raised on rank 0 too), then drop the group."""
        try:
            self.wait()
        finally:
            from bgsave.distributed import destroy_group  # here: distributed imports loading, which imports us

            group, self._group = self._group, None
            destroy_group(group)


def load_shards(path: str, model: Any, optimizer: Any) -> None:
    """Every rank: load its shards of the DCP checkpoint at ``path`` into ``model`` (and ``optimizer``).

    The optimizer's state is loaded when the checkpoint holds one (DCP's own metadata says).

    Raises:
        InvalidArgumentError: no ``model`` was given.
        CheckpointReadError: DCP could not load it.
    """
    if model is None:
        raise InvalidArgumentError(
            f"{path} is a sharded (DCP) checkpoint: shard the agent, then restore(optimizer, model=model)"
        )
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    try:
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        with_optimizer = optimizer is not None and any(key.startswith("optimizer.") for key in saved)
        state = _state(model, optimizer if with_optimizer else None)
        load(state, checkpoint_id=path)
    except Exception as exc:
        raise CheckpointReadError(
            f"could not load the DCP checkpoint {path}: {type(exc).__name__}: {exc}", path=path
        ) from exc
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def consolidate(path: str, out: str) -> None:
    """Turn the DCP checkpoint at ``path`` into one ``torch.save`` state dict at ``out`` (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, out)
