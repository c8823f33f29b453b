"""Serialize: the ``torch.save`` call that turns a snapshot into the bytes of a ``.pt``.

The file is what ``torch.save`` writes, read back by ``torch.load``. Two of torch's own save
settings are bgsave's choice, set for the duration of one ``torch.save`` on the thread that writes:

- **CRC32** (``torch.serialization.set_crc32_options``). ``torch.save`` computes a CRC32 of every
  record, tensors included: about 0.3 s of the writer's CPU per GB (a 1 GB save on a 2-core VM took
  0.30 s of user CPU with them, 0.01 s without). ``torch.load`` never checks them, so they protect
  nothing a training run reads; they let zip tools (``unzip -t``, Python's ``zipfile``) verify the
  archive. Off unless asked for (``CheckpointManager(crc32=True)``).
- **Where tensor bytes start** (``torch.utils.serialization.config.save.storage_alignment``,
  64 bytes by default). For a large checkpoint on local disk bgsave asks for 4 KiB, so each
  tensor's bytes sit on a disk-block boundary and can go from the snapshot's page-aligned buffers
  to the disk with ``O_DIRECT``, past the page cache (:mod:`bgsave.storage`). It costs at most
  4 KiB of padding per tensor; ``torch.load`` (``mmap=True`` too) reads the file as any other.

Torch keeps these settings per thread since 2.12 (a ``ContextVar``), so the caller's own
``torch.save`` calls keep theirs. In torch 2.6 to 2.11 they are process-wide: changing them on a
writer thread would change every other thread's saves too, so there bgsave leaves them alone (the
files carry CRC32s, tensors 64-byte aligned, unless the process says otherwise).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import torch

__all__ = ("SETTINGS_PER_THREAD", "torch_writer")


def _settings_are_per_thread() -> bool:
    try:
        from torch.utils.serialization import config

        # Read only, to learn how the settings are held.
        entries = vars(config)["_config"]
        held = [entries[name] for name in ("save.compute_crc32", "save.storage_alignment")]
    except (ImportError, AttributeError, KeyError, TypeError):
        return False
    return all(isinstance(getattr(entry, "user_override", None), contextvars.ContextVar) for entry in held)


SETTINGS_PER_THREAD: bool = _settings_are_per_thread()
"""Whether this torch keeps its save settings per thread, so that bgsave can choose them for its writes."""


@contextmanager
def _save_settings(crc32: bool, alignment: int | None) -> Iterator[None]:
    if not SETTINGS_PER_THREAD:
        yield
        return
    from torch.utils.serialization import config

    before = (config.save.compute_crc32, config.save.storage_alignment)
    config.save.compute_crc32 = crc32
    if alignment is not None:
        config.save.storage_alignment = alignment
    try:
        yield
    finally:
        config.save.compute_crc32, config.save.storage_alignment = before


def torch_writer(obj: Any, *, crc32: bool, alignment: int | None = None) -> Callable[[IO[bytes]], None]:
    """A writer for :meth:`bgsave.storage.Storage.write_atomic`: ``torch.save(obj, f)``.

    Args:
        obj: What to save (a snapshot's value).
        crc32: Whether the zip records carry CRC32s.
        alignment: Where in the file each tensor's bytes may start (a multiple of this); None
            keeps torch's 64 bytes.

    Both apply where torch keeps these settings per thread (:data:`SETTINGS_PER_THREAD`); elsewhere
    the process's settings stand.
    """

    def write(f: IO[bytes]) -> None:
        with _save_settings(crc32, alignment):
            torch.save(obj, f)

    return write
