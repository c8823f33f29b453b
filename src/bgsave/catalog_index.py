"""Catalog index: the sidecars a run's writer knew, in one file, so that a new reader need not read them all.

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
from collections.abc import Mapping
from typing import Any

from bgsave import layout
from bgsave.storage import FileFacts, Storage

logger = logging.getLogger(__name__)

__all__ = ("FORMAT", "MIN_ENTRIES", "dumps", "loads", "read", "write")

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
