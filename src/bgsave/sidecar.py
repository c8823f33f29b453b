"""The YAML sidecar: ``model_{epoch:04d}.yaml``, the small file that search reads and that commits a checkpoint.

A sidecar holds the seed design's keys, in this order, followed by any extra scalar keys the caller
passed in ``metadata``::

    epoch: 10            # int, equals the file name's epoch
    agent_step: 40960    # int, 0 when not given
    score: 0.82          # number or null; non-finite values are stored but never chosen as best
    avg_reward: 1.7      # number or null
    total_time: 512.3    # seconds, 0.0 when not given
    run: my_run          # the run name

Values are plain YAML scalars only (numbers, strings, booleans, null): numpy scalars and 0-d torch
tensors are turned into Python numbers at the call, and anything else is rejected there, before a
job is queued. Sidecars are written with PyYAML's safe dumper (libyaml's when built in) and read
with its safe loader, but for one fast path: PyYAML spends ~0.1 ms building each small document
(1 s for a run of 10,000 checkpoints), so a sidecar made only of ``key: value`` lines whose plain
scalars resolve exactly as PyYAML resolves them (ints, floats, ``.nan``/``.inf``, ``true``/``false``,
``null``, plain strings; see :func:`_fast_load`) is read by a regular expression per line, in ~5 µs.
Anything else (quotes, flow style, comments, long folded strings, non-ASCII, a key or string
PyYAML would resolve to another type) goes to the safe loader: the fast path only ever accepts a
document for which the safe loader would return the same mapping (tested on both).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from bgsave.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# libyaml's emitter and parser when PyYAML was built with them: the sidecar is serialized on the
# caller's thread, inside the save's stall, and the pure-Python emitter alone took ~1 ms of it.
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = (
    "METRIC_KEYS",
    "SEED_KEYS",
    "build",
    "dumps",
    "loads",
    "metric_value",
    "normalize",
    "validate_epoch",
    "validate_run_name",
)

SEED_KEYS = ("epoch", "agent_step", "score", "avg_reward", "total_time", "run")
# A sidecar is a few hundred bytes; anything far larger is not one of ours.
MAX_BYTES = 64 * 1024
# Keys whose value must be a number (or null for the optional metrics).
METRIC_KEYS = ("score", "avg_reward", "total_time")

Scalar = bool | int | float | str | None


def validate_epoch(epoch: object, *, argument: str = "epoch") -> int:
    """Return ``epoch`` if it is a non-negative int (not a bool), else raise InvalidArgumentError."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise InvalidArgumentError(f"{argument} must be a non-negative int, got {type(epoch).__name__} {epoch!r}")
    if epoch < 0:
        raise InvalidArgumentError(f"{argument} must be a non-negative int, got {epoch}")
    return int(epoch)


def validate_run_name(run_name: object) -> str:
    """Return ``run_name`` if it names a run (recorded as ``run``): non-empty, no path separator, ``..`` or NUL."""
    if not isinstance(run_name, str) or not run_name.strip():
        raise InvalidArgumentError(f"run_name must be a non-empty string, got {run_name!r}")
    if any(bad in run_name for bad in ("/", "\\", os.sep, "..", "\0")):
        raise InvalidArgumentError(
            f"run_name must not contain a path separator, '..' or NUL (it names a run, not a path), got {run_name!r}"
        )
    return run_name


def _to_scalar(key: str, value: object) -> Scalar:
    """Turn ``value`` into a plain YAML scalar, or raise naming ``key``."""
    # Subclasses (numpy.str_, str enums, numpy.bool_ is not a bool) become the plain type, which safe_dump can write.
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)  # the characters themselves, not a subclass's __str__ ("Mode.TRAIN")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # numpy scalars and 0-d tensors both have .item(); import neither module just to check.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return _to_scalar(key, item())
    raise InvalidArgumentError(
        f"metadata[{key!r}] must be a number, string, bool or None (numpy scalars and 0-d tensors are "
        f"converted); got {type(value).__name__}"
    )


