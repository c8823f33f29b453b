"""Catalog: which checkpoints a run directory holds, committed or not and why not; latest, best, by score.

A checkpoint of epoch N is *committed* when both ``model_N.pt`` and its sidecar ``model_N.yaml``
exist and the sidecar parses with ``epoch: N`` (the writer writes the sidecar last, and pruning
deletes it first). Everything else named like a checkpoint is an :class:`Entry` with the reason it
is not committed: a save in progress or killed (no sidecar), a sidecar without its ``.pt``, an
unreadable sidecar. Other files (temp files, the trainer state, a user's notes) are not entries.

What it costs. One listing per question, whatever the question. *Latest* needs no sidecar but the
newest one: the listing already says which epochs have both files, so it reads the newest pair's
sidecar (and the next older only if that one is unreadable). *Best* and *by score* read every
sidecar, in one batch (one concurrent GET each on object stores). A :class:`Catalog` keeps what it
has read, keyed on what the listing says of each sidecar (size and a tag: inode and mtime on local
disk, the ETag on object stores), so a long-lived reader (the manager) reads each sidecar at most
once in its life and a changed one again; what its own writer wrote is handed over without a read
(:meth:`Catalog.wrote`). A listing is always taken afresh: the files are the truth, never the cache.
A new catalog about to read many sidecars first learns the last writer's index
(:mod:`bgsave.catalog_index`), whose entries pass the same check against the listing.

Nothing here unpickles, and this module never imports torch: ``bgsave ls`` starts in a fraction of
``import torch``'s time. Loading is :mod:`bgsave.loading`'s.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bgsave import catalog_index, layout
from bgsave import sidecar as sidecar_schema
from bgsave.errors import CheckpointWriteError, InvalidArgumentError
from bgsave.storage import FileFacts, Storage, open_storage

__all__ = ("MODES", "Catalog", "CheckpointInfo", "Entry", "check_mode", "find_latest_checkpoint", "rank")

logger = logging.getLogger(__name__)

MODES = ("max", "min")

Known = tuple[int, object]
"""What a catalog knows of a sidecar it read: (size, tag) as listed then; tag None: our own write."""


def check_mode(mode: object, *, argument: str = "mode") -> str:
    """Return ``mode`` if it is "max" or "min", else raise InvalidArgumentError naming ``argument``."""
    if mode not in MODES:
        raise InvalidArgumentError(f"{argument} must be 'max' (higher is better) or 'min', got {mode!r}")
    return str(mode)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One committed checkpoint, as its sidecar describes it.

    Attributes:
        epoch: The epoch (= version) number.
        path: The ``.pt`` file (local path or URL).
        size: Size of the ``.pt`` in bytes.
        sidecar: The parsed sidecar (epoch, agent_step, score, avg_reward, total_time, run, extras).
    """

    epoch: int
    path: str
    size: int
    sidecar: Mapping[str, Any]

    def metric(self, name: str) -> float | None:
        """The finite numeric value of ``name`` in the sidecar, or None."""
        return sidecar_schema.metric_value(self.sidecar, name)


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


