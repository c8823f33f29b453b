"""Graph: walking the object a snapshot copies: its tensors, the path to any part, and what must not be copied.

Objects that own an operating-system resource (:data:`OWNS_OS_RESOURCE`: a pipe's connection, a
socket, an open file, a process, a memory map) are never copied: a copy carries the caller's handle
(the same file descriptor) and closes it when it is freed, so the caller's live pipe would then fail
with ``EBADF``. :mod:`bgsave.snapshot` refuses them at the call with an error naming their attribute
path (:func:`refusal`: ``agent.envs._pipes[0]``), from its pickler, or before its deepcopy fallback
from a dry pass (:class:`ResourceCheck`), so nothing is copied first.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import logging
import mmap
import multiprocessing.connection
import multiprocessing.process
import pickle
import select
import selectors
import socket
import subprocess
import types
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import torch

from bgsave.errors import InvalidArgumentError

__all__ = (
    "BY_VALUE",
    "OWNS_OS_RESOURCE",
    "RefusedError",
    "ResourceCheck",
    "find_tensors",
    "owns_os_resource",
    "refusal",
)

logger = logging.getLogger(__name__)

# Tensors and storages that are not copied by reference pickle by value (deep-copying a storage wrapper only warns).
BY_VALUE = (torch.Tensor, torch.TypedStorage, torch.UntypedStorage)

# Types the walk never looks inside: they cannot hold tensors, or hold them in ways deepcopy handles.
_LEAF_TYPES: tuple[type, ...] = (str, bytes, bytearray, int, float, complex, bool, type(None), type, types.FunctionType)
_LEAF_TYPES += (types.BuiltinFunctionType, types.MethodType, types.ModuleType, torch.device, torch.dtype)

# Objects that own an OS resource: a copy would carry the same handle (a Connection's fd, a socket, a
# Popen's pid, a Process's sentinel) and close or reap it when freed, breaking the caller's object.
# Most are unpicklable too, but refusing them up front keeps the deepcopy fallback from copying (and
# freeing) the pipes it meets first, and names the attribute. A broader rule (any class that defines
# ``__del__``) was not taken: it would refuse ordinary objects whose finalizer only tidies their own
# state, and a bare int fd would still pass. Handles live in these types, and a wrapper owning one
# (a vector env, a DataLoader's worker iterator, a logging handler) is refused at the handle inside it.
OWNS_OS_RESOURCE: tuple[type, ...] = (
    multiprocessing.connection.Connection,  # a Pipe() end; its __del__ closes the fd
    getattr(multiprocessing.connection, "PipeConnection", multiprocessing.connection.Connection),  # Windows
    socket.socket,
    io.IOBase,  # every stream: IOBase's finalizer calls close(), which closes what the copy shares
    multiprocessing.process.BaseProcess,
    subprocess.Popen,
    mmap.mmap,
    selectors.BaseSelector,
    *(getattr(select, name) for name in ("epoll", "kqueue", "devpoll") if hasattr(select, name)),
)
# Streams over memory hold their bytes by value (their pickle copies the buffer): a copy shares nothing.
_IN_MEMORY = (io.BytesIO, io.StringIO)


def owns_os_resource(obj: object) -> bool:
    """Whether a copy of ``obj`` would share (and close) an operating-system handle of the caller's."""
    return isinstance(obj, OWNS_OS_RESOURCE) and not isinstance(obj, _IN_MEMORY)


class RefusedError(Exception):
    """Raised by a pickling pass at ``args[0]``, an object owning an OS resource; :func:`refusal` words it."""


