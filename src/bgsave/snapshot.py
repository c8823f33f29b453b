"""Snapshot: a CPU copy of an agent or optimizer state; once taken, the caller may mutate freely.

``torch.save`` would pickle the live object, so a background writer must be handed a copy that
nothing else touches. The copy is made in two parts, in one pass:

1. **Tensors** reachable from the object (parameters, buffers, tensors held in attributes, lists and
   dicts) are grouped by the storage they view, and each storage is copied, whole, into a CPU buffer.
   Views are rebuilt on those buffers with the same offset, size and stride, so tied weights and
   views keep sharing memory exactly as ``torch.save`` would record them. Buffers are *reused* from
   one save to the next (a :class:`SnapshotPool` keeps them per kind, matched by size): copying into
   memory that is already mapped runs several times faster than allocating fresh pages, and that
   copy is what the training loop waits for. A buffer whose size no longer fits is simply
   reallocated. CPU sources are copied with one ``memcpy`` per storage (see :func:`_copy_host`).
2. **Everything else** (Python attributes, config, lists) is *pickled* on the caller's thread, by
   the C pickler, with each tensor replaced by a reference to its CPU view; the writer unpickles it
   when it first reads :attr:`Snapshot.value`. Pickling is what ``torch.save`` will do anyway, so it
   reaches every tensor the file will hold, and it costs the caller a fraction of a walk plus
   ``copy.deepcopy`` (on a 12-layer transformer, 122 modules, the whole snapshot fell from 22 ms to
   5 ms of CPU on 2 busy cores). Objects whose class defines ``__deepcopy__`` keep being copied by it (a
   handle that returns itself stays shared). An object the pickler refuses (a lambda, a lock) is
   refused at the call (:class:`NotPicklableError`): ``torch.save`` pickles too, and would fail in
   the writer, to be reported a save later.

Objects that own an operating-system resource (a pipe's connection, a socket, an open file, a
process, a memory map: :data:`bgsave.graph.OWNS_OS_RESOURCE`) are refused at the call, with an
``InvalidArgumentError`` naming their attribute path (``agent.envs._pipes[0]``): a copy of one
carries the caller's handle (the same file descriptor) and closes it when the copy is freed, so the
caller's live pipe would fail with ``EBADF``. The pickler refuses them, and where the pickler gives
up before meeting one (a lambda first), a dry pass (:class:`ResourceCheck`) names it, so the message
says what matters most. What ``__getstate__`` leaves out is not looked at; an object with its own
``__deepcopy__`` is trusted with its copy.

On CUDA the buffers are pinned and the copies run ``non_blocking`` on a side stream that first waits
for the caller's stream; the caller's stream then waits on the copy's event (so later kernels cannot
overwrite a source before it is copied) and the writer synchronizes on that event before writing.
The caller's thread is not blocked by the device-to-host copy; its stream is, for the copy alone.
"""

from __future__ import annotations

import copy
import ctypes
import io
import logging
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from bgsave.graph import BY_VALUE, RefusedError, ResourceCheck, find_tensors, owns_os_resource, refusal
from bgsave.storage.diskfile import page_buffer

__all__ = ("NotPicklableError", "Snapshot", "SnapshotPool")

logger = logging.getLogger(__name__)


class NotPicklableError(Exception):
    """What was to be snapshotted cannot be pickled (so ``torch.save`` could not write it)."""


class Snapshot:
    """A CPU copy of one object, owning the buffers its tensors live in.

    Attributes:
        kind: The pool key it was taken under ("agent", "trainer_state").
        value: The copy, ready for ``torch.save`` once :meth:`wait_ready` returns. Reading it the
            first time rebuilds the object from the snapshot (on the writer's thread).
        nbytes: Bytes of tensor data copied.
        buffers: The CPU buffers the copy's tensors live in.
    """

    def __init__(
        self,
        kind: str,
        value: Any,
        nbytes: int,
        buffers: list[torch.Tensor],
        _ready: Callable[[], None] | None = None,
        *,
        _pickled: bytes | None = None,
        _refs: list[Any] | None = None,
    ) -> None:
        self.kind = kind
        self.nbytes = nbytes
        self.buffers = buffers
        self._value = value
        self._ready = _ready
        self._pickled = _pickled
        self._refs = _refs or []

    @property
    def value(self) -> Any:
        """The copy (rebuilt from its pickle on first access)."""
        if self._pickled is not None:
            self._value = _SnapshotUnpickler(io.BytesIO(self._pickled), self._refs).load()
            self._pickled, self._refs = None, []
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value, self._pickled, self._refs = value, None, []

    def wait_ready(self) -> None:
        """Block until asynchronous device-to-host copies have landed (a no-op for CPU sources)."""
        if self._ready is not None:
            self._ready()
            self._ready = None

    def __repr__(self) -> str:
        return f"Snapshot(kind={self.kind!r}, nbytes={self.nbytes})"


