"""Distributed: under torch.distributed, who writes, who waits, and how a resume reaches every rank.

Every rank builds the same :class:`~bgsave.CheckpointManager` and makes the same calls; rank 0 is
the writer and the others only check their arguments::

    save_*             rank 0: snapshot + background write (as one process does)
                       other ranks: the same argument checks, then nothing: no I/O, no lock, no copy
    start_run          collective: rank 0 lists the run once and decides; the decision, and with
                       resume="broadcast" the agent and trainer state, reach every rank
    wait(), close()    collective: a write that failed on rank 0 is raised on every rank
    find_*, load_*     local: each rank reads its own view, never waits for the others

bgsave's collectives run on a gloo group of its own, created on every rank by the manager (never
the training group, never from the worker thread), each with ``collective_timeout_s``: a rank that
died makes the others fail with :class:`~bgsave.DistributedError` instead of hanging. Nothing
collective runs in the exit hook, the finalizer or the SIGTERM path, nor in ``close()`` while the
``with`` block is raising (the other ranks may be gone).

What rank 0 sends is plain ``torch.save`` bytes, loaded on each rank with its own ``map_location``:
each rank gets what it would have got by loading the files itself (node-local run directories and
buckets read by one rank work alike). The trainer state is rank 0's: with ``rng=True``, ``restore``
puts rank 0's random streams on every rank, which resumes exactly where every rank draws the same
streams (seed per-rank randomness, such as each rank's episodes, from a stream plus the rank).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

from bgsave import errors
from bgsave.errors import (
    BgsaveError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DistributedError,
    InvalidArgumentError,
)
from bgsave.loading import RunStart

__all__ = ("DISTRIBUTED_MODES", "RESUME_MODES", "Ranks", "check_timeout", "destroy_group", "new_gloo_group")

logger = logging.getLogger(__name__)

DISTRIBUTED_MODES = ("auto", "off")
RESUME_MODES = ("broadcast", "each_rank")

T = TypeVar("T")


def check_timeout(value: object) -> float:
    """``collective_timeout_s`` as a float > 0, else InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise InvalidArgumentError(f"collective_timeout_s must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def new_gloo_group(timeout_s: float) -> Any:
    """A gloo group of every rank (a collective: every rank in the same order), with ``timeout_s``.

    Gloo: CPU tensors, and it raises on timeout where NCCL's watchdog aborts the process.
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def destroy_group(group: Any) -> None:
    """Drop a group made by :func:`new_gloo_group` (local, no collective); None: nothing to drop."""
    import torch.distributed as dist

    if group is None or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group(group)
    except Exception as exc:  # the default group may be torn down already
        logger.debug("could not destroy a process group of bgsave's: %s", exc)


class Ranks:
    """This process's place among the run's ranks, and bgsave's own process group.

    One process (``distributed="off"``, or no process group of more than one rank) is rank 0 of 1
    and every collective is a plain call.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None, timeout_s: float = 1800.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group = group
        self._timeout_s = timeout_s

    @classmethod
    def join(cls, distributed: str, timeout_s: float) -> Ranks:
        """Detect the process group (from the group itself: ``mp.spawn`` sets no env variables).

        Raises:
            InvalidArgumentError: ``WORLD_SIZE`` > 1 is set but no process group exists yet.
        """
        if distributed not in DISTRIBUTED_MODES:
            raise InvalidArgumentError(f"distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")
        if distributed == "off":
            return cls()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            world = os.environ.get("WORLD_SIZE", "")
            if world.isdigit() and int(world) > 1:
                raise InvalidArgumentError(
                    f"WORLD_SIZE={world} is set but torch.distributed has no process group yet: create the "
                    "CheckpointManager after torch.distributed.init_process_group() (on every rank), "
                    "or pass distributed='off' for one manager per process"
                )
            return cls()
        world_size = dist.get_world_size()
        if world_size == 1:
            return cls()
        # A group of bgsave's own: its collectives never interleave with the training group's.
        ranks = cls(dist.get_rank(), world_size, None, timeout_s)
        what = "creating bgsave's process group (every rank constructs the CheckpointManager, or distributed='off')"
        ranks._group = ranks._collective(what, lambda: new_gloo_group(timeout_s))
        return ranks

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks."""
        return self._group is not None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes; the other ranks only check their arguments."""
        return self.rank == 0

    def close(self) -> None:
        """Drop bgsave's process group (local: no collective)."""
        group, self._group = self._group, None
        destroy_group(group)

    # ---- collectives --------------------------------------------------------------------------
    def _collective(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} with the other ranks failed: a rank died, or "
                f"did not make the same call within collective_timeout_s={self._timeout_s:g}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def broadcast(self, what: str, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0, group=self._group))
        return box[0]

    def any(self, what: str, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (so that every rank takes the same branch)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], dtype=torch.int32)
        self._collective(what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group))
        return bool(value.item())

    def gather(self, what: str, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, value, group=self._group))
        return out

    def everywhere(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call`` on rank 0 and give its small result to every rank; what it raises, every rank raises.

        The other ranks get the same error class with rank 0's message, epoch and path; the cause
        (another process's) is chained as text.
        """
        if not self.distributed:
            return call()
        error: Exception | None = None
        result: Any = None
        if self.is_writer:
            try:
                result = call()
            except Exception as exc:
                error = exc
        summary, result = self.broadcast(what, (None if error is None else _summary(error), result))
        if error is not None:
            raise error
        if summary is not None:
            raise _rebuild(summary)
        return result  # type: ignore[no-any-return]

    def share(
        self, what: str, make: Callable[[], T], map_location: Any = None, send: Callable[[T], T] = lambda v: v
    ) -> T:
        """Rank 0's ``make()`` on every rank: torch.save bytes there, torch.load here (``map_location``).

        Rank 0 keeps what it made; the others get ``send(made)``. What ``make`` raises on rank 0 is
        raised on every rank (:meth:`everywhere`).
        """
        if not self.distributed:
            return make()
        made: list[Any] = []

        def run() -> int:
            made.append(make())
            buffer = io.BytesIO()
            torch.save(send(made[0]), buffer)
            made.append(buffer.getbuffer())
            return len(made[1])

        size = self.everywhere(what, run)
        import torch.distributed as dist

        if self.is_writer:
            buffer = torch.frombuffer(made[1], dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        if size:
            self._collective(what, lambda: dist.broadcast(buffer, src=0, group=self._group))
        if self.is_writer:
            return made[0]  # type: ignore[no-any-return]
        data = io.BytesIO(buffer.numpy().tobytes())
        return torch.load(data, map_location=map_location, weights_only=False)  # type: ignore[no-any-return]

    def start(
        self,
        resume: str,
        *,
        start: Callable[[], RunStart],
        decide: Callable[[], tuple[int, bool] | None],
        load: Callable[[int, bool], RunStart],
        map_location: Any,
    ) -> RunStart:
        """``start_run`` on every rank: rank 0's ``start()`` shared, or (``"each_rank"``) its decision.

        ``decide`` (rank 0) takes the lock and picks the epoch and whether it has a trainer state;
        each rank then ``load``s that epoch itself, and if any cannot, every rank raises.
        """
        if resume == "broadcast" or not self.distributed:
            return self.share("start_run", start, map_location, RunStart.for_other_ranks)
        decision = self.everywhere("start_run", decide)
        if decision is None:  # a new run: rank 0's new agent, as with "broadcast"
            return self.share("start_run", start, map_location, RunStart.for_other_ranks)
        epoch, with_trainer = decision
        found: RunStart | None = None
        failure = ""
        try:
            found = load(epoch, with_trainer)
        except BgsaveError as exc:
            failure = f"rank {self.rank}: {exc}"
        failures = [f for f in self.gather("start_run", failure) if f]
        if failures or found is None:
            raise CheckpointNotFoundError(
                f"resume='each_rank': not every rank can load epoch {epoch}, which rank 0 resumes: "
                + "; ".join(failures),
                epoch=epoch,
            )
        return found


def _summary(error: Exception) -> tuple[str, str, int | None, str | None, str]:
    cause = error.__cause__
    return (
        type(error).__name__ if isinstance(error, BgsaveError) else "",
        str(error) if isinstance(error, BgsaveError) else f"{type(error).__name__}: {error}",
        getattr(error, "epoch", None),
        getattr(error, "path", None),
        "" if cause is None else f"{type(cause).__name__}: {cause}",
    )


def _rebuild(summary: tuple[str, str, int | None, str | None, str]) -> BgsaveError:
    name, message, epoch, path, cause = summary
    cls = getattr(errors, name, None) if name else None
    text = f"on rank 0: {message}"
    error: BgsaveError
    if isinstance(cls, type) and issubclass(cls, errors.CheckpointError):
        error = cls(text, epoch=epoch, path=path)
    elif cls is errors.RunLockedError:
        error = errors.RunLockedError(text, path=path or "")
    elif isinstance(cls, type) and issubclass(cls, BgsaveError):
        error = cls(text)
    else:  # not one of bgsave's: it failed a write on rank 0
        error = CheckpointWriteError(text, epoch=epoch, path=path)
    if cause:
        error.__cause__ = RuntimeError(f"on rank 0: {cause}")
    return error
