"""Policies: which committed checkpoints to keep, and which to upload. Pure: no file is touched here.

Retention is the union of small rules, like Orbax's ``preservation_policy`` (``LatestN``, ``BestN``):

* :class:`LatestN` keeps the ``n`` newest committed checkpoints;
* :class:`BestN` keeps the ``n`` best by a sidecar metric, ranked by :func:`ranked`
  (the one place "best" is decided: ``find_best_checkpoint`` agrees with what retention keeps);
* :class:`RetentionPolicy` is the manager's ``keep_last`` / ``keep_best`` / ``metric`` / ``mode``:
  ``LatestN(keep_last)`` or ``BestN(keep_best)``, and always the newest and the one a resume would pick.

A missing, non-numeric or non-finite metric never counts as best. Deciding takes
:class:`~bgsave.catalog.CheckpointInfo` values and returns epochs, so it is tested without I/O; the
writer then deletes through :meth:`bgsave.catalog.Catalog.remove` (each sidecar first).

Uploads: :class:`EveryNth` says which committed checkpoints of a manager go to W&B.

Example:
    >>> policy = RetentionPolicy(keep_last=3, keep_best=1, metric="score", mode="max")
    >>> doomed = policy.to_delete(catalog.committed())  # doctest: +SKIP
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bgsave.errors import InvalidArgumentError, check_int

if TYPE_CHECKING:  # the catalog imports the rules below; at run time nothing here needs it
    from bgsave.catalog import CheckpointInfo

__all__ = (
    "MODES",
    "BestN",
    "EveryNth",
    "LatestN",
    "RetentionPolicy",
    "check_mode",
    "rank",
    "ranked",
    "resume_candidates",
)

MODES = ("max", "min")


def check_mode(mode: object, *, argument: str = "mode") -> str:
    """Return ``mode`` if it is "max" or "min", else raise InvalidArgumentError naming ``argument``."""
    if mode not in MODES:
        raise InvalidArgumentError(f"{argument} must be 'max' (higher is better) or 'min', got {mode!r}")
    return str(mode)


def ranked(values: Mapping[int, float], mode: str = "max", *, limit: int | None = None) -> list[int]:
    """Epochs by their value, best first (the ``limit`` best only); equal values: the later epoch first.

    The one place "best" is decided (``find_best_checkpoint``, ``bgsave best``, retention's ``keep_best``).
    """
    sign = 1.0 if check_mode(mode) == "max" else -1.0

    def key(epoch: int) -> tuple[float, int]:
        return sign * values[epoch], epoch

    # The best of 10,000 is a max, not a sort of them all (2 ms instead of 13 ms here).
    return sorted(values, key=key, reverse=True) if limit is None else heapq.nlargest(limit, values, key=key)


def rank(infos: Iterable[CheckpointInfo], metric: str, mode: str = "max") -> list[CheckpointInfo]:
    """Checkpoints with a finite ``metric``, best first, as :func:`ranked` orders them."""
    by_epoch = {info.epoch: info for info in infos}
    values = {epoch: v for epoch, info in by_epoch.items() if (v := info.metric(metric)) is not None}
    return [by_epoch[epoch] for epoch in ranked(values, mode)]


def resume_candidates(committed: set[int], with_trainer: set[int]) -> set[int]:
    """The epochs a resume may continue from: those committed with their trainer state, if any, else all."""
    return committed & with_trainer or committed


@dataclass(frozen=True, slots=True)
class LatestN:
    """Keep the ``n`` newest committed checkpoints."""

    n: int

    def __post_init__(self) -> None:
        check_int("keep_last", self.n, 1)

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        """The epochs kept, of ``infos`` in epoch order."""
        return {info.epoch for info in infos[-self.n :]}


@dataclass(frozen=True, slots=True)
class BestN:
    """Keep the ``n`` best committed checkpoints by ``metric`` (``mode="max"``: higher is better)."""

    n: int
    metric: str = "score"
    mode: str = "max"

    def __post_init__(self) -> None:
        check_int("keep_best", self.n, 0)
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"metric must be a non-empty string (a sidecar key), got {self.metric!r}")
        check_mode(self.mode)

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        """The epochs kept."""
        return {info.epoch for info in rank(infos, self.metric, self.mode)[: self.n]}


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which committed checkpoints to keep: the newest ``keep_last`` plus the best ``keep_best``.

    Args:
        keep_last: How many of the newest committed checkpoints to keep (>= 1), or None to keep
            every checkpoint (the policy then deletes nothing).
        keep_best: How many of the best by ``metric`` to keep as well (>= 0). Needs ``keep_last``:
            without it everything is kept anyway, so ``keep_best`` alone is refused rather than
            silently doing nothing (``keep_last=1, keep_best=K`` keeps the newest and the K best).
        metric: The sidecar key to rank by.
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better).

    Raises:
        InvalidArgumentError: an argument is out of range; the message names it.
    """

    keep_last: int | None = None
    keep_best: int = 0
    metric: str = "score"
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.keep_last is not None:
            LatestN(self.keep_last)
        BestN(self.keep_best, self.metric, self.mode)
        if self.keep_best and self.keep_last is None:
            raise InvalidArgumentError(
                f"keep_best={self.keep_best} needs keep_last (an int >= 1): with keep_last=None every "
                "checkpoint is kept; keep_last=1 keeps the newest plus the best"
            )

    @property
    def keeps_everything(self) -> bool:
        """True for the default policy (``keep_last=None``), which never deletes: callers may skip pruning."""
        return self.keep_last is None

    def best(self, infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """The ``keep_best`` best checkpoints with a finite metric, best first (ties: the later epoch)."""
        return rank(infos, self.metric, self.mode)[: self.keep_best]

    def to_keep(self, infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """The checkpoints this policy keeps, in epoch order."""
        ordered = sorted(infos, key=lambda info: info.epoch)
        if self.keep_last is None:
            return ordered
        keep = LatestN(self.keep_last).keep(ordered) | BestN(self.keep_best, self.metric, self.mode).keep(ordered)
        if ordered:
            keep.add(ordered[-1].epoch)  # the newest, whatever the numbers say
            # ...and the one a resume would continue from: the newest committed with its trainer state.
            committed = {info.epoch for info in ordered}
            keep.add(max(resume_candidates(committed, {info.epoch for info in ordered if info.has_trainer_state})))
        return [info for info in ordered if info.epoch in keep]

    def to_delete(self, infos: Iterable[CheckpointInfo], *, protect: Collection[int] = ()) -> list[CheckpointInfo]:
        """The checkpoints this policy deletes, in epoch order (the complement of :meth:`to_keep`).

        Args:
            infos: The committed checkpoints.
            protect: Epochs never deleted (one still being written, say). They still count as what
                they are for ``keep_last`` and ``keep_best``, so protecting one never makes the
                policy delete another.
        """
        ordered = sorted(infos, key=lambda info: info.epoch)
        keep = {info.epoch for info in self.to_keep(ordered)} | set(protect)
        return [info for info in ordered if info.epoch not in keep]


@dataclass(frozen=True, slots=True)
class EveryNth:
    """Every ``n``-th committed checkpoint of one manager, starting with the first.

    The count is of checkpoints, from 0, whatever their epochs: with ``n=3`` the 1st, 4th, 7th...
    go, so a misconfigured upload shows up at once, and with saves every 10 epochs ``n=5`` means
    epochs 0, 50, 100. The count starts again in a new manager (after a resume).
    """

    n: int = 1
    argument: str = "wandb_every_n"

    def __post_init__(self) -> None:
        check_int(self.argument, self.n, 1)

    def due(self, index: int) -> bool:
        """Whether the ``index``-th committed checkpoint (from 0) is one of them."""
        check_int("index", index, 0)
        return index % self.n == 0