def _copyable(t: torch.Tensor) -> bool:
    # Plain tensors and Parameters on real devices. Subclasses, sparse, nested, quantized and meta
    # tensors, and those with a lazy conjugate or negative bit (a view rebuilt on raw storage would
    # drop it), are copied by their own pickling (or deepcopy) rules instead.
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_nested
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
        and t.device.type != "meta"
        and t.untyped_storage().nbytes() > 0
    )


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of ``storage``, on its device."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _copy_host(buf: torch.Tensor, storage: torch.UntypedStorage) -> None:
    """Copy a CPU storage's bytes into ``buf`` with one ``memcpy`` on this thread.

    Not ``buf.copy_``: torch splits a large copy across its intra-op threads, and each parallel
    region waits for its slowest thread. When the other cores are busy (the writer of the previous
    save, data loaders, other jobs) that wait dominates: on 2 busy cores ``copy_`` took 10-40 ms for
    10 MB against 2 ms for one ``memcpy``, and 1.3-2.5 times as long for 1 GB. The copy is bound by
    memory bandwidth, which one thread already saturates here, and glibc's ``memcpy`` uses
    non-temporal stores for large copies. ctypes releases the GIL for the call.
    """
    ctypes.memmove(buf.data_ptr(), storage.data_ptr(), min(buf.numel(), storage.nbytes()))


# CPU buffers this large start on a page boundary (below this, torch's allocator gives 64 bytes).
_PAGE_ALIGNED_MIN = 2**20


def _new_buffer(size: int, pin: bool) -> torch.Tensor:
    """A byte buffer for one storage's copy: pinned for CUDA sources, page-aligned when large.

    Page alignment lets the writer send the bytes to disk with ``O_DIRECT`` straight from this
    buffer (:mod:`bgsave.diskfile`). A private anonymous ``mmap`` is what malloc would use at this
    size anyway; the tensor keeps the mapping alive and it is unmapped with the tensor's storage.
    The first copy into fresh pages is what a run's first save waits for, page fault by page fault:
    the mapping asks for huge pages, or is populated in one call where there are none
    (:func:`bgsave.storage.diskfile.page_buffer`), which took a 128 MiB first copy from 140-170 ms
    to 55 ms here (a copy into mapped pages: 22 ms). Pinned buffers come from CUDA's host allocator
    (page-aligned in practice; memory the disk refuses is copied through the writer's staging
    buffer instead).
    """
    if pin or size < _PAGE_ALIGNED_MIN:
        return torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    return torch.frombuffer(page_buffer(size), dtype=torch.uint8)


def _ref(index: int) -> Any:
    """Stands for the ``index``-th copied object in a snapshot's pickle; :class:`_SnapshotUnpickler` resolves it."""
    raise RuntimeError("bgsave.snapshot._ref is resolved by the snapshot's unpickler, not called")


class _SnapshotPickler(pickle.Pickler):
    """Pickles an object graph, passing copies of some objects by reference instead of by value.

    Copyable tensors become references to their CPU views; objects whose class defines its own
    ``__deepcopy__`` (a handle that must stay shared, an array type) are copied by it, as before,
    and passed by reference too; an object owning an OS resource raises :class:`RefusedError`.
    ``reducer_override`` is consulted only for objects the C pickler has no fast path for (not
    ints, strings, dicts, lists...), so the Python-level cost is per module and tensor, not per value.
    """

    def __init__(self, file: io.BytesIO, copier: _Copier) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._copier = copier

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is OrderedDict and not getattr(obj, "__dict__", None):
            # OrderedDict's own reduce, minus a Python-level copyreg._slotnames call per dict (a C
            # type cannot cache __slotnames__): every module holds eight of them, for its hooks.
            return OrderedDict, (), None, None, iter(obj.items())
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            index = self._copier.view_of(obj)
            return NotImplemented if index is None else (_ref, (index,))
        if owns_os_resource(obj):  # before __deepcopy__: not even shared by reference into the file
            raise RefusedError(obj)
        # Other tensors and storages pickle by value (deep-copying a storage wrapper only warns).
        if isinstance(obj, BY_VALUE) or getattr(cls, "__deepcopy__", None) is None:
            return NotImplemented
        return _ref, (self._copier.deepcopy(obj),)


class _SnapshotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, refs: list[Any]) -> None:
        super().__init__(file)
        self._refs = refs

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_ref":
            return self._refs.__getitem__
        return super().find_class(module, name)


