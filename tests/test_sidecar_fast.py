"""The sidecar's fast reader agrees with PyYAML's safe loader on every document it accepts, and declines the rest.

``sidecar.loads`` reads the plain ``key: value`` shape bgsave writes without building a YAML document
(the catalog reads thousands); anything else goes to the safe loader. The property checked here:
whenever the fast path returns a mapping, it is exactly the mapping ``yaml.safe_load`` returns.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import yaml

from bgsave import sidecar

TRICKY_SCALARS = [
    "yes", "No", "on", "OFF", "y", "~", "null", "Null", "true", "True", "0x1f", "0o17", "012", "00", "-0",
    "1_000", "+1", "+abc", "1:20", "190:20:30", "2026-11-25", "2026-11-25T10:00:00Z", ".5", "1.", "-.inf", ".NaN",
    ".inf", "1.0e+20", "1e5", "1.0E+20", "0.1", "-3", "abc", "a.b", "a-b", "a/b", "_x", "=", "<<", "-", ".",
    "1.2.3", "0b101", "NaN", "inf", "hello-world", "exp1", "run_7", "---", "--", "-.5", "-x", "-1_0", "+.inf",
]  # fmt: skip


def agree(text: str) -> bool:
    """Whether the fast reader declines ``text`` or returns what the safe loader returns (NaN == NaN)."""
    fast = sidecar._fast_load(text.encode())
    if fast is None:
        return True
    return _same(fast, yaml.safe_load(text))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("scalar", TRICKY_SCALARS)
def test_tricky_scalars_as_values_and_keys(scalar: str) -> None:
    """Each plain scalar YAML resolves specially (bools, octals, dates...) is read as the safe loader reads it."""
    assert agree(f"epoch: 3\nvalue: {scalar}\n")
    assert agree(f"{scalar}: 1\nepoch: 3\n")


def test_what_the_dumper_writes_is_read_fast_and_equal() -> None:
    """2,000 sidecars built from random metadata: every one agrees, and the common ones take the fast path."""
    rng = random.Random(1234)
    fast = 0
    for epoch in range(2000):
        metadata: dict[str, Any] = {
            "agent_step": rng.randrange(10**9),
            "score": rng.choice([rng.uniform(-1e6, 1e6), float("nan"), float("inf"), -float("inf"), None, 0.0, 1e-300]),
            "avg_reward": rng.choice([rng.gauss(0, 1), None, 1e20, -1e-20]),
            "total_time": rng.uniform(0, 1e5),
            rng.choice(["note", "on", "tag", "x.y", "null"]): rng.choice([*TRICKY_SCALARS, "two words", "é", True, 7]),
        }
        data = sidecar.dumps(sidecar.build("run", epoch, metadata))
        assert agree(data.decode()), data
        fast += sidecar._fast_load(data) is not None
    assert fast > 300


def test_the_usual_sidecar_takes_the_fast_path() -> None:
    """A sidecar of the seed keys with numbers (what a training loop writes) never meets the safe loader."""
    for value in (0.5, -1e20, 1e-300, float("nan"), float("inf"), None, 0, 12):
        data = sidecar.dumps(sidecar.build("exp-1_a.b", 7, {"agent_step": 2048, "score": value, "avg_reward": value}))
        assert sidecar._fast_load(data) is not None, data
        assert agree(data.decode())


@pytest.mark.parametrize(
    "text",
    [
        "epoch: 3\nnote: a # comment\n",
        "epoch: 3  \n",
        "epoch: 3\n---\nepoch: 4\n",
        "epoch: 3\nlist: [1, 2]\n",
        "epoch: 3\nnested:\n  a: 1\n",
        "epoch: 3\nquoted: '0.5'\n",
        "epoch: 3",
        "\n",
        "epoch: 3\nepoch: 4\n",
        "epoch: 3\n@x: 1\n",
        "epoch: 3\nv: @x\n",
        "epoch: &a 3\n",
    ],
)
def test_other_shapes_are_declined_or_agree(text: str) -> None:
    """Comments, documents, collections, quotes, duplicates, indicators: the fast reader declines or agrees."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        assert sidecar._fast_load(text.encode()) is None  # never accepts what YAML rejects
        return
    assert agree(text)
