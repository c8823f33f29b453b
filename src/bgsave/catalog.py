"""Catalog: which checkpoints a run directory holds, committed or not and why not; latest, best, by score.

Epoch N is *committed* when ``model_N.pt`` and its sidecar ``model_N.yaml`` both exist and the
sidecar parses with ``epoch: N`` (the writer writes the sidecar last; pruning deletes it first).
Anything else named like a checkpoint is an :class:`Entry` with the reason it is not committed.
A resume continues from :meth:`Catalog.resumable`: the newest committed epoch with its trainer state.

What it costs: one listing per question; *latest* reads the newest pair's sidecar, *best* and *by
score* every sidecar, in one batch. A :class:`Catalog` keeps what it read, keyed on the listed size
and tag (inode and mtime, or the ETag) of each sidecar, so the manager reads each at most once, and
what its writer wrote not at all (:meth:`Catalog.wrote`); a new one first learns the last writer's
index (both in :mod:`bgsave.catalog_index`). The listing is always taken afresh: the files are the truth;
only a question made of several (a start: the claim, the tier to resume, its checkpoint) shares one
(:meth:`Catalog.one_listing`), so that a start lists each tier once.

Nothing here unpickles or imports torch: ``bgsave ls`` starts in a fraction of ``import torch``'s time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bgsave import catalog_index, layout
from bgsave import sidecar as sidecar_schema
from bgsave.errors import CheckpointWriteError
from bgsave.lock import HolderKnows
from bgsave.policies import ranked, resume_candidates
from bgsave.storage import FileFacts, Storage, open_storage

__all__ = ("Catalog", "CheckpointInfo", "Entry", "find_latest_checkpoint")

_NO_TRAINER = "committed without its trainer state (killed before it was durable, or saved alone)"
_NO_AGENT = "a trainer state without a committed agent (killed before the sidecar)"


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One committed checkpoint, as its sidecar describes it.

    Attributes:
        epoch: The epoch (= version) number.
        path: The ``.pt`` file (local path or URL), or the ``.dcp`` directory of a sharded save.
        size: Size of the ``.pt`` in bytes.
        sidecar: The parsed sidecar (epoch, agent_step, score, avg_reward, total_time, run, extras).
        has_trainer_state: Whether ``trainer_{epoch}.pt`` was listed beside it.
    """

    epoch: int
    path: str
    size: int
    sidecar: Mapping[str, Any]
    has_trainer_state: bool = False

    def metric(self, name: str) -> float | None:
        """The finite numeric value of ``name`` in the sidecar, or None."""
        return sidecar_schema.metric_value(self.sidecar, name)

    @property
    def sharded(self) -> bool:
        """Whether the weights are a DCP directory of shards (``model_N.dcp``, ``sharding="dcp"``), not a ``.pt``."""
        return self.path.endswith("." + layout.DCP)


@dataclass(frozen=True, slots=True)
class Entry:
    """One epoch whose ``.pt`` or sidecar is in the directory, committed or not.

    Attributes:
        epoch: From the file names.
        path: The ``.pt`` (local path or URL), whether or not it exists.
        pt: What the listing says of the ``.pt``, None when it is missing.
        info: The committed checkpoint, None when it is not committed.
        problem: Why it is not committed ("" when it is).
    """

    epoch: int
    path: str
    pt: FileFacts | None
    info: CheckpointInfo | None
    problem: str = ""