class _Copier:
    """Gives each tensor a CPU view on a buffer holding its whole storage; :meth:`copy` fills the buffers.

    Views and deep-copied objects are kept in :attr:`refs`, the table a snapshot's pickle refers to.
    """

    def __init__(self, spare: dict[tuple[int, bool], list[torch.Tensor]]) -> None:
        self.refs: list[Any] = []
        self.buffers: list[torch.Tensor] = []
        self.nbytes = 0
        # One deepcopy memo for the whole snapshot: source tensor ids -> CPU views, and whatever
        # deepcopy adds, so objects copied by separate calls still share what they shared.
        self.memo: dict[int, Any] = {}
        self._spare = spare
        self._index: dict[int, int] = {}
        self._sources: list[torch.Tensor] = []  # keeps ids unique while the snapshot is taken
        self._storages: dict[tuple[torch.device, int], torch.UntypedStorage] = {}
        self._pending: dict[torch.device, list[tuple[torch.Tensor, torch.UntypedStorage]]] = {}

    def view_of(self, t: torch.Tensor) -> int | None:
        """The index of ``t``'s CPU view in :attr:`refs`, or None when ``t`` is left to pickle / deepcopy."""
        index = self._index.get(id(t))
        if index is not None or not _copyable(t):
            return index
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        cpu_storage = self._storages.get(key)
        if cpu_storage is None:
            size = storage.nbytes()
            pin = t.device.type == "cuda"
            reusable = self._spare.get((size, pin))
            buf = reusable.pop() if reusable else _new_buffer(size, pin)
            self.buffers.append(buf)
            self.nbytes += size
            self._pending.setdefault(t.device, []).append((buf, storage))
            cpu_storage = self._storages[key] = buf.untyped_storage()
        view = torch.empty(0, dtype=t.dtype).set_(cpu_storage, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
        elif t.requires_grad:
            view.requires_grad_(True)
        index = self._index[id(t)] = len(self.refs)
        self.refs.append(view)
        self.memo[id(t)] = view
        self._sources.append(t)
        return index

    def deepcopy(self, obj: object) -> int:
        """Deep-copy ``obj`` with every tensor it holds on a CPU view; returns the copy's index in :attr:`refs`."""
        for t in find_tensors(obj):
            self.view_of(t)
        self.refs.append(copy.deepcopy(obj, self.memo))
        return len(self.refs) - 1

    def copy(
        self, copy_async: Callable[[torch.device, list[tuple[torch.Tensor, torch.UntypedStorage]]], Any]
    ) -> list[Any]:
        """Copy every storage seen into its buffer; returns what ``copy_async`` returned per CUDA device."""
        events = []
        for device, pairs in self._pending.items():
            if device.type == "cuda":
                events.append(copy_async(device, pairs))
            elif device.type == "cpu":
                for buf, storage in pairs:
                    _copy_host(buf, storage)
            else:
                for buf, storage in pairs:
                    buf.copy_(_as_bytes(storage))
        self._pending.clear()
        self._sources.clear()
        return events


class SnapshotPool:
    """Takes snapshots into CPU buffers that are reused across saves, per kind.

    Thread-safe: snapshots are taken on the caller's thread and released by the writer's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, list[list[torch.Tensor]]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def take(self, kind: str, obj: object) -> Snapshot:
        """Copy ``obj`` to CPU; the caller may mutate ``obj`` as soon as this returns.

        Raises:
            InvalidArgumentError: ``obj`` holds an object owning an OS resource (a pipe, socket, open
                file, process...); the message names its path from ``kind``. Nothing was copied.
            NotPicklableError: ``obj`` cannot be pickled (a lambda, a lock), so torch.save could not
                write it either; the cause is chained. Nothing was copied.
        """
        with self._lock:
            free = self._free.get(kind)
            old = free.pop() if free else []
        # Reuse by size, not position: a model that gains or loses a tensor keeps its other buffers.
        spare: dict[tuple[int, bool], list[torch.Tensor]] = {}
        for buf in old:
            spare.setdefault((buf.numel(), buf.is_pinned()), []).append(buf)

        copier = _Copier(spare)
        file = io.BytesIO()
        pickled: bytes | None = None
        try:
            try:
                _SnapshotPickler(file, copier).dump(obj)
                pickled = file.getvalue()
            except RefusedError:
                raise
            except Exception as exc:
                # Not picklable (a lambda, a lock): torch.save, which pickles too, would fail in the
                # writer, a save later. Fail now; but an OS resource anywhere is named first.
                ResourceCheck().check(obj)
                raise NotPicklableError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException as exc:
            self._give_back(kind, old)  # nothing was copied into them yet
            if isinstance(exc, RefusedError):
                raise refusal(kind, obj, exc.args[0]) from None
            raise
        events = copier.copy(self._copy_async)

        ready = None
        if events:

            def ready() -> None:
                for event in events:
                    event.synchronize()

        return Snapshot(kind, None, copier.nbytes, copier.buffers, ready, _pickled=pickled, _refs=copier.refs)

    def _copy_async(
        self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.UntypedStorage]]
    ) -> torch.cuda.Event:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        caller = torch.cuda.current_stream(device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for buf, storage in pairs:
                src = _as_bytes(storage)
                buf.copy_(src, non_blocking=True)
                # The caching allocator must not hand the source's memory to another tensor
                # until the side stream has read it.
                src.record_stream(stream)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        caller.wait_event(event)
        return event

    def release(self, snapshot: Snapshot) -> None:
        """Give a written snapshot's buffers back for reuse by the next save of the same kind."""
        snapshot.value = None
        self._give_back(snapshot.kind, snapshot.buffers)
        snapshot.buffers = []

    def _give_back(self, kind: str, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.setdefault(kind, []).append(buffers)

    def clear(self) -> None:
        """Drop every buffer kept for reuse."""
        with self._lock:
            self._free.clear()
