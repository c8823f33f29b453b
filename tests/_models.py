"""Test agents and helpers, in an importable module so a checkpoint written by one process loads in another.

A class pickled from a script's ``__main__`` cannot be unpickled elsewhere; subprocess tests put
``tests/`` on ``PYTHONPATH`` and import this module as ``_models``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import fsspec
import torch
from torch import nn

__all__ = (
    "Agent",
    "Blocks",
    "Gate",
    "GatedAgent",
    "UnpicklableAgent",
    "UnwritableAgent",
    "assert_state_equal",
    "listing",
    "make_optimizer",
    "state_of",
    "train",
)


class Agent(nn.Module):
    """An agent holding everything a snapshot must copy.

    Parameters (with one pair tied), a registered buffer, a plain tensor attribute, a view of it, a
    list of tensors, and Python attributes (a string, a float, a nested dict). Its values are
    deterministic for a given ``seed``.
    """

    running: torch.Tensor  # a registered buffer

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoder = nn.Linear(width, width)
        self.decoder = nn.Linear(width, width, bias=False)
        self.decoder.weight = self.encoder.weight  # tied weights: one Parameter, two owners
        self.register_buffer("running", torch.zeros(width))
        self.table = torch.randn(4 * width, generator=g)  # a plain tensor attribute
        self.window = self.table[width : 2 * width]  # a view of it, sharing its storage
        self.history = [torch.randn(3, generator=g), torch.randn(2, generator=g)]
        self.name = "agent"
        self.epsilon = 0.5
        self.config: dict[str, Any] = {"gamma": 0.99, "layers": [width, width]}
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.running.copy_(torch.randn(width, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.decoder(torch.relu(self.encoder(x)))
        return y


class Blocks(nn.Module):
    """A stack of linear blocks for FSDP2 (``fully_shard`` each of ``blocks``, then the root).

    A registered buffer and Python attributes (a string, a dict) beside the parameters. Its values
    are deterministic for a given ``seed``; building one also draws from torch's global RNG
    (``nn.Linear``'s init), as a real ``make_agent`` does.
    """

    running: torch.Tensor  # a registered buffer

    def __init__(self, width: int = 16, depth: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, width)
        self.register_buffer("running", torch.zeros(width))
        self.name = "blocks"
        self.config: dict[str, Any] = {"width": width, "depth": depth}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.running.copy_(torch.randn(width, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        y: torch.Tensor = self.head(x)
        return y


class GatedAgent(Agent):
    """An Agent whose pickle reaches its :class:`Gate` first, before any other attribute.

    So while a write is held at the gate nothing of the agent has been serialized yet: a writer
    that pickled the live agent (instead of a snapshot) would record every later mutation,
    Python attributes and replaced submodules included, not only tensor contents.
    """

    def __init__(self, gate: Gate, width: int = 8, seed: int = 0) -> None:
        super().__init__(width, seed)
        self.gate = gate

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]  # untyped in torch
        return {"gate": state.pop("gate"), **state}


class UnpicklableAgent(Agent):
    """An agent holding a lambda: neither the snapshot's pickler nor ``torch.save`` can pickle it."""

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__(width, seed)
        self.callback = lambda x: x


def _cannot_rebuild() -> None:
    raise RuntimeError("this object cannot be rebuilt from its pickle")


class _Unrebuildable:
    """Pickles, but unpickling it raises: the snapshot is rebuilt in the writer, so its write fails there."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _cannot_rebuild, ()


class UnwritableAgent(Agent):
    """An agent copied at the call whose write then fails in the background (its copy cannot be rebuilt)."""

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__(width, seed)
        self.payload = _Unrebuildable()


class _GateState:
    """What every copy of one Gate shares: the permits and the counters."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.cond = threading.Condition()
        self.permits = 0
        self.open = False
        self.snapshots = 0
        self.entered = 0
        self.passed = 0


# Gate id -> shared state, so a copy rebuilt from a pickle in this process is still the same gate.
_GATES: weakref.WeakValueDictionary[str, _GateState] = weakref.WeakValueDictionary()


def _inside_torch_save() -> bool:
    """Whether the current call stack runs inside ``torch.save`` (the writer), as opposed to a snapshot."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("save", "_save") and os.path.join("torch", "serialization.py") in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _revive(gate_id: str) -> Gate:
    """Unpickle a Gate: the same gate while the test that made it runs, else a fresh open one."""
    state = _GATES.get(gate_id)
    if state is None:
        gate = Gate()
        gate.open()
        return gate
    gate = Gate.__new__(Gate)
    gate._id, gate._state = gate_id, state
    return gate


class Gate:
    """Holds ``torch.save`` in the middle of pickling until the test lets it through.

    Put one in an agent (``agent.gate = Gate()``) or in an optimizer's param group. When
    ``torch.save`` (bgsave's writer) pickles it, the writer's thread stops there, before any tensor
    bytes are written (``torch.save`` writes storages after the pickle), so the test can mutate the
    live object while a write is provably in progress. A snapshot taking its copy (by
    ``copy.deepcopy`` or by a pickle outside ``torch.save``) is never held, only counted in
    :attr:`snapshots`. Every wait has a timeout, so a broken library fails the test instead of
    hanging it.
    """

    def __init__(self, timeout: float = 20.0) -> None:
        self._id = uuid.uuid4().hex
        self._state = _GateState(timeout)
        _GATES[self._id] = self._state

    @property
    def snapshots(self) -> int:
        """Copies taken of the object holding the gate (one per snapshot)."""
        return self._state.snapshots

    @property
    def entered(self) -> int:
        """Writes (``torch.save`` pickles) that reached the gate."""
        return self._state.entered

    @property
    def passed(self) -> int:
        """Writes let through."""
        return self._state.passed

    def __deepcopy__(self, memo: dict[int, Any]) -> Gate:
        with self._state.cond:
            self._state.snapshots += 1
        return self

    def __reduce__(self) -> tuple[Callable[[str], Gate], tuple[str]]:
        state = self._state
        if not _inside_torch_save():
            with state.cond:
                state.snapshots += 1
            return (_revive, (self._id,))
        with state.cond:
            state.entered += 1
            state.cond.notify_all()
            if not state.cond.wait_for(lambda: state.open or state.permits > 0, timeout=state.timeout):
                raise TimeoutError("Gate: the test never let this write through")
            if not state.open:
                state.permits -= 1
            state.passed += 1
        return (_revive, (self._id,))

    def wait_entered(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``n`` writes have reached the gate; False on timeout."""
        with self._state.cond:
            return self._state.cond.wait_for(lambda: self._state.entered >= n, timeout=timeout)

    def let_through(self, n: int = 1) -> None:
        """Let ``n`` more writes pass."""
        with self._state.cond:
            self._state.permits += n
            self._state.cond.notify_all()

    def open(self) -> None:
        """Let every write pass from now on (use in ``finally`` so a failing test never leaves a writer stuck)."""
        with self._state.cond:
            self._state.open = True
            self._state.cond.notify_all()


def state_of(agent: Agent) -> dict[str, Any]:
    """A detached copy of everything an Agent holds, for comparing with a loaded one later."""
    return {
        "params": {k: v.detach().clone() for k, v in agent.named_parameters(remove_duplicate=False)},
        "buffers": {k: v.clone() for k, v in agent.named_buffers()},
        "table": agent.table.clone(),
        "window": agent.window.clone(),
        "history": [t.clone() for t in agent.history],
        "name": agent.name,
        "epsilon": agent.epsilon,
        "config": copy.deepcopy(agent.config),
    }


def assert_state_equal(expected: dict[str, Any], agent: Agent) -> None:
    """Assert ``agent`` holds exactly the state recorded by :func:`state_of`."""
    actual = state_of(agent)
    assert actual["params"].keys() == expected["params"].keys()
    for key, value in expected["params"].items():
        assert torch.equal(actual["params"][key], value), key
    assert actual["buffers"].keys() == expected["buffers"].keys()
    for key, value in expected["buffers"].items():
        assert torch.equal(actual["buffers"][key], value), key
    assert torch.equal(actual["table"], expected["table"])
    assert torch.equal(actual["window"], expected["window"])
    assert len(actual["history"]) == len(expected["history"])
    for got, want in zip(actual["history"], expected["history"], strict=True):
        assert torch.equal(got, want)
    assert (actual["name"], actual["epsilon"], actual["config"]) == (
        expected["name"],
        expected["epsilon"],
        expected["config"],
    )


def make_optimizer(agent: nn.Module, lr: float = 0.01) -> torch.optim.Adam:
    """An Adam optimizer over the agent's parameters."""
    return torch.optim.Adam(agent.parameters(), lr=lr)


def train(agent: Agent, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    """A few deterministic optimisation steps, so the optimizer has non-trivial state."""
    g = torch.Generator().manual_seed(seed)
    width = agent.encoder.in_features
    for _ in range(steps):
        x = torch.randn(4, width, generator=g)
        loss = (agent(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def listing(run_dir: str) -> dict[str, tuple[str, str]]:
    """Everything under ``run_dir``'s parent on any fsspec backend: path -> (type, content digest).

    Taking the parent means that creating ``run_dir`` itself also shows up as a change.
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.invalidate_cache()
    parent = root.rstrip("/").rsplit("/", 1)[0] or "/"
    if not fs.exists(parent):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for path, info in fs.find(parent, withdirs=True, detail=True).items():
        if info["type"] == "file" and path.endswith(".lock"):
            out[path] = ("file", "")  # a writer lock's heartbeat changes its content on its own schedule
        elif info["type"] == "file":
            out[path] = ("file", hashlib.sha256(fs.cat_file(path)).hexdigest())
        else:
            out[path] = (info["type"], "")
    return out