def _edges(obj: object) -> Iterator[tuple[object, str]]:
    """``(child, step)`` for each item, attribute and slot the walks follow out of ``obj``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield value, f"[{key!r}]" if isinstance(key, (str, int, float, bool)) else f"[<{type(key).__name__}>]"
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((value, f"[{i}]" if isinstance(obj, (list, tuple)) else "{...}") for i, value in enumerate(obj))
    else:
        attrs = getattr(obj, "__dict__", None)
        for name, value in attrs.items() if isinstance(attrs, dict) else ():
            # A module's children, parameters and buffers show as attributes: agent.envs, not agent._modules['envs'].
            in_module = name in ("_modules", "_parameters", "_buffers") and isinstance(obj, torch.nn.Module)
            if in_module and isinstance(value, dict):
                yield from ((child, f"[{key}]" if str(key).isdigit() else f".{key}") for key, child in value.items())
            else:
                yield value, f".{name}"
        for cls in type(obj).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if hasattr(obj, slot):
                    yield getattr(obj, slot), f".{slot}"


def find_tensors(root: object) -> list[torch.Tensor]:
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
        else:
            stack.extend(reversed([child for child, _ in _edges(obj)]))
    return found


def refusal(kind: str, root: object, refused: object) -> InvalidArgumentError:
    """The error for ``refused``, named by its shortest path from ``root``: a breadth-first walk, on this path only."""
    path, seen, queue = f"an object inside {kind}", {id(root)}, deque([(root, kind)])
    while queue:
        obj, where = queue.popleft()
        if obj is refused:
            path = where
            break
        with contextlib.suppress(Exception):  # an attribute that cannot be read is one less way to find it
            if not isinstance(obj, (*_LEAF_TYPES, torch.Tensor)):
                fresh = [(child, where + step) for child, step in _edges(obj) if id(child) not in seen]
                seen.update(id(child) for child, _ in fresh)
                queue.extend(fresh)
    cls = type(refused)
    return InvalidArgumentError(
        f"cannot snapshot the {kind}: {path} is a {cls.__module__}.{cls.__qualname__}, which owns an OS resource "
        "(a file descriptor, socket or process) that a copy would share and close when freed. Leave it out of what "
        "is saved (drop it in the class's __getstate__), or save the object's state_dict() instead."
    )


# What deepcopy keeps as it is, or leaves to the object's own __deepcopy__ (tensors); its other atomic
# types (code, weakrefs, properties) cannot be pickled, so the dry pass below passes them by anyway.
_KEPT_BY_DEEPCOPY = (type, types.FunctionType, types.BuiltinFunctionType, *BY_VALUE)
_PLAIN = frozenset((int, float, bool, str, bytes, type(None), tuple, list, dict, OrderedDict))


class ResourceCheck(pickle.Pickler):
    """A dry pickling pass before the deepcopy fallback: :meth:`check` raises :class:`RefusedError` at an OS resource.

    It visits what ``copy.deepcopy`` will copy, the way it will (the same ``copyreg`` reductions, so
    what ``__getstate__`` leaves out is not seen), but keeps nothing and goes on past what cannot be
    pickled (a lambda, a lock), which deepcopy then keeps or reports as before. Only on the fallback:
    it costs a Python call per object, ints included.
    """

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), protocol=4)  # tensors and arrays stand in as ids: the bytes are small

    def check(self, obj: object) -> None:
        """Raise :class:`RefusedError` at the first OS resource deepcopy would copy in ``obj``."""
        try:
            self.dump(obj)
        except RefusedError:
            raise
        except Exception as exc:  # a reduction the dry pass cannot follow; deepcopy meets the same one
            logger.debug("resource check stopped early (%s: %s)", type(exc).__name__, exc)

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 (pickle's hook)
        if type(obj) in _PLAIN:  # most objects: walked into as usual, without the ABC checks below
            return None
        if isinstance(obj, _KEPT_BY_DEEPCOPY):  # deepcopy copies nothing inside these: an id stands in
            return 0
        if owns_os_resource(obj):
            raise RefusedError(obj)
        return 0 if getattr(type(obj), "__deepcopy__", None) else None  # copies itself: not looked into

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102 (pickle's hook)
        if type(obj) is OrderedDict and not getattr(obj, "__dict__", None):  # as the snapshot pickler does
            return OrderedDict, (), None, None, iter(obj.items())
        try:
            reduce = copyreg.dispatch_table.get(type(obj))
            rv = reduce(obj) if reduce is not None else obj.__reduce_ex__(4)
        except Exception:  # deepcopy raises here too, at the call
            return int, ()
        return (int, ()) if isinstance(rv, str) else rv  # deepcopy keeps a global (a str reduce) as it is
