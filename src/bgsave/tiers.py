"""Tiers: what a manager with a mirror finds and loads: the newest epoch committed in either tier.

::

    latest, resume   the newer of the local tier's and the mirror's (the local copy on a tie)
    list, best       every epoch committed in either tier, once (the local copy where both have it)
    load             from the tier that holds the epoch, local first

A fresh node (empty local directory) therefore resumes from the bucket, and a node whose local
copy is older than the bucket resumes the newer mirrored epoch. An epoch is loaded from the mirror
straight into ``torch.load`` (parallel range reads), with no local copy kept: the local tier is
where the run's own saves commit; copying a resumed checkpoint there first would cost a full local
write before the first training step, and the bucket already holds it durably. Each question lists
each tier once; a start and a load, which ask several, share one listing of each
(:meth:`Tiers.one_listing`). Without a mirror every question goes to the local catalog as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from bgsave.catalog import Catalog, CheckpointInfo
from bgsave.policies import rank

__all__ = ("MirrorStatus", "Tiers")


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    """Where one checkpoint stands between the tiers (``CheckpointManager.mirror_status()``).

    Attributes:
        epoch: The epoch.
        state: "mirrored" (its sidecar is in the mirror), "pending" (queued or uploading),
            "failed" (the upload failed; raised once), or "local" (not due for the mirror, or
            superseded by a newer upload).
        in_local: Committed in the local run directory.
        in_mirror: Committed in the mirror.
        upload_s: Seconds this manager's upload of it took (None if it did not upload it).
        error: Why the upload failed, for "failed".
    """

    epoch: int
    state: str
    in_local: bool
    in_mirror: bool
    upload_s: float | None = None
    error: str | None = None


class Tiers:
    """The local catalog, and the mirror's when there is one (see the module docstring)."""

    def __init__(self, local: Catalog, mirror: Catalog | None) -> None:
        self.local = local
        self.mirror = mirror

    @contextlib.contextmanager
    def one_listing(self) -> Iterator[None]:
        """Each tier's questions on this thread share one listing of it (:meth:`Catalog.one_listing`)."""
        with contextlib.ExitStack() as stack:
            for catalog in (self.local, self.mirror):
                if catalog is not None:
                    stack.enter_context(catalog.one_listing())
            yield

    def committed(self) -> list[CheckpointInfo]:
        """Every committed checkpoint of either tier, in epoch order (the local one where both have it)."""
        found = {info.epoch: info for info in self.mirror.committed()} if self.mirror is not None else {}
        found |= {info.epoch: info for info in self.local.committed()}
        return [found[epoch] for epoch in sorted(found)]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint of either tier (the local one on a tie)."""
        return self._latest()[0]

    def _latest(self) -> tuple[CheckpointInfo | None, Catalog]:
        """The newest committed checkpoint of either tier, and the catalog of the tier it is in."""
        local = self.local.latest()
        mirrored = None if self.mirror is None else self.mirror.latest()
        if self.mirror is not None and _newer(mirrored, local):
            return mirrored, self.mirror
        return local, self.local

    def best(self, metric: str, mode: str) -> CheckpointInfo | None:
        """The best by ``metric`` of either tier (:func:`bgsave.policies.rank`)."""
        if self.mirror is None:
            return self.local.best(metric, mode)
        ranked = rank(self.committed(), metric, mode)
        return ranked[0] if ranked else None

    def by_min_score(self, min_score: float, metric: str) -> list[CheckpointInfo]:
        """Checkpoints of either tier whose ``metric`` is >= ``min_score``, in epoch order."""
        if self.mirror is None:
            return self.local.by_min_score(min_score, metric)
        return [info for info in self.committed() if (v := info.metric(metric)) is not None and v >= min_score]

    def holder(self, epoch: int | None) -> Catalog:
        """The catalog to load ``epoch`` from (None: the latest): the local one unless only the mirror has it."""
        if self.mirror is None:
            return self.local
        if epoch is None:
            return self._latest()[1]
        return self.local if self.local.get(epoch) is not None or self.mirror.get(epoch) is None else self.mirror

    def resume_catalog(self) -> Catalog:
        """The tier a resume continues from: the one whose resumable epoch is newer (the local one on a tie)."""
        if self.mirror is None:
            return self.local
        return self.mirror if _newer(self.mirror.resumable()[0], self.local.resumable()[0]) else self.local

    def status(self, pending: set[int], failed: Mapping[int, str], upload_s: Mapping[int, float]) -> list[MirrorStatus]:
        """Every epoch committed in either tier, in order, with where it stands (one listing of each)."""
        assert self.mirror is not None
        local, mirrored = self.local.epochs(), self.mirror.epochs()
        out = []
        for epoch in sorted(local | mirrored):
            state = "pending" if epoch in pending else "failed" if epoch in failed else "mirrored"
            if state == "mirrored" and epoch not in mirrored:
                state = "local"
            out.append(
                MirrorStatus(epoch, state, epoch in local, epoch in mirrored, upload_s.get(epoch), failed.get(epoch))
            )
        return out


def _newer(mirrored: CheckpointInfo | None, local: CheckpointInfo | None) -> bool:
    """Whether the mirror's checkpoint is newer than the local one (the local copy wins a tie)."""
    return mirrored is not None and (local is None or mirrored.epoch > local.epoch)
