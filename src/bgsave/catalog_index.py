"""Catalog index: the sidecars a run's writer knew, in one file, so that a new reader need not read them all.

``{run_dir}/checkpoints/.bgsave-catalog.json``::

    {"format": 1, "sidecars": {"model_0010.yaml": [312, 2953…, {"epoch": 10, "score": 0.8, …}], …}}

Each entry is a sidecar's size, its tag (inode and mtime on local disk, the ETag on object stores)
and its content. The writer writes the file when it closes, atomically like any other, from what its
catalog knows and has seen listed (:func:`dumps`). A reader about to read many sidecars loads it
first (:func:`loads`), and then uses an entry only where the listing shows that sidecar with the
same size and tag: a sidecar changed, added or removed since is read, or left out, as without an
index. So the sidecar stays the commit marker, the index never makes a checkpoint, and an index that
is stale, missing or unreadable costs reads, never a wrong answer. Plain JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bgsave import layout
from bgsave.storage import FileFacts

__all__ = ("FORMAT", "MIN_ENTRIES", "dumps", "loads")

FORMAT = 1
MIN_ENTRIES = 256
"""Below this many sidecars, reading them is about as quick as reading an index: none is written or read."""


def dumps(entries: Mapping[str, tuple[FileFacts, Mapping[str, Any]]]) -> bytes:
    """The index of ``entries`` (sidecar name -> its listed facts and content); facts without a tag are left out."""
    out = {
        name: [facts.size, facts.tag, dict(sidecar)]
        for name, (facts, sidecar) in entries.items()
        if isinstance(facts.tag, (int, str)) and not isinstance(facts.tag, bool)
    }
    return json.dumps({"format": FORMAT, "sidecars": out}, separators=(",", ":")).encode()


def loads(data: bytes) -> tuple[dict[str, FileFacts], dict[str, dict[str, Any]]]:
    """Each indexed sidecar's facts (as listed when indexed) and content, by name; entries of a wrong shape dropped.

    An entry's shape is right when its name, size, tag and the sidecar's epoch agree.

    Raises:
        ValueError: not JSON, or not an index of this format.
    """
    parsed = json.loads(data)
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT or not isinstance(parsed.get("sidecars"), dict):
        raise ValueError(f"not a bgsave catalog index of format {FORMAT}")
    facts: dict[str, FileFacts] = {}
    sidecars: dict[str, dict[str, Any]] = {}
    for name, entry in parsed["sidecars"].items():
        # Plain type checks, no walk of the values: 10,000 entries are read where 10,000 files were.
        if type(entry) is not list or len(entry) != 3:
            continue
        size, tag, sidecar = entry
        if type(size) is not int or type(tag) not in (int, str) or type(sidecar) is not dict:
            continue
        epoch = sidecar.get("epoch")
        if type(epoch) is int and name == layout.checkpoint_name(epoch, layout.YAML):
            facts[name], sidecars[name] = FileFacts(size, None, tag), sidecar
    return facts, sidecars
