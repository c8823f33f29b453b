"""Serialize: the ``torch.save`` call that turns a snapshot into the bytes of a ``.pt``.

The file is what ``torch.save`` writes, read back by ``torch.load``. One setting is bgsave's own:
CRC32. ``torch.save`` computes a CRC32 of every record, tensors included, which costs the writer
about 0.3 s of CPU per GB (measured on a 2-core VM: a 1 GB save took 0.30 s of user CPU with it and
0.01 s without). ``torch.load`` never checks those CRCs, so they protect nothing a training run reads;
they only let zip tools (``unzip -t``, Python's ``zipfile``) verify the archive. bgsave therefore
writes without them unless asked (``CheckpointManager(crc32=True)``).

The switch is torch's own (``torch.serialization.set_crc32_options``), turned for the duration of
one ``torch.save`` on the thread that writes. Since torch 2.12 torch's config settings are
per-thread (a ``ContextVar``), so the caller's own ``torch.save`` calls keep their setting. In torch
2.6 to 2.11 the setting is process-wide: flipping it on a writer thread would change every other
thread's saves too, so there bgsave leaves it alone and the files carry whatever CRC setting the
process has (on by default).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import IO, Any

import torch

__all__ = ("CRC32_PER_THREAD", "torch_writer")


def _crc32_setting_is_per_thread() -> bool:
    try:
        from torch.utils.serialization import config

        # Read only, to learn how the setting is held.
        entry = vars(config)["_config"]["save.compute_crc32"]
    except (ImportError, AttributeError, KeyError, TypeError):
        return False
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


CRC32_PER_THREAD: bool = _crc32_setting_is_per_thread()
"""Whether this torch keeps the CRC32 setting per thread, so that bgsave can choose it for its writes."""


def torch_writer(obj: Any, *, crc32: bool) -> Callable[[IO[bytes]], None]:
    """A writer for :meth:`bgsave.storage.Storage.write_atomic`: ``torch.save(obj, f)``.

    Args:
        obj: What to save (a snapshot's value).
        crc32: Whether the zip records carry CRC32s. Applied where torch keeps the setting per
            thread (:data:`CRC32_PER_THREAD`); elsewhere the process's setting stands.
    """

    def write(f: IO[bytes]) -> None:
        if not CRC32_PER_THREAD:
            torch.save(obj, f)
            return
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc32)
        try:
            torch.save(obj, f)
        finally:
            torch.serialization.set_crc32_options(before)

    return write
