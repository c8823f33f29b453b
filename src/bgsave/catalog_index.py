"""Catalog index: the sidecars a catalog knows, kept in memory and in one file, so that no reader reads one twice.

A :class:`KnownSidecars` is a catalog's memory: each sidecar it read, with the size and tag it was
listed with, and each its own writer wrote; a sidecar is read again only when the listing shows it
changed. What the writer knew at its close goes into one file, which the next writer loads first:

``{run_dir}/checkpoints/.bgsave-catalog.json``, one column per field::

    {"format": 2, "names": ["model_0010.yaml", …], "sizes": [312, …], "tags": [2953…, …],
     "sidecars": [{"epoch": 10, "score": 0.8, …}, …]}

Entry i is a sidecar's name, size, tag (inode and mtime on local disk, the ETag on object stores)
and content; columns rather than a list per entry, so that parsing 10,000 entries makes 10,000
objects the garbage collector tracks, not 20,000. The writer writes the file when it closes,
atomically like any other, from what its catalog knows and has seen listed (:func:`dumps`). A
reader about to read many sidecars loads it first (:func:`loads`), and then uses an entry only where
the listing shows that sidecar with the same size and tag: a sidecar changed, added or removed since
is read, or left out, as without an index. So the sidecar stays the commit marker, the index never
makes a checkpoint, and an index that is stale, missing or unreadable costs reads, never a wrong
answer. Plain JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave.storage import FileFacts, Storage

logger = logging.getLogger(__name__)

__all__ = ("FORMAT", "MIN_ENTRIES", "KnownSidecars", "dumps", "loads", "read", "write")

Known = tuple[int, object]  # what a catalog knows of a sidecar: (size, tag) as listed; tag None: its own write

FORMAT = 2
MIN_ENTRIES = 256
"""Below this many sidecars, reading them is about as quick as reading an index: none is written or read."""

_COLUMNS = ("names", "sizes", "tags", "sidecars")


def dumps(entries: Mapping[str, tuple[FileFacts, Mapping[str, Any]]]) -> bytes:
    """The index of ``entries`` (sidecar name -> its listed facts and content); facts without a tag are left out."""
    columns: dict[str, list[Any]] = {key: [] for key in _COLUMNS}
    for name, (facts, sidecar) in entries.items():
        if isinstance(facts.tag, (int, str)) and not isinstance(facts.tag, bool):
            for key, value in zip(_COLUMNS, (name, facts.size, facts.tag, dict(sidecar)), strict=True):
                columns[key].append(value)
    return json.dumps({"format": FORMAT, **columns}, separators=(",", ":")).encode()


def loads(data: bytes) -> tuple[dict[str, tuple[int, object]], dict[str, dict[str, Any]]]:
    """Each indexed sidecar's (size, tag) as listed when indexed, and its content, by name; wrong entries dropped.

    An entry is right when its name, size, tag and the sidecar's epoch agree.

    Raises:
        ValueError: not JSON, or not an index of this format.
    """
    parsed = json.loads(data)
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
        raise ValueError(f"not a bgsave catalog index of format {FORMAT}")
    columns = [parsed.get(key) for key in _COLUMNS]
    if not all(type(column) is list for column in columns):
        raise ValueError("a bgsave catalog index whose columns are not lists")
    facts: dict[str, tuple[int, object]] = {}
    sidecars: dict[str, dict[str, Any]] = {}
    for name, size, tag, sidecar in zip(*columns, strict=True):  # columns of unequal length: ValueError
        # Plain type checks, no walk of the values: 10,000 entries are read where 10,000 files were.
        if type(size) is not int or type(tag) not in (int, str) or type(sidecar) is not dict:
            continue
        epoch = sidecar.get("epoch")
        if type(epoch) is int and name == layout.checkpoint_name(epoch, layout.YAML):
            facts[name], sidecars[name] = (size, tag), sidecar
    return facts, sidecars


def read(
    storage: Storage, directory: str, files: Mapping[str, FileFacts]
) -> tuple[dict[str, tuple[int, object]], dict[str, dict[str, Any]]] | None:
    """The index in ``directory`` (whose listing is ``files``) as :func:`loads` gives it; None if absent or unreadable.

    An unreadable index is logged (WARNING) and only costs reads: every sidecar is read as without one.
    """
    if layout.CATALOG_INDEX not in files:
        return None
    path = storage.join_dir(directory, layout.CATALOG_INDEX)
    try:
        loaded = loads(storage.read_bytes(path))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the catalog index %s: %s", storage.display(path), exc)
        return None
    logger.debug("loaded %d entries of %s", len(loaded[0]), path)
    return loaded


def write(storage: Storage, directory: str, entries: Mapping[str, tuple[FileFacts, Mapping[str, Any]]]) -> None:
    """Write the index of ``entries`` into ``directory`` atomically, unless they are fewer than :data:`MIN_ENTRIES`."""
    if len(entries) < MIN_ENTRIES:
        return
    path = storage.join_dir(directory, layout.CATALOG_INDEX)
    storage.write_bytes_atomic(path, dumps(entries))
    logger.debug("wrote %s (%d sidecars)", path, len(entries))


class KnownSidecars:
    """The sidecars one catalog read or its writer wrote, each with the (size, tag) it was listed with.

    Thread-safe: the manager reads from the caller's thread while its writer tells from the worker's.
    """

    def __init__(self, storage: Storage, directory: str, shown_dir: str) -> None:
        self.storage = storage
        self.directory = directory
        self._shown_dir = shown_dir
        self._lock = threading.Lock()
        # sidecar name -> (size, tag) when read, and its content: plain tuples of atomic values (the
        # collector stops tracking them) in two dicts, so 10,000 sidecars leave it 10,000 objects, not 30,000.
        self._facts: dict[str, Known] = {}
        self._sidecars: dict[str, dict[str, Any]] = {}
        self._index_tried = False

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

    def of(
        self, epochs: list[int], files: Mapping[str, FileFacts], problems: dict[int, str] | None = None
    ) -> dict[int, dict[str, Any]]:
        """The readable sidecars of ``epochs`` (in that order) in the listing ``files``; reads those it does not know.

        An unreadable one is logged (WARNING) and left out; ``problems`` gets why, by epoch.
        """
        if len(epochs) >= MIN_ENTRIES and not self._index_tried:
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

    def save_index(self) -> None:
        """Write the index of what is known (the writer, as it closes).

        One listing confirms what our own writer wrote; nothing unknown is read for it. Below
        :data:`MIN_ENTRIES` known sidecars, no index is written.
        """
        if len(self._facts) < MIN_ENTRIES:
            return  # too few to be worth an index: not even a listing
        files = self.storage.list_files(self.directory)
        with self._lock:
            entries = {
                name: (listed, self._sidecars[name])
                for name, known in self._facts.items()
                if (listed := files.get(name)) is not None and _unchanged(known, listed)
            }
        write(self.storage, self.directory, entries)

    def _load_index(self, files: Mapping[str, FileFacts]) -> None:
        """Learn the entries of the last writer's index (each still checked against the listing when used)."""
        self._index_tried = True
        loaded = read(self.storage, self.directory, files)
        if loaded is not None:
            with self._lock:  # what this catalog read itself is newer than the index: it stays
                self._facts, self._sidecars = loaded[0] | self._facts, loaded[1] | self._sidecars

    def _read(
        self, todo: Mapping[str, int], files: Mapping[str, FileFacts], problems: dict[int, str] | None
    ) -> dict[int, dict[str, Any]]:
        """Read the sidecars at ``todo``'s paths (path -> epoch), remember them, and return the readable ones."""
        contents = self.storage.read_many_with_facts(todo)
        out: dict[int, dict[str, Any]] = {}
        facts_of: dict[str, Known] = {}
        sidecar_of: dict[str, dict[str, Any]] = {}
        for path, epoch in todo.items():
            read_ = contents[path]
            name = layout.checkpoint_name(epoch, layout.YAML)
            shown = self._shown_dir + name
            try:
                if isinstance(read_, Exception):
                    raise ValueError(f"{shown}: {type(read_).__name__}: {read_}")
                sidecar = sidecar_schema.loads(read_[0], source=shown)
                if sidecar["epoch"] != epoch:
                    raise ValueError(f"{shown}: sidecar says epoch {sidecar['epoch']}, file name says {epoch}")
            except ValueError as exc:
                logger.warning("skipping checkpoint with an unreadable sidecar: %s", exc)
                if problems is not None:
                    problems[epoch] = f"sidecar unreadable: {exc}"
                continue
            out[epoch] = sidecar
            # The facts of what was read, where the read gives them (an open file's fstat), else the listing's.
            facts = read_[1] or files.get(name)
            if facts is not None and facts.tag is not None:  # a backend that cannot tell a change gets no cache
                facts_of[name], sidecar_of[name] = (facts.size, facts.tag), sidecar
        with self._lock:
            self._facts.update(facts_of)
            self._sidecars.update(sidecar_of)
        return out


def _unchanged(known: Known, listed: FileFacts) -> bool:
    """Whether a sidecar known as ``known`` is still the one ``listed`` (our own write: size only, until listed)."""
    return known[0] == listed.size and known[1] in (None, listed.tag)
