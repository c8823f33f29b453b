"""Part buffers kept from one upload for the next, so that an upload does not fill fresh memory.

A fresh 8 MiB buffer costs 2,048 page faults as it is filled, and more where a VM has handed freed
memory back to its host (free page reporting): 128 MiB uploads to loopback S3 took 6-10% longer in
fresh buffers than in kept ones here (benchmarks/README.md, "Mirror and parallel parts"). Each object
store keeps one pool for all its uploads (:mod:`~bgsave.storage.parts`), holding at most the
``max_concurrency + 1`` parts one upload has in use, and frees it when its manager closes
(:meth:`bgsave.storage.Storage.drop_buffers`).
"""

from __future__ import annotations

import io
import threading

__all__ = ("PartBuffers",)


class PartBuffers:
    """The free part buffers of one storage, at most ``keep`` (see the module docstring); thread-safe."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._free: list[io.BytesIO] = []

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> io.BytesIO:
        """A buffer to fill from its start: a kept one, else a new one."""
        with self._lock:
            part = self._free.pop() if self._free else io.BytesIO()
        part.seek(0)
        return part

    def give(self, part: io.BytesIO) -> None:
        """Keep ``part`` (no longer being sent) for the next :meth:`take`, unless ``keep`` are kept already."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(part)

    def clear(self) -> None:
        """Free the kept buffers (the storage's owner closed)."""
        with self._lock:
            self._free.clear()
