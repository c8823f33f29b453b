"""Snapshot: a CPU copy of an agent or optimizer state; once taken, the caller may mutate freely.

``torch.save`` would pickle the live object, so a background writer must be handed a copy that
nothing else touches. The copy is made in two parts:

1. **Tensors** reachable from the object (parameters, buffers, tensors held in attributes, lists and
   dicts) are grouped by the storage they view, and each storage is copied, whole, into a CPU buffer.
   Views are rebuilt on those buffers with the same offset, size and stride, so tied weights and
   views keep sharing memory exactly as ``torch.save`` would record them. Buffers are *reused* from
   one save to the next (a :class:`SnapshotPool` keeps them per kind): ``copy_`` into memory that is
   already mapped runs several times faster than allocating fresh pages, and that copy is what the
   training loop waits for. A buffer whose size no longer fits is simply reallocated.
2. **Everything else** (Python attributes, config, lists) is copied with ``copy.deepcopy``, whose memo
   is pre-filled with the CPU tensors from step 1, so no tensor is copied twice and none stays on GPU.
   A tensor the walk could not reach is still copied, by deepcopy's own rules.

On CUDA the buffers are pinned and the copies run ``non_blocking`` on a side stream that first waits
for the caller's stream; the caller's stream then waits on the copy's event (so later kernels cannot
overwrite a source before it is copied) and the writer synchronizes on that event before writing.
The caller's thread is not blocked by the device-to-host copy; its stream is, for the copy alone.
"""

from __future__ import annotations

import copy
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ("Snapshot", "SnapshotPool")

# Types the walk never looks inside: they cannot hold tensors, or hold them in ways deepcopy handles.
_LEAF_TYPES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    torch.device,
    torch.dtype,
)


@dataclass(eq=False)
class Snapshot:
    """A CPU copy of one object, owning the buffers its tensors live in.

    Attributes:
        kind: The pool key it was taken under ("agent", "trainer_state").
        value: The copy, ready for ``torch.save`` once :meth:`wait_ready` returns.
        nbytes: Bytes of tensor data copied.
    """

    kind: str
    value: Any
    nbytes: int
    buffers: list[torch.Tensor] = field(repr=False)
    _ready: Callable[[], None] | None = field(default=None, repr=False)

    def wait_ready(self) -> None:
        """Block until asynchronous device-to-host copies have landed (a no-op for CPU sources)."""
        if self._ready is not None:
            self._ready()
            self._ready = None


def _find_tensors(root: object) -> list[torch.Tensor]:
    """Tensors reachable from ``root`` through modules, containers and instance attributes, in a stable order."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAF_TYPES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(reversed(list(obj)))
        else:
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                stack.extend(reversed(list(attrs.values())))
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return found


def _copyable(t: torch.Tensor) -> bool:
    # Plain tensors and Parameters on real devices; subclasses, sparse, quantized and meta tensors
    # are left to deepcopy, which knows their rules.
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and t.device.type != "meta"
        and t.untyped_storage().nbytes() > 0
    )


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
            Exception: whatever ``copy.deepcopy`` raises for an object it cannot copy.
        """
        with self._lock:
            free = self._free.get(kind)
            old = free.pop() if free else []

        groups: dict[tuple[torch.device, int], tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
        for t in _find_tensors(obj):
            if _copyable(t):
                storage = t.untyped_storage()
                key = (t.device, storage.data_ptr())
                groups.setdefault(key, (storage, []))[1].append(t)

        buffers: list[torch.Tensor] = []
        memo: dict[int, Any] = {}
        cuda_events: list[torch.cuda.Event] = []
        nbytes = 0
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, ((device, _), (storage, tensors)) in enumerate(groups.items()):
            size = storage.nbytes()
            pin = device.type == "cuda"
            buf = old[i] if i < len(old) else None
            if buf is None or buf.numel() != size or buf.is_pinned() != pin:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            buffers.append(buf)
            nbytes += size
            src = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            by_device.setdefault(device, []).append((buf, src))
            cpu_storage = buf.untyped_storage()
            for t in tensors:
                view = torch.empty(0, dtype=t.dtype).set_(cpu_storage, t.storage_offset(), t.size(), t.stride())
                if isinstance(t, torch.nn.Parameter):
                    memo[id(t)] = torch.nn.Parameter(view, requires_grad=t.requires_grad)
                else:
                    if t.requires_grad:
                        view.requires_grad_(True)
                    memo[id(t)] = view

        for device, pairs in by_device.items():
            if device.type == "cuda":
                cuda_events.append(self._copy_async(device, pairs))
            else:
                for buf, src in pairs:
                    buf.copy_(src)

        value = copy.deepcopy(obj, memo)
        ready = None
        if cuda_events:

            def ready() -> None:
                for event in cuda_events:
                    event.synchronize()

        return Snapshot(kind=kind, value=value, nbytes=nbytes, buffers=buffers, _ready=ready)

    def _copy_async(self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        caller = torch.cuda.current_stream(device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for buf, src in pairs:
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
        with self._lock:
            self._free.setdefault(snapshot.kind, []).append(snapshot.buffers)
        snapshot.buffers = []

    def clear(self) -> None:
        """Drop every buffer kept for reuse."""
        with self._lock:
            self._free.clear()