def rank(infos: Iterable[CheckpointInfo], metric: str, mode: str = "max") -> list[CheckpointInfo]:
    """Checkpoints with a finite ``metric``, best first; equal values: the later epoch first.

    The one place "best" is decided (``find_best_checkpoint``, ``bgsave best``, retention's ``keep_best``).
    """
    sign = 1.0 if check_mode(mode) == "max" else -1.0
    scored = [(sign * v, info.epoch, info) for info in infos if (v := info.metric(metric)) is not None]
    scored.sort(key=operator.itemgetter(0, 1), reverse=True)
    return [info for _, _, info in scored]


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
        self._lock = threading.Lock()
        self._shown_dir = storage.display(directory).rstrip("/") + "/"  # what users see, but for the name
        # sidecar name -> (size, tag) when read (tag None: our own writer wrote it, not listed yet), and
        # its content. Plain tuples of atomic values, which the garbage collector stops tracking, in two
        # dicts: a catalog of 10,000 then leaves the collector 10,000 objects to walk, not 30,000.
        self._facts: dict[str, Known] = {}
        self._sidecars: dict[str, dict[str, Any]] = {}
        self._infos: dict[int, CheckpointInfo] = {}
        self._index_tried = False

    # ---- questions ------------------------------------------------------------------------------
    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None: one listing, then the newest pair's sidecar."""
        files, _, candidates = self._listing()
        while candidates:  # newest first; an older one only when the newest sidecar is unreadable
            epoch = max(candidates)
            found = self._infos_of(self._sidecars_of([epoch], files), files)
            if found:
                return found[0]
            candidates.discard(epoch)
        return None

    def get(self, epoch: int) -> CheckpointInfo | None:
        """Epoch's committed checkpoint, or None when it has none."""
        files = self.storage.list_files(self.directory)
        found = self._infos_of(self._sidecars_of([epoch], files), files)
        return found[0] if found else None

    def committed(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, in epoch order; unreadable sidecars are skipped with a WARNING."""
        files, _, epochs = self._listing()
        return self._infos_of(self._sidecars_of(sorted(epochs), files), files)

    def best(self, metric: str = "score", mode: str = "max") -> CheckpointInfo | None:
        """The committed checkpoint with the best finite ``metric`` (as :func:`rank` orders them), or None."""
        sign = 1.0 if check_mode(mode) == "max" else -1.0
        files, found, values = self._scored(metric)
        best = max(values, key=lambda epoch: (sign * values[epoch], epoch), default=None)
        return None if best is None else self._infos_of({best: found[best]}, files)[0]

    def by_min_score(self, min_score: float, metric: str = "score") -> list[CheckpointInfo]:
        """Committed checkpoints whose finite ``metric`` is >= ``min_score``, in epoch order."""
        files, found, values = self._scored(metric)
        return self._infos_of({epoch: found[epoch] for epoch, v in values.items() if v >= min_score}, files)

    def _listing(self) -> tuple[Mapping[str, FileFacts], set[int], set[int]]:
        """One listing: its files, the epochs with a ``.pt``, and those with both files."""
        files = self.storage.list_files(self.directory)
        pts, sidecars = layout.epochs_in(files)
        return files, pts, pts & sidecars

    def _scored(self, metric: str) -> tuple[Mapping[str, FileFacts], dict[int, dict[str, Any]], dict[int, float]]:
        """One listing, the committed sidecars, and each one's finite ``metric`` by epoch (all in epoch order).

        Ranking makes no CheckpointInfo, only what is handed back does: on local disk each one's size
        is a stat, and a cold catalog of 10,000 would make 10,000 more objects for the collector.
        """
        files, _, epochs = self._listing()
        found = self._sidecars_of(sorted(epochs), files)
        value = sidecar_schema.metric_value
        return files, found, {e: v for e, sidecar in found.items() if (v := value(sidecar, metric)) is not None}

    def entries(self) -> list[Entry]:
        """Every epoch with a ``.pt`` in the directory, committed or not (and why not), in epoch order."""
        files, pts, epochs = self._listing()
        problems: dict[int, str] = {}
        found = self._sidecars_of(sorted(epochs), files, problems)
        infos = {info.epoch: info for info in self._infos_of(found, files)}
        return [
            Entry(
                epoch,
                self._display(epoch),
                files.get(layout.checkpoint_name(epoch, layout.PT)),
                infos.get(epoch),
                "" if epoch in infos else problems.get(epoch, "no sidecar (a save in progress, or killed)"),
            )
            for epoch in sorted(pts)  # a sidecar alone is no checkpoint to list (`bgsave show` explains it)
        ]

    def entry(self, epoch: int) -> Entry:
        """One epoch, as :meth:`entries` would describe it (also when only its sidecar exists, or nothing)."""
        files = self.storage.list_files(self.directory)
        pt = files.get(layout.checkpoint_name(epoch, layout.PT))
        has_sidecar = layout.checkpoint_name(epoch, layout.YAML) in files
        problems: dict[int, str] = {}
        found = self._infos_of(self._sidecars_of([epoch], files, problems), files)
        info = found[0] if found else None
        if info is not None:
            problem = ""
        elif not has_sidecar:
            problem = "no sidecar"
        elif pt is None:
            problem = "the .pt is missing"
        else:
            problem = problems[epoch]
        return Entry(epoch, self._display(epoch), pt, info, problem)

    # ---- what the writer tells it ---------------------------------------------------------------
    def wrote(self, epoch: int, sidecar: Mapping[str, Any], size: int) -> None:
        """Our own writer committed ``sidecar`` (``size`` bytes) for ``epoch``: no need to read it back."""
        with self._lock:
            name = layout.checkpoint_name(epoch, layout.YAML)
            self._facts[name], self._sidecars[name] = (size, None), dict(sidecar)

    def forget(self, epoch: int) -> None:
        """Our own writer removed or is replacing ``epoch``'s sidecar."""
        with self._lock:
            name = layout.checkpoint_name(epoch, layout.YAML)
            self._facts.pop(name, None)
            self._sidecars.pop(name, None)

    def remove(self, infos: Iterable[CheckpointInfo]) -> None:
        """Delete checkpoints, each sidecar first (so a crash leaves an uncommitted ``.pt``), then its ``.pt``.

        Raises:
            CheckpointWriteError: a file could not be deleted; earlier epochs are gone, this one is
                at worst uncommitted.
        """
        for info in infos:
            self.forget(info.epoch)
            for suffix in (layout.YAML, layout.PT):
                path = self.path(info.epoch, suffix)
                try:
                    self.storage.delete(path)
                except Exception as exc:
                    shown = self.storage.display(path)
                    raise CheckpointWriteError(
                        f"could not delete {shown} while pruning epoch {info.epoch}: {type(exc).__name__}: {exc}",
                        epoch=info.epoch,
                        path=shown,
                    ) from exc

    # ---- the index -------------------------------------------------------------------------------
    def _load_index(self, files: Mapping[str, FileFacts]) -> None:
        """Learn the entries of the last writer's index (each still checked against the listing when used)."""
        self._index_tried = True
        if layout.CATALOG_INDEX not in files:
            return
        path = self.storage.join_dir(self.directory, layout.CATALOG_INDEX)
        try:
            facts, sidecars = catalog_index.loads(self.storage.read_bytes(path))
        except (OSError, ValueError) as exc:  # only costs reads: every sidecar is read as without one
            logger.warning("ignoring the catalog index %s: %s", self.storage.display(path), exc)
            return
        with self._lock:
            # What this catalog read itself is newer than the index: it stays.
            facts.update(self._facts)
            sidecars.update(self._sidecars)
            self._facts, self._sidecars = facts, sidecars
        logger.debug("loaded %d entries of %s", len(facts), path)

    def save_index(self) -> None:
        """Write the index of what this catalog knows (the writer, as it closes; see :mod:`bgsave.catalog_index`).

        One listing confirms what our own writer wrote; nothing unknown is read for it. Below
        :data:`~bgsave.catalog_index.MIN_ENTRIES` known sidecars, no index is written.
        """
        if len(self._facts) < catalog_index.MIN_ENTRIES:
            return  # too few to be worth an index: not even a listing
        files = self.storage.list_files(self.directory)
        with self._lock:
            entries = {}
            for name, facts in self._facts.items():
                listed = files.get(name)
                if listed is not None and _unchanged(facts, listed):
                    entries[name] = (listed, self._sidecars[name])
        if len(entries) < catalog_index.MIN_ENTRIES:
            return
        path = self.storage.join_dir(self.directory, layout.CATALOG_INDEX)
        self.storage.write_bytes_atomic(path, catalog_index.dumps(entries))
        logger.debug("wrote %s (%d sidecars)", path, len(entries))

    def path(self, epoch: int, suffix: str = layout.PT) -> str:
        """The fsspec path of epoch's ``.pt`` (or ``.yaml``)."""
        return self.storage.join_dir(self.directory, layout.checkpoint_name(epoch, suffix))

    # ---- reading sidecars ------------------------------------------------------------------------
    def _display(self, epoch: int) -> str:
        return self._shown_dir + layout.checkpoint_name(epoch, layout.PT)

    def _sidecars_of(
        self, epochs: list[int], files: Mapping[str, FileFacts], problems: dict[int, str] | None = None
    ) -> dict[int, dict[str, Any]]:
        """The sidecars of the committed checkpoints among ``epochs`` (in that order); reads those it does not know."""
        if len(epochs) >= catalog_index.MIN_ENTRIES and not self._index_tried:
            self._load_index(files)
        found: dict[int, dict[str, Any]] = {}
        todo: dict[str, int] = {}  # path -> epoch
        known_facts, known_sidecars = self._facts, self._sidecars
        with self._lock:
            for epoch in epochs:
                name = layout.checkpoint_name(epoch, layout.YAML)
                known = known_facts.get(name)
                if known is None:
                    if name in files:
                        todo[self.storage.join_dir(self.directory, name)] = epoch
                    continue
                listed = files.get(name)  # a stat on local disk: only to check what is known
                if listed is None:
                    continue
                if _unchanged(known, listed):
                    if known[1] is None and listed.tag is not None:  # our own write, now seen listed
                        known_facts[name] = (listed.size, listed.tag)
                    found[epoch] = known_sidecars[name]
                else:
                    todo[self.storage.join_dir(self.directory, name)] = epoch
        if todo:
            found.update(self._read(todo, files, problems))
            found = {epoch: found[epoch] for epoch in epochs if epoch in found}
        return found

    def _infos_of(self, sidecars: Mapping[int, dict[str, Any]], files: Mapping[str, FileFacts]) -> list[CheckpointInfo]:
        """A CheckpointInfo for each epoch's sidecar whose ``.pt`` is listed, sized from the listing, in order.

        The same objects while nothing changed: a warm catalog of 10,000 then makes nothing the
        garbage collector has to walk (a full collection under torch costs ~0.1 s).
        """
        out = []
        for epoch, sidecar in sidecars.items():
            pt = files.get(layout.checkpoint_name(epoch, layout.PT))
            if pt is None:  # not committed, or gone since the listing
                continue
            info = self._infos.get(epoch)
            if info is None or info.sidecar is not sidecar or info.size != pt.size:
                info = self._infos[epoch] = CheckpointInfo(epoch, self._display(epoch), pt.size, sidecar)
            out.append(info)
        return out

    def _read(
        self, todo: Mapping[str, int], files: Mapping[str, FileFacts], problems: dict[int, str] | None
    ) -> dict[int, dict[str, Any]]:
        """Read the sidecars at ``todo``'s paths (path -> epoch), remember them, and return the readable ones."""
        contents = self.storage.read_many_with_facts(todo)
        out: dict[int, dict[str, Any]] = {}
        facts_of: dict[str, Known] = {}
        sidecar_of: dict[str, dict[str, Any]] = {}
        for path, epoch in todo.items():
            read = contents[path]
            name = layout.checkpoint_name(epoch, layout.YAML)
            shown = self._shown_dir + name
            try:
                if isinstance(read, Exception):
                    raise ValueError(f"{shown}: {type(read).__name__}: {read}")
                sidecar = sidecar_schema.loads(read[0], source=shown)
                if sidecar["epoch"] != epoch:
                    raise ValueError(f"{shown}: sidecar says epoch {sidecar['epoch']}, file name says {epoch}")
            except ValueError as exc:
                logger.warning("skipping checkpoint with an unreadable sidecar: %s", exc)
                if problems is not None:
                    problems[epoch] = f"sidecar unreadable: {exc}"
                continue
            out[epoch] = sidecar
            # The facts of what was read, where the read gives them (an open file's fstat), else the listing's.
            facts = read[1] or files.get(name)
            if facts is not None and facts.tag is not None:  # a backend that cannot tell a change gets no cache
                facts_of[name], sidecar_of[name] = (facts.size, facts.tag), sidecar
        with self._lock:
            self._facts.update(facts_of)
            self._sidecars.update(sidecar_of)
        return out


def _unchanged(known: Known, listed: FileFacts) -> bool:
    """Whether a sidecar known as ``known`` is still the one ``listed`` (our own write: size only, until listed)."""
    return known[0] == listed.size and known[1] in (None, listed.tag)


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
