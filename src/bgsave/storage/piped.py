"""Everything else (``memory://`` and filesystems whose open files are visible while written): one pipe.

The writer's bytes are serialized into memory first and stored with one ``pipe_file`` call. This is
as atomic as the backend's ``pipe_file``: for ``memory://`` it is one dict assignment. Creating a
file only if absent is check-then-write here (no backend of this kind has a conditional create), so
two writers taking the lock at the same instant can both win: use local disk or a bucket for runs
that two jobs might start at once.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

from bgsave.storage.base import Attempt, Storage, Writer

__all__ = ("PipedStorage",)

logger = logging.getLogger(__name__)


class PipedStorage(Storage):
    """A filesystem written with one ``pipe_file`` per file (see the module docstring)."""

    def write_atomic(
        self, path: str, write: Writer, *, before_commit: Callable[[], None] | None = None, direct: bool = False
    ) -> int:
        """Serialize into memory, then one ``pipe_file`` (see :meth:`Storage.write_atomic`)."""
        return self.retrying("writing", path, lambda attempt: self._pipe(attempt, path, write, before_commit))

    def _pipe(self, attempt: Attempt, path: str, write: Writer, before_commit: Callable[[], None] | None) -> int:
        buffer = io.BytesIO()
        attempt.call(buffer, write)
        data = buffer.getvalue()
        buffer.close()
        if before_commit is not None:
            before_commit()
        self.fs.pipe_file(path, data)
        logger.debug("wrote %s (%d bytes)", path, len(data))
        return len(data)
