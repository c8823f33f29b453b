"""Finding: a manager's read-only half: its properties, and list, latest, best, by score, load (:mod:`bgsave.catalog`).

They first wait for the manager's own pending writes (not for uploads), so a manager always reads
what it wrote; with a mirror they read both tiers (:mod:`bgsave.tiers`). They stay local: under
torch.distributed each rank reads its own view of the run directory and never waits for the other
ranks (:mod:`bgsave.distributed`).
"""

from __future__ import annotations

from typing import Any

from bgsave import loading
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog, CheckpointInfo
from bgsave.distributed import Ranks
from bgsave.errors import InvalidArgumentError
from bgsave.jobs import SaveRecord
from bgsave.mirror import Mirror
from bgsave.policies import check_mode
from bgsave.storage import Storage
from bgsave.tiers import MirrorStatus, Tiers
from bgsave.worker import Worker

__all__ = ("Finding",)


class Finding:
    """The read-only half of :class:`~bgsave.CheckpointManager`: what it tells and finds (``_read``: the manager's)."""

    _run_name: str
    _metric: str
    _mode: str
    _storage: Storage
    _catalog: Catalog
    _ranks: Ranks
    _worker: Worker
    _mirror: Mirror | None

    @property
    def run_dir(self) -> str:
        """The run directory (a local path, or the URL for remote run directories)."""
        return self._storage.display(self._storage.root)

    @property
    def checkpoint_dir(self) -> str:
        """``{run_dir}/checkpoints`` (a local path, or the URL for remote run directories)."""
        return self._storage.display(self._catalog.directory)

    @property
    def run_name(self) -> str:
        """The run's name."""
        return self._run_name

    @property
    def rank(self) -> int:
        """This process's rank (0 without torch.distributed)."""
        return self._ranks.rank

    @property
    def world_size(self) -> int:
        """How many ranks make the same calls (1 without torch.distributed)."""
        return self._ranks.world_size

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes (rank 0); the others only check their arguments."""
        return self._ranks.is_writer

    @property
    def records(self) -> tuple[SaveRecord, ...]:
        """Timings of finished saves, oldest first (the last 1024): stall, queue wait, write time, bytes."""
        return tuple(self._worker.records)

    @property
    def mirror(self) -> str | None:
        """The mirror's URL (``mirror=``), or None."""
        return None if self._mirror is None else self._mirror.url

    def mirror_status(self) -> list[MirrorStatus]:
        """Every checkpoint committed in either tier, in epoch order: mirrored, pending, failed or local.

        Lists both tiers (after this manager's pending local writes); ``[]`` without a mirror.

        Example:
            >>> [(s.epoch, s.state) for s in mgr.mirror_status()]  # doctest: +SKIP
            [(10, 'mirrored'), (20, 'pending')]
        """
        tiers = self._tiers()
        return [] if self._mirror is None else tiers.status(*self._mirror.progress())

    def _read(self) -> Catalog:
        """The catalog, once this manager's own pending writes are done (read-your-writes)."""
        raise NotImplementedError

    def _tiers(self) -> Tiers:
        """The local catalog (after pending writes) and the mirror's, if any."""
        return Tiers(self._read(), None if self._mirror is None else self._mirror.catalog)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints of this run, in epoch order (after pending writes finish)."""
        return self._tiers().committed()

    def find_latest_checkpoint(self) -> str | None:
        """Path (or mirror URL) of the newest committed checkpoint in either tier, or None."""
        latest = self._tiers().latest()
        return latest.path if latest else None

    def find_best_checkpoint(self, metric: str = "score", mode: str | None = None) -> str | None:
        """Path of the checkpoint with the best finite ``metric``, or None (ties: the later epoch).

        ``mode``: "max" (higher is better) or "min"; None: the manager's ``mode`` for its own
        ``metric``, "max" for any other.
        """
        if mode is None:
            mode = self._mode if metric == self._metric else "max"
        found = self._tiers().best(metric, check_mode(mode))
        return found.path if found else None

    def find_checkpoints_by_score(self, min_score: float, metric: str = "score") -> list[str]:
        """Paths of checkpoints whose finite ``metric`` is >= ``min_score``, in epoch order."""
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)):
            raise InvalidArgumentError(f"min_score must be a number, got {min_score!r}")
        return [info.path for info in self._tiers().by_min_score(float(min_score), metric)]

    def load_agent(self, epoch: int | None = None, *, map_location: Any = None) -> Any:
        """Load an agent: the latest committed one (None if there is none) when ``epoch`` is None.

        Unpickles (runs code): only point a manager at run directories you trust.

        Raises:
            CheckpointNotFoundError: ``epoch`` was given and has no committed checkpoint.
            CheckpointReadError: the ``.pt`` is truncated or corrupt.
        """
        epoch = None if epoch is None else sidecar_schema.validate_epoch(epoch)
        tiers = self._tiers()
        with tiers.one_listing():  # the tier that holds it, then its checkpoint: one listing of each
            return loading.load_agent(tiers.holder(epoch), epoch, self._run_name, map_location)

    def load_trainer_state(self, *, map_location: Any = None) -> dict[str, Any] | None:
        """The trainer state ``start_run`` would resume with (that epoch's own), or None if it has none."""
        tiers = self._tiers()
        with tiers.one_listing():
            point = loading.resume_point(tiers.resume_catalog(), self._run_name, map_location)
        return None if point is None else point[1]
