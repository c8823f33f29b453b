"""Sharding: FSDP2 (and FSDP1) agents saved as the same whole-agent files a single-GPU run writes.

``sharding="full"``: at each save of a sharded agent every rank joins the gather of the full state
dict to rank 0, offloaded to CPU, with torch's own
``torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True,
cpu_offload=True)`` (the optimizer's likewise, with ``get_optimizer_state_dict``). Rank 0 pours
it into a plain CPU agent built once by the run's ``make_agent`` (``load_state_dict(...,
assign=True)``: the gathered tensors become the agent's, no copy) and saves that as today's
``model_{epoch:04d}.pt``; the trainer state holds the full optimizer state dict. A checkpoint
trained on 8 GPUs loads on a laptop with ``torch.load``.

The gather is a collective of the training group, on the caller's thread, inside the ``save_*``
call every rank makes: never on the worker. The sidecar records ``sharded: true``. A resume of such
an epoch under torch.distributed loads it on rank 0 only; the other ranks get a new ``make_agent()``
(no copy of the checkpoint); the user shards the agent, and ``RunStart.restore(optimizer,
model=model)`` sends rank 0's full model and optimizer state into every rank's shards
(``set_model_state_dict`` / ``set_optimizer_state_dict`` with ``broadcast_from_rank0=True``).
In one process the file loads as any whole-agent checkpoint.

Example:
    >>> start = mgr.start_run(make_agent)  # doctest: +SKIP
    >>> model = fully_shard(start.agent)  # doctest: +SKIP
    >>> optimizer = torch.optim.Adam(model.parameters())  # doctest: +SKIP
    >>> start.restore(optimizer, model=model)  # doctest: +SKIP
    >>> mgr.save_at_interval(model, epoch, interval=10, optimizer=optimizer)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from bgsave.errors import InvalidArgumentError

if TYPE_CHECKING:
    from bgsave.trainer_state import TrainerState

__all__ = (
    "FullOptimizerState",
    "Gather",
    "broadcast_full",
    "is_sharded",
    "load_optimizer",
    "optimizer_sharded",
    "sharded_params",
    "unwrap",
)

logger = logging.getLogger(__name__)


def unwrap(agent: Any) -> Any:
    """The plain module inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``).

    A pickled DDP wrapper only loads inside a process group, and a compiled module drags its
    compiled code along: the checkpoint is the module the user wrote, loadable anywhere.
    """
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(agent, wrappers):
            agent = agent.module
        elif type(agent).__name__ == "OptimizedModule" and isinstance(
            getattr(agent, "_orig_mod", None), torch.nn.Module
        ):
            agent = agent._orig_mod  # torch.compile's wrapper; its class lives in torch._dynamo (2 s to import)
        else:
            return agent


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sharded_params(params: Iterable[Any]) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2's shards); False outside torch.distributed."""
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def is_sharded(agent: object) -> bool:
    """Whether ``agent`` is a module sharded by FSDP2 (``fully_shard``) or wrapped by FSDP1."""
    if not isinstance(agent, torch.nn.Module) or not _distributed():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(agent, FullyShardedDataParallel) or sharded_params(agent.parameters())


def optimizer_sharded(optimizer: Any) -> bool:
    """Whether ``optimizer`` holds FSDP shards (DTensor parameters)."""
    groups = getattr(optimizer, "param_groups", None) or []
    return sharded_params(p for group in groups for p in group.get("params", ()))


_MODULE_KEYS = frozenset(vars(torch.nn.Module()))  # what nn.Module keeps in every instance's __dict__


def _copy_attributes(live: torch.nn.Module, template: torch.nn.Module) -> None:
    """The live agent's plain attributes (an epsilon, a config) onto the template, module by module.

    The template's own attributes are make_agent's; what the run changed since is the live
    agent's. nn.Module's bookkeeping (parameters, buffers, hooks) stays the template's.
    """
    modules = dict(live.named_modules())
    for name, target in template.named_modules():
        source = modules.get(name)
        if source is None:
            continue
        mine = vars(target)
        for key, value in vars(source).items():
            if key not in _MODULE_KEYS and (key in mine or not key.startswith("_")):
                mine[key] = value


