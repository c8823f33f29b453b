"""Retention: which committed checkpoints to keep, as a small pure policy, and the prune that applies it.

A :class:`RetentionPolicy` keeps the union of two rules, like Orbax's ``LatestN`` and ``BestN``
combined with ``AnyPreservationPolicy``:

* ``keep_last=N``: the N newest committed checkpoints (by epoch);
* ``keep_best=K``: the K checkpoints with the best finite ``metric`` (``mode="max"`` or ``"min"``;
  ties go to the later epoch, as in :func:`bgsave.index.best`). A missing, non-numeric or
  non-finite value never counts as best.

The newest committed checkpoint is never deleted, whatever the numbers. Deciding is pure
(:meth:`RetentionPolicy.to_delete` takes :class:`~bgsave.index.CheckpointInfo` values and touches no
file), so it is tested without I/O; :func:`prune` then deletes, each checkpoint **sidecar first,
then the .pt**: the sidecar is the commit marker, so a crash between the two leaves an uncommitted
``.pt`` that every reader ignores, never a committed-looking checkpoint without its weights.

Only committed checkpoints are considered: a ``.pt`` without its sidecar may be a save in progress,
so it is never pruned. The caller passes the committed checkpoints (the manager: after each commit,
on its worker, so no write of its own is in flight; ``bgsave prune``: what the listing shows) and,
in ``protect``, epochs that must survive whatever the policy says (an upload still reading them).

Example:
    >>> policy = RetentionPolicy(keep_last=3, keep_best=1, metric="score", mode="max")
    >>> doomed = policy.to_delete(list_checkpoints(storage, directory))  # doctest: +SKIP
    >>> prune(storage, directory, list_checkpoints(storage, directory), policy)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from bgsave.errors import CheckpointWriteError, InvalidArgumentError, check_int
from bgsave.index import CheckpointInfo, checkpoint_name
from bgsave.storage import Storage

__all__ = ("MODES", "RetentionPolicy", "prune")

logger = logging.getLogger(__name__)

MODES = ("max", "min")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which committed checkpoints to keep: the newest ``keep_last`` plus the best ``keep_best``.

    Args:
        keep_last: How many of the newest committed checkpoints to keep (>= 1), or None to keep
            every checkpoint (the policy then deletes nothing).
        keep_best: How many of the best checkpoints by ``metric`` to keep as well (>= 0). Needs
            ``keep_last``: without it everything is kept anyway, so ``keep_best`` alone is refused
            rather than silently doing nothing (``keep_last=1, keep_best=K`` keeps the newest and
            the K best).
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
            check_int("keep_last", self.keep_last, 1)
        check_int("keep_best", self.keep_best, 0)
        if self.keep_best and self.keep_last is None:
            raise InvalidArgumentError(
                f"keep_best={self.keep_best} needs keep_last (an int >= 1): with keep_last=None every "
                "checkpoint is kept; keep_last=1 keeps the newest plus the best"
            )
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"metric must be a non-empty string (a sidecar key), got {self.metric!r}")
        if self.mode not in MODES:
            raise InvalidArgumentError(f"mode must be 'max' or 'min', got {self.mode!r}")

    @property
    def keeps_everything(self) -> bool:
        """True for the default policy (``keep_last=None``), which never deletes: callers may skip pruning."""
        return self.keep_last is None

    def best(self, infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """The ``keep_best`` best checkpoints with a finite metric, best first (ties: the later epoch)."""
        sign = 1.0 if self.mode == "max" else -1.0
        scored = [(sign * v, info.epoch, info) for info in infos if (v := info.metric(self.metric)) is not None]
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [info for _, _, info in scored[: self.keep_best]]

    def to_keep(self, infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """The checkpoints this policy keeps, in epoch order."""
        ordered = sorted(infos, key=lambda info: info.epoch)
        if self.keep_last is None:
            return ordered
        keep = {info.epoch for info in ordered[-self.keep_last :]}
        keep.update(info.epoch for info in self.best(ordered))
        if ordered:
            keep.add(ordered[-1].epoch)  # the newest, whatever the numbers say
        return [info for info in ordered if info.epoch in keep]

    def to_delete(self, infos: Iterable[CheckpointInfo], *, protect: Collection[int] = ()) -> list[CheckpointInfo]:
        """The checkpoints this policy deletes, in epoch order (the complement of :meth:`to_keep`).

        Args:
            infos: The committed checkpoints.
            protect: Epochs never deleted (an upload still reading the file, say). They still count
                as what they are for ``keep_last`` and ``keep_best``, so protecting one never makes
                the policy delete another.
        """
        ordered = sorted(infos, key=lambda info: info.epoch)
        keep = {info.epoch for info in self.to_keep(ordered)} | set(protect)
        return [info for info in ordered if info.epoch not in keep]


def prune(
    storage: Storage,
    checkpoint_dir: str,
    infos: Iterable[CheckpointInfo],
    policy: RetentionPolicy,
    *,
    protect: Collection[int] = (),
    dry_run: bool = False,
) -> list[CheckpointInfo]:
    """Delete the checkpoints ``policy`` does not keep, each sidecar first, then its ``.pt``.

    Args:
        storage: The run directory's storage.
        checkpoint_dir: The fsspec path of the checkpoint directory (as :func:`bgsave.index.list_checkpoints`
            takes it).
        infos: The committed checkpoints to decide among; leave out anything still being written.
        policy: What to keep.
        protect: Epochs never deleted, though counted as usual (see :meth:`RetentionPolicy.to_delete`).
        dry_run: Decide and return, delete nothing.

    Returns:
        The checkpoints deleted (or that would be, with ``dry_run``), in epoch order.

    Raises:
        CheckpointWriteError: a file could not be deleted; checkpoints of earlier epochs are
            already gone, this one is at worst uncommitted (its sidecar gone, its ``.pt`` left).
    """
    doomed = policy.to_delete(infos, protect=protect)
    if dry_run or not doomed:
        return doomed
    for info in doomed:
        for suffix in ("yaml", "pt"):  # the commit marker first
            path = Storage.join_dir(checkpoint_dir, checkpoint_name(info.epoch, suffix))
            try:
                storage.delete(path)
            except Exception as exc:
                shown = storage.display(path)
                raise CheckpointWriteError(
                    f"could not delete {shown} while pruning epoch {info.epoch}: {type(exc).__name__}: {exc}",
                    epoch=info.epoch,
                    path=shown,
                ) from exc
            logger.debug("pruned %s", path)
    logger.info(
        "pruned %d checkpoint(s) from %s: epochs %s",
        len(doomed),
        storage.display(checkpoint_dir),
        ", ".join(str(info.epoch) for info in doomed),
    )
    return doomed
