"""Trainer state: what a resume needs besides the agent, taken at the call and put back in one call.

A trainer state is one dict, saved as ``checkpoints/trainer_{epoch:04d}.pt`` with plain ``torch.save``
and committed with its epoch (:mod:`bgsave.writer`)::

    {"optimizer_state": optimizer.state_dict(),   # the seed's three keys, where they were
     "epoch": 10, "agent_step": 40960,
     "run": "exp1",                               # a trainer state of another run is never mixed in
     "extra": {"scheduler": scheduler.state_dict(), "obs_norm": norm.state_dict(), "env_steps": 123},
     "rng": {"torch": ..., "cuda": [...], "numpy": ..., "python": ...}}   # with rng=True

``extra`` takes objects with ``state_dict()`` (a learning-rate scheduler, a ``GradScaler``, a
normalizer), whose state dict is what is saved, and plain picklable values (counters, a numpy
``Generator``), saved as they are. ``rng=True`` records the random streams a trainer draws from:
torch's CPU generator, every CUDA device's (only where CUDA is already initialized: bgsave never
starts it), numpy's global one (only where numpy is already imported) and Python's ``random``.
Everything is taken on the caller's thread at the call and then copied like the agent, so what is
saved is the state at the moment of the call.

:func:`restore` is the other half: the optimizer, each ``extra`` object with ``load_state_dict``,
and the random streams, in one call (``RunStart.restore``).
"""

from __future__ import annotations

import logging
import pickle
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from bgsave import sharding
from bgsave import sidecar as sidecar_schema
from bgsave.errors import InvalidArgumentError, check_bool

__all__ = ("Stateful", "TrainerState", "capture_rng", "check_extra", "restore", "restore_rng", "unpicklable_key")

logger = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``, such as a ``torch.optim.Optimizer``."""

    def state_dict(self) -> dict[str, Any]:
        """The object's state as a dict of tensors and plain values."""
        ...


def _has(obj: object, method: str) -> bool:
    return callable(getattr(obj, method, None))


def check_extra(extra: object) -> dict[str, Any]:
    """``extra`` as a dict of str keys (empty for None), else InvalidArgumentError naming what is wrong."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise InvalidArgumentError(f"extra must be a dict of name -> state, got {type(extra).__name__}")
    for key in extra:
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"extra's keys must be non-empty strings, got {key!r}")
    return dict(extra)


@dataclass(frozen=True)
class TrainerState:
    """One ``save_*`` call's trainer state, checked at the call; :meth:`build` reads it (at the call too)."""

    optimizer: Any
    epoch: int
    agent_step: int
    run: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    rng: bool = False

    @classmethod
    def checked(
        cls,
        optimizer: object,
        epoch: object,
        agent_step: object,
        run: str,
        *,
        extra: object,
        rng: object,
        required: bool,
    ) -> TrainerState | None:
        """One with every argument checked (InvalidArgumentError naming the argument otherwise).

        Without an optimizer: None, unless ``required`` (``save_trainer_state``) or ``extra`` / ``rng``
        were given, which are refused (they are part of a trainer state).
        """
        if optimizer is None and not required:
            if extra is not None or rng:
                raise InvalidArgumentError("extra and rng are part of the trainer state: pass optimizer= as well")
            return None
        if not _has(optimizer, "state_dict"):
            raise InvalidArgumentError(
                f"optimizer must have a state_dict() method (a torch.optim.Optimizer), got {type(optimizer).__name__}"
            )
        return cls(
            optimizer,
            sidecar_schema.validate_epoch(epoch),
            sidecar_schema.validate_epoch(agent_step, argument="agent_step"),
            run,
            check_extra(extra),
            check_bool("rng", rng),
        )

    def build(self) -> dict[str, Any]:
        """The trainer-state dict, taken now: state dicts read, RNG states captured (see the module docstring)."""
        state: dict[str, Any] = {
            "optimizer_state": None if self.optimizer is None else self.optimizer.state_dict(),
            "epoch": self.epoch,
            "agent_step": self.agent_step,
            "run": self.run,
        }
        if self.extra:
            state["extra"] = {k: v.state_dict() if _has(v, "state_dict") else v for k, v in self.extra.items()}
        if self.rng:
            state["rng"] = capture_rng()
        return state


def unpicklable_key(extra: Mapping[str, Any]) -> str | None:
    """The first ``extra`` key whose value neither has ``state_dict()`` nor pickles (to name it in an error)."""
    for key, value in extra.items():
        if _has(value, "state_dict"):
            continue
        try:
            pickle.dumps(value)
        except Exception:
            return key
    return None


def capture_rng() -> dict[str, Any]:
    """The states of torch's CPU and (initialized) CUDA generators, numpy's global one and ``random``'s."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")  # a trainer that draws from numpy has imported it
    if numpy is not None:
        out["numpy"] = numpy.random.get_state()
    return out


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Put back the random streams :func:`capture_rng` recorded (a stream not recorded is left as it is)."""
    if "torch" in saved:
        torch.set_rng_state(saved["torch"].cpu())  # loaded with map_location="cuda" it may be on the GPU
    if "python" in saved:
        random.setstate(saved["python"])
    if "cuda" in saved:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(saved["cuda"]):
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda"]])
        else:
            logger.warning(
                "the trainer state holds the RNG states of %d CUDA device(s) but %d are visible: not restored",
                len(saved["cuda"]),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    if "numpy" in saved:
        import numpy  # only a run that saved numpy's state needs numpy

        numpy.random.set_state(saved["numpy"])


def restore(
    state: Mapping[str, Any],
    optimizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    *,
    rng: bool = True,
    model: Any = None,
) -> None:
    """Load ``state`` into the trainer's live objects: the optimizer, each ``extra`` object, the RNG.

    ``model``: the sharded model, when ``optimizer`` holds FSDP shards (:mod:`bgsave.sharding`).

    Raises:
        InvalidArgumentError: an ``extra`` key that was not saved, or an object without
            ``load_state_dict`` for one. Nothing was restored then. An optimizer given where none
            was saved (a new run's epoch 0, ``start_run(rng=True)``) is left as it is.
    """
    epoch = state.get("epoch")
    saved_extra: Mapping[str, Any] = state.get("extra") or {}
    targets = check_extra(extra)
    if optimizer is not None and not _has(optimizer, "load_state_dict"):
        raise InvalidArgumentError(f"optimizer must have load_state_dict(), got {type(optimizer).__name__}")
    for key, target in targets.items():
        if key not in saved_extra:
            raise InvalidArgumentError(
                f"extra[{key!r}] was not saved with epoch {epoch} (saved: {sorted(saved_extra) or 'none'})"
            )
        if not _has(target, "load_state_dict"):
            raise InvalidArgumentError(
                f"extra[{key!r}] has no load_state_dict(); read the saved value from RunStart.extra[{key!r}]"
            )
    saved = state.get("optimizer_state")
    # (A new run's epoch 0 has no optimizer state; FSDP shards are loaded through their model.)
    if optimizer is not None and saved is not None and not sharding.load_optimizer(optimizer, saved, model):
        optimizer.load_state_dict(saved)
    for key, target in targets.items():
        target.load_state_dict(saved_extra[key])
    if rng and state.get("rng"):
        restore_rng(state["rng"])