class FullOptimizerState:
    """An optimizer's full (gathered) state dict, as the ``state_dict()`` a trainer state reads."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        """The gathered state dict."""
        return self._state


class Gather:
    """The ``"full"`` gathers of one manager: the CPU template, and the last sharded model seen.

    Args:
        is_writer: Whether this rank is rank 0, the one that keeps what is gathered.
    """

    def __init__(self, *, is_writer: bool) -> None:
        self._is_writer = is_writer
        self._make_agent: Callable[[], Any] | None = None
        self._template: Any = None
        self._model: torch.nn.Module | None = None

    def use_factory(self, make_agent: Callable[[], Any]) -> None:
        """``start_run``'s ``make_agent``: rank 0 builds the CPU template with it at the first save."""
        self._make_agent = make_agent

    def agent(self, model: torch.nn.Module, epoch: int) -> Any:
        """Every rank: the gather; rank 0 gets the template holding the full state, the others None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self._template is None and self._make_agent is None:  # the same on every rank: before the gather
            raise InvalidArgumentError(
                f"epoch {epoch}: a sharded agent (FSDP) is saved as a whole agent built by make_agent: "
                "call mgr.start_run(make_agent) on every rank before saving it"
            )
        self._model = model
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self._is_writer:
            return None
        if self._template is None:
            assert self._make_agent is not None
            self._template = self._new_template()
        self._template.load_state_dict(state, assign=True)
        _copy_attributes(model, self._template)
        return self._template

    def _new_template(self) -> Any:
        # make_agent draws from the RNGs, and on rank 0 only: put them back, or rank 0's streams
        # would depend on when the process made its first sharded save (a resume would diverge).
        from bgsave.trainer_state import capture_rng, restore_rng

        assert self._make_agent is not None
        streams = capture_rng()
        try:
            return self._make_agent()
        finally:
            restore_rng(streams)

    def optimizer(self, optimizer: Any, model: torch.nn.Module | None, epoch: int) -> FullOptimizerState:
        """Every rank: the gather of ``optimizer``'s full state (rank 0 keeps it; the others an empty one)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model = model if model is not None else self._model
        if model is None:
            raise InvalidArgumentError(
                f"epoch {epoch}: the optimizer of a sharded agent is gathered with its model: save it with "
                "save_at_interval(model, epoch, optimizer=...) or after save_agent(model, epoch)"
            )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return FullOptimizerState(state if self._is_writer else {})

    def whole(self, agent: Any, epoch: int) -> Any:
        """What is saved of ``agent``: the plain module (:func:`unwrap`), gathered if sharded."""
        agent = unwrap(agent)
        return self.agent(agent, epoch) if is_sharded(agent) else agent

    def trainer(self, trainer: TrainerState | None, model: Any) -> TrainerState | None:
        """``trainer`` with its optimizer's full state gathered, if the optimizer holds FSDP shards."""
        if trainer is None or trainer.optimizer is None or not optimizer_sharded(trainer.optimizer):
            return trainer
        return dataclasses.replace(trainer, optimizer=self.optimizer(trainer.optimizer, model, trainer.epoch))


def broadcast_full(model: Any, optimizer: Any, model_state: dict[str, Any] | None, optimizer_state: Any) -> None:
    """Every rank: rank 0's full model (and optimizer) state into this rank's shards (``broadcast_from_rank0``).

    Only rank 0 holds the full states; the others pass nothing and receive their shards.

    Raises:
        InvalidArgumentError: no ``model`` was given.
    """
    if model is None:
        raise InvalidArgumentError(
            "this epoch was saved from a sharded agent: shard the new agent, then restore(optimizer, model=model)"
        )
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state or {}, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state or {}, options=options)


def load_optimizer(optimizer: Any, state: dict[str, Any], model: Any) -> bool:
    """Load a full optimizer state into an optimizer of FSDP shards; False when ``optimizer`` is not sharded.

    Raises:
        InvalidArgumentError: the optimizer is sharded but ``model`` was not given.
    """
    if not optimizer_sharded(optimizer):
        return False
    if model is None:
        raise InvalidArgumentError(
            "the optimizer holds FSDP shards: pass the sharded model too, restore(optimizer, model=model)"
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    return True