def normalize(run: str, epoch: int, metadata: Mapping[str, object] | None) -> dict[str, Scalar]:
    """Validate caller-given ``metadata`` and return it as plain YAML scalars (no defaults added).

    Raises:
        InvalidArgumentError: metadata is not a mapping, has a non-string key, a value YAML cannot
            hold, a non-numeric metric, or an ``epoch``/``run`` that contradicts the arguments.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a mapping of str to scalars, got {type(metadata).__name__}")
    values: dict[str, Scalar] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"metadata keys must be non-empty strings, got {key!r}")
        values[key] = _to_scalar(key, value)

    if "epoch" in values and (isinstance(values["epoch"], bool) or values["epoch"] != epoch):
        raise InvalidArgumentError(f"metadata['epoch'] is {values['epoch']!r} but the epoch argument is {epoch}")
    if "run" in values and values["run"] != run:
        raise InvalidArgumentError(f"metadata['run'] is {values['run']!r} but this manager's run_name is {run!r}")
    agent_step = values.get("agent_step", 0)
    if isinstance(agent_step, bool) or not isinstance(agent_step, int) or agent_step < 0:
        raise InvalidArgumentError(f"metadata['agent_step'] must be a non-negative int, got {agent_step!r}")
    for key in METRIC_KEYS:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidArgumentError(f"metadata[{key!r}] must be a number or None, got {value!r}")
    return values


def build(run: str, epoch: int, metadata: Mapping[str, object] | None) -> dict[str, Scalar]:
    """Validate ``metadata`` and return the full sidecar dict for one checkpoint (seed keys first).

    Raises:
        InvalidArgumentError: as :func:`normalize`.
    """
    values = normalize(run, epoch, metadata)
    sidecar: dict[str, Scalar] = {
        "epoch": epoch,
        "agent_step": values.get("agent_step", 0),
        "score": values.get("score"),
        "avg_reward": values.get("avg_reward"),
        "total_time": float(values.get("total_time") or 0.0),
        "run": run,
    }
    sidecar.update((k, v) for k, v in values.items() if k not in SEED_KEYS)
    return sidecar


def dumps(sidecar: Mapping[str, Scalar]) -> bytes:
    """Serialize a sidecar dict to YAML bytes, seed keys first."""
    return yaml.dump(dict(sidecar), Dumper=_Dumper, sort_keys=False, allow_unicode=True).encode("utf-8")


def loads(data: bytes, *, source: str) -> dict[str, Any]:
    """Parse sidecar bytes with ``yaml.safe_load``.

    Raises:
        ValueError: the bytes are not YAML, not a mapping, or lack an int ``epoch``; the message
            names ``source``.
    """
    if len(data) > MAX_BYTES:
        raise ValueError(f"{source}: {len(data)} bytes is too large for a sidecar (at most {MAX_BYTES})")
    parsed: Any = _fast_load(data)  # plain scalars under str keys only, when it answers
    if parsed is None:
        try:
            parsed = yaml.load(data.decode("utf-8"), Loader=_Loader)  # a safe loader, see _Loader
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: not a readable YAML sidecar ({exc})") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"{source}: sidecar is not a mapping")
        # bgsave writes plain scalars only. Anything else (a list, a nested map, an alias bomb whose
        # nested lists expand when printed) is dropped, so that key counts as missing.
        dropped = [key for key, value in parsed.items() if not isinstance(key, str) or not _is_scalar(value)]
        if dropped:
            logger.warning("%s: ignoring sidecar keys that do not hold a plain scalar: %s", source, dropped)
            parsed = {key: value for key, value in parsed.items() if key not in dropped}
    epoch = parsed.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise ValueError(f"{source}: sidecar has no integer 'epoch'")
    return parsed  # type: ignore[no-any-return]


# Lines of "key: value" in a block mapping in plain style, ASCII only: no quotes, no comments, no
# flow or block collections, no spaces inside a value (a multi-word string goes to the loader).
# A lone "-" would be a sequence entry: a value starts with "-" only when more follows.
_DOCUMENT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.\-]*: (?:[A-Za-z0-9_.+/]|-[A-Za-z0-9_.+/\-])[A-Za-z0-9_.+\-/]*\n)+")
# How SafeDumper writes numbers: ints without sign or separators, floats as repr() with a dot.
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]*(?:e[-+][0-9]+)?")
_CONSTANTS: dict[str, Scalar] = {"null": None, "true": True, "false": False, ".nan": math.nan}
_CONSTANTS.update({".inf": math.inf, "-.inf": -math.inf})


@functools.lru_cache(maxsize=4096)  # keys and run names repeat in every sidecar
def _is_plain_str(text: str) -> bool:
    """Whether PyYAML resolves the plain scalar ``text`` to a string (by its implicit resolvers, as its loader does)."""
    resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers
    return not any(regexp.match(text) for _, regexp in resolvers.get(text[0], ()))


def _fast_load(data: bytes) -> dict[str, Scalar] | None:
    """The mapping, for a sidecar in the shape SafeDumper writes (see the module docstring); else None."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if _DOCUMENT.fullmatch(text) is None:
        return None
    out: dict[str, Scalar] = {}
    for line in text[:-1].split("\n"):
        key, _, raw = line.partition(": ")
        if not _is_plain_str(key):
            return None
        value: Scalar
        if raw in _CONSTANTS:
            value = _CONSTANTS[raw]
        elif _INT.fullmatch(raw):
            value = int(raw)
        elif _FLOAT.fullmatch(raw):
            value = float(raw)
        elif _is_plain_str(raw):
            value = raw
        else:
            return None  # another type PyYAML knows (a date, 0x1f, 1_000, yes...): the loader decides
        out[key] = value
    return out


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def metric_value(sidecar: Mapping[str, Any], metric: str) -> float | None:
    """The finite numeric value of ``metric`` in a sidecar, or None when missing, non-numeric or non-finite."""
    value = sidecar.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