class Catalog:
    """The checkpoints of one checkpoint directory, read through its storage (see the module docstring).

    Thread-safe: the manager asks from the caller's thread while its writer updates from the worker's.

    Example:
        >>> catalog = Catalog(open_storage("runs/exp1"), "runs/exp1/checkpoints")  # doctest: +SKIP
        >>> catalog.latest().path  # doctest: +SKIP
        'runs/exp1/checkpoints/model_0042.pt'
    """

    def __init__(self, storage: Storage, directory: str) -> None:
        self.storage = storage
        self.directory = directory
        self._shown_dir = storage.display(directory).rstrip("/") + "/"  # what users see, but for the name
        self._known = catalog_index.KnownSidecars(storage, directory, self._shown_dir)
        self._infos: dict[int, CheckpointInfo] = {}
        self.holder_knows = HolderKnows()  # filled by the writer that holds this tier's lock
        self._held = threading.local()  # .files: this thread's one_listing(), None until its first question

    @contextlib.contextmanager
    def one_listing(self) -> Iterator[None]:
        """This thread's questions within share one listing (nested: the outer one's); only it writes here meanwhile.

        What it deletes meanwhile goes through :meth:`delete` (a start's claim clearing a killed writer's
        leftovers), after which it lists again.
        """
        outer = hasattr(self._held, "files")
        self._held.files = getattr(self._held, "files", None)
        try:
            yield
        finally:
            if not outer:
                del self._held.files

    def files(self) -> Mapping[str, FileFacts]:
        """The directory's files: the open :meth:`one_listing`'s (taken at its first question), else listed now."""
        files: Mapping[str, FileFacts] | None = getattr(self._held, "files", None)
        if files is None:
            files = self.storage.list_files(self.directory)
            if hasattr(self._held, "files"):
                self._held.files = files
        return files

    # ---- questions ------------------------------------------------------------------------------
    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None: one listing, then the newest pair's sidecar."""
        files, _, committed = self._listing()
        return self._newest(committed, files)

    def resumable(self, passed: Collection[int] = ()) -> tuple[CheckpointInfo | None, dict[int, str]]:
        """The checkpoint a resume continues from, and the newer epochs it passes over, each with why.

        The newest committed epoch that has its trainer state, when any has one (a newer epoch
        without it was killed before its trainer state was durable, or saved without one); else
        the newest committed epoch. Epochs in ``passed`` count as having none (the resume found
        theirs inconsistent). One listing, then the chosen pair's sidecar.
        """
        files, _, committed = self._listing()
        trainers = layout.trainer_epochs_in(files)
        found = self._newest(resume_candidates(committed, trainers - set(passed)), files)
        newer = {e: _NO_TRAINER for e in committed if found is None or e > found.epoch}
        newer |= {e: _NO_AGENT for e in trainers - committed if found is not None and e > found.epoch}
        return found, dict(sorted(newer.items()))

    def _newest(self, candidates: set[int], files: Mapping[str, FileFacts]) -> CheckpointInfo | None:
        candidates = set(candidates)  # newest first; an older one only when the newest's sidecar is unreadable
        while candidates:  # max() each time, not a sort: one max is all it usually takes, whatever N
            if (found := self._one(epoch := max(candidates), files)) is not None:
                return found
            candidates.discard(epoch)
        return None

    def _one(
        self, epoch: int, files: Mapping[str, FileFacts], problems: dict[int, str] | None = None
    ) -> CheckpointInfo | None:
        found = self._infos_of(self._known.of([epoch], files, problems), files)
        return found[0] if found else None

    def get(self, epoch: int) -> CheckpointInfo | None:
        """Epoch's committed checkpoint, or None."""
        return self._one(epoch, self.files())

    def epochs(self) -> set[int]:
        """The committed epochs, from one listing alone (names: no sidecar is read)."""
        return self._listing()[2]

    def committed(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, in epoch order; unreadable sidecars are skipped with a WARNING."""
        files, _, epochs = self._listing()
        return self._infos_of(self._known.of(sorted(epochs), files), files)

    def best(self, metric: str = "score", mode: str = "max") -> CheckpointInfo | None:
        """The committed checkpoint with the best finite ``metric`` (see :func:`bgsave.policies.ranked`), or None."""
        files, found, values = self._scored(metric)
        best = ranked(values, mode, limit=1)
        return self._infos_of({best[0]: found[best[0]]}, files)[0] if best else None

    def by_min_score(self, min_score: float, metric: str = "score") -> list[CheckpointInfo]:
        """Committed checkpoints whose finite ``metric`` is >= ``min_score``, in epoch order."""
        files, found, values = self._scored(metric)
        return self._infos_of({epoch: found[epoch] for epoch, v in values.items() if v >= min_score}, files)

    def _listing(self) -> tuple[Mapping[str, FileFacts], set[int], set[int]]:
        """One listing: its files, the epochs with a ``.pt``, and those with both files."""
        files = self.files()
        pts, sidecars = layout.epochs_in(files)
        return files, pts, pts & sidecars

    def _scored(self, metric: str) -> tuple[Mapping[str, FileFacts], dict[int, dict[str, Any]], dict[int, float]]:
        """One listing, the committed sidecars, and each one's finite ``metric`` by epoch (all in epoch order).

        Ranking makes no CheckpointInfo, only what is handed back does: on local disk each one's size
        is a stat, and a cold catalog of 10,000 would make 10,000 more objects for the collector.
        """
        files, _, epochs = self._listing()
        found = self._known.of(sorted(epochs), files)
        value = sidecar_schema.metric_value
        return files, found, {e: v for e, sidecar in found.items() if (v := value(sidecar, metric)) is not None}

    def entries(self) -> list[Entry]:
        """Every epoch with a ``.pt`` in the directory, committed or not (and why not), in epoch order."""
        files, pts, epochs = self._listing()
        problems: dict[int, str] = {}
        found = self._known.of(sorted(epochs), files, problems)
        infos = {info.epoch: info for info in self._infos_of(found, files)}
        return [
            Entry(
                epoch,
                self._display(layout.data_name(epoch, files)),
                files.get(layout.data_name(epoch, files)),
                infos.get(epoch),
                "" if epoch in infos else problems.get(epoch, "no sidecar (a save in progress, or killed)"),
            )
            for epoch in sorted(pts)  # a sidecar alone is no checkpoint to list (`bgsave show` explains it)
        ]

    def entry(self, epoch: int) -> Entry:
        """One epoch, as :meth:`entries` would describe it (also when only its sidecar exists, or nothing)."""
        files = self.files()
        name = layout.data_name(epoch, files)
        pt = files.get(name)
        problems: dict[int, str] = {}
        info = self._one(epoch, files, problems)
        problem = "" if info is not None else "the .pt is missing" if pt is None else problems.get(epoch, "")
        if layout.checkpoint_name(epoch, layout.YAML) not in files:
            problem = "no sidecar"
        return Entry(epoch, self._display(name), pt, info, problem)

    # ---- what the writer tells it ---------------------------------------------------------------
    def wrote(self, epoch: int, sidecar: Mapping[str, Any], size: int) -> None:
        """Our own writer committed ``sidecar`` (``size`` bytes) for ``epoch``: no need to read it back."""
        self._known.wrote(epoch, sidecar, size)

    def forget(self, epoch: int) -> None:
        """Our own writer removed or is replacing ``epoch``'s sidecar."""
        self._known.forget(epoch)

    def remove(self, infos: Iterable[CheckpointInfo]) -> None:
        """Delete checkpoints: each one's sidecar first (a crash leaves it uncommitted), its ``.pt``, its trainer state.

        Raises:
            CheckpointWriteError: a file could not be deleted; earlier epochs are gone, this one is
                at worst uncommitted.
        """
        for info in infos:
            self.forget(info.epoch)
            data = layout.checkpoint_name(info.epoch, layout.DCP if info.sharded else layout.PT)
            names = [layout.checkpoint_name(info.epoch, layout.YAML), data]
            if info.has_trainer_state:
                names.append(layout.trainer_name(info.epoch))
            for name in names:
                try:
                    self.delete([name])
                except Exception as exc:
                    shown = self.storage.display(self.path_of(name))
                    raise CheckpointWriteError(
                        f"could not delete {shown} while pruning epoch {info.epoch}: {type(exc).__name__}: {exc}",
                        epoch=info.epoch,
                        path=shown,
                    ) from exc

    def delete(self, names: Iterable[str]) -> None:
        """Delete files here by name, in order (a ``.dcp`` directory whole); an open :meth:`one_listing` lists again."""
        if hasattr(self._held, "files"):
            self._held.files = None  # set before the first delete: one that fails midway still lists again
        for name in names:
            path = self.path_of(name)
            (self.storage.remove_tree if name.endswith("." + layout.DCP) else self.storage.delete)(path)

    def save_index(self) -> None:
        """Write the index of what this catalog knows (the writer, as it closes; see :mod:`bgsave.catalog_index`)."""
        self._known.save_index()

    def path_of(self, name: str) -> str:
        """The fsspec path of a file in the checkpoint directory."""
        return self.storage.join_dir(self.directory, name)

    def path(self, epoch: int, suffix: str = layout.PT) -> str:
        """The fsspec path of epoch's ``.pt`` (or ``.yaml``)."""
        return self.storage.join_dir(self.directory, layout.checkpoint_name(epoch, suffix))

    def _display(self, name: str) -> str:
        return self._shown_dir + name

    def _infos_of(self, sidecars: Mapping[int, dict[str, Any]], files: Mapping[str, FileFacts]) -> list[CheckpointInfo]:
        """A CheckpointInfo for each epoch's sidecar whose ``.pt`` is listed, sized from the listing, in order.

        The same objects while nothing changed: a warm catalog of 10,000 then makes nothing the
        garbage collector has to walk (a full collection under torch costs ~0.1 s).
        """
        out = []
        for epoch, sidecar in sidecars.items():
            name = layout.data_name(epoch, files)
            pt = files.get(name)
            if pt is None:  # not committed, or gone since the listing
                continue
            trainer = layout.trainer_name(epoch) in files
            info = self._infos.get(epoch)
            if info is None or info.sidecar is not sidecar or info.size != pt.size or info.has_trainer_state != trainer:
                info = self._infos[epoch] = CheckpointInfo(epoch, self._display(name), pt.size, sidecar, trainer)
            out.append(info)
        return out


def find_latest_checkpoint(checkpoint_dir: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Path of the newest committed checkpoint in ``checkpoint_dir`` (or in a run directory), or None.

    Example:
        >>> find_latest_checkpoint("runs/exp1/checkpoints")  # doctest: +SKIP
        'runs/exp1/checkpoints/model_0042.pt'
    """
    storage = open_storage(checkpoint_dir, storage_options)
    found = Catalog(storage, storage.root).latest()
    if found is None and storage.root.rsplit("/", 1)[-1] != layout.CHECKPOINTS:
        found = Catalog(storage, storage.join(layout.CHECKPOINTS)).latest()
    return found.path if found else None
