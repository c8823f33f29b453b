"""Sidecars and search: what the YAML holds, which files count as checkpoints, and how latest / best / by-score choose.

Foreign, temp and damaged files are planted with fsspec beside real checkpoints, on local disk and
``memory://``; search must ignore or skip them (with a WARNING where the issue asks for one), never crash.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import yaml

from _models import Agent
from bgsave import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidArgumentError,
    find_latest_checkpoint,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mgr(run_dir: str) -> Iterator[CheckpointManager]:
    """A background manager, closed after the test."""
    manager = CheckpointManager(run_dir, "side")
    yield manager
    with contextlib.suppress(CheckpointError):
        manager.close()


def plant(mgr: CheckpointManager) -> Callable[[str, bytes], None]:
    """A function writing raw bytes as ``name`` into the manager's checkpoint directory (any backend)."""
    fs, root = fsspec.core.url_to_fs(mgr.checkpoint_dir)
    fs.makedirs(root, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        fs.pipe_file(f"{root}/{name}", data)

    return write


def read_yaml(mgr: CheckpointManager, epoch: int) -> dict[str, Any]:
    """The parsed sidecar of ``epoch``."""
    with fsspec.open(f"{mgr.checkpoint_dir}/model_{epoch:04d}.yaml", "rb") as f:
        data: dict[str, Any] = yaml.safe_load(f.read())
    return data


def tiny_pt() -> bytes:
    """The bytes of a real (small) checkpoint file."""
    fs = fsspec.filesystem("memory")
    with fs.open("/tiny-agent.pt", "wb") as f:
        torch.save(Agent(width=2), f)
    data: bytes = fs.cat_file("/tiny-agent.pt")
    fs.rm_file("/tiny-agent.pt")
    return data


def epochs_of(paths: list[str]) -> list[int]:
    """Epoch numbers from model_N.pt paths."""
    return [int(p.rsplit("model_", 1)[1].split(".")[0]) for p in paths]


# ---- what a sidecar holds ----------------------------------------------------------------------


def test_sidecar_holds_the_seed_keys_and_extras(mgr: CheckpointManager) -> None:
    """The sidecar has epoch, agent_step, score, avg_reward, total_time, run, plus the caller's extra scalars."""
    mgr.save_agent(
        Agent(),
        12,
        {
            "agent_step": 4096,
            "score": 0.75,
            "avg_reward": -3.5,
            "total_time": 61.5,
            "lr": 3e-4,
            "note": "warm start",
            "frozen": True,
            "seed": None,
        },
    )
    mgr.wait()
    data = read_yaml(mgr, 12)
    assert data == {
        "epoch": 12,
        "agent_step": 4096,
        "score": 0.75,
        "avg_reward": -3.5,
        "total_time": 61.5,
        "run": "side",
        "lr": 3e-4,
        "note": "warm start",
        "frozen": True,
        "seed": None,
    }
    assert list(data)[:6] == ["epoch", "agent_step", "score", "avg_reward", "total_time", "run"]


def test_sidecar_without_metadata_has_defaults(mgr: CheckpointManager) -> None:
    """With no metadata the seed keys are still all there (agent_step 0, no score)."""
    mgr.save_agent(Agent(), 1)
    mgr.wait()
    data = read_yaml(mgr, 1)
    assert {"epoch", "agent_step", "score", "avg_reward", "total_time", "run"} <= set(data)
    assert (data["epoch"], data["agent_step"], data["run"], data["score"]) == (1, 0, "side", None)


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (np.float32(0.25), 0.25, float),
        (np.float64(1.5), 1.5, float),
        (np.int64(7), 7, int),
        (np.int32(-3), -3, int),
        (np.bool_(True), True, bool),
        (torch.tensor(0.5), 0.5, float),
        (torch.tensor(3), 3, int),
        (torch.tensor(2.5, dtype=torch.float64), 2.5, float),
        (torch.tensor(True), True, bool),
    ],
    ids=["np.float32", "np.float64", "np.int64", "np.int32", "np.bool_", "t.float", "t.int", "t.float64", "t.bool"],
)
def test_numpy_and_torch_scalars_become_plain_numbers(
    mgr: CheckpointManager, value: object, expected: object, kind: type
) -> None:
    """numpy scalars and 0-d tensors in metadata are written as plain YAML numbers (readable by safe_load)."""
    mgr.save_agent(Agent(), 1, {"extra": value})
    mgr.wait()
    data = read_yaml(mgr, 1)  # safe_load: a numpy or torch tag would not even parse
    assert type(data["extra"]) is kind
    assert data["extra"] == pytest.approx(expected)


def test_numpy_and_torch_scores_are_searchable(mgr: CheckpointManager) -> None:
    """Scores given as numpy / torch scalars are numbers for search: best and by-score use them."""
    mgr.save_agent(Agent(), 1, {"score": np.float32(0.2), "agent_step": np.int64(10)})
    best = mgr.save_agent(Agent(), 2, {"score": torch.tensor(0.9), "agent_step": torch.tensor(20)})
    mgr.save_agent(Agent(), 3, {"score": np.float64(0.5)})
    assert mgr.find_best_checkpoint() == best
    assert epochs_of(mgr.find_checkpoints_by_score(0.4)) == [2, 3]
    assert read_yaml(mgr, 2)["agent_step"] == 20


class Mode(str, enum.Enum):
    """A str Enum, as configs often use."""

    TRAIN = "train"


@pytest.mark.parametrize("value", [np.str_("train"), Mode.TRAIN], ids=["np.str_", "str-enum"])
def test_string_subclasses_never_fail_in_the_background(mgr: CheckpointManager, value: object) -> None:
    """A str subclass (numpy str_, a str Enum) in metadata is written as a plain string, or refused at the call.

    What must not happen is that it passes validation and then fails the write in the background
    (yaml.safe_dump cannot represent str subclasses).
    """
    try:
        mgr.save_agent(Agent(), 1, {"mode": value})
    except InvalidArgumentError:
        assert mgr.find_latest_checkpoint() is None  # refused at the call: nothing written
        return
    mgr.wait()  # must not raise CheckpointWriteError
    assert read_yaml(mgr, 1)["mode"] == "train"


# ---- versions and names ----------------------------------------------------------------------


def test_numeric_order_past_9999(mgr: CheckpointManager) -> None:
    """model_12345 is later than model_9999 (numeric, not lexical, order); epoch 12345 keeps all its digits."""
    paths = {epoch: mgr.save_agent(Agent(width=2), epoch) for epoch in (9999, 12345, 10000, 2)}
    assert paths[12345].endswith("/model_12345.pt")
    assert paths[9999].endswith("/model_9999.pt")
    assert paths[2].endswith("/model_0002.pt")
    assert mgr.find_latest_checkpoint() == paths[12345]
    assert [info.epoch for info in mgr.checkpoints()] == [2, 9999, 10000, 12345]
    assert find_latest_checkpoint(mgr.checkpoint_dir) == paths[12345]
    assert mgr.load_agent(12345) is not None


def test_foreign_temp_and_uncommitted_files_are_ignored(mgr: CheckpointManager) -> None:
    """Temp files, foreign names, a .pt without sidecar and a sidecar without .pt never count as checkpoints."""
    committed = mgr.save_agent(Agent(width=2), 2, {"score": 0.1})
    mgr.wait()
    write = plant(mgr)
    pt = tiny_pt()
    sidecar = yaml.safe_dump({"epoch": 10, "agent_step": 0, "score": 99.0, "run": "side"}).encode()
    write(".model_0010.pt.bgsave-tmp", pt)  # a temp file from an interrupted save
    write(".model_0010.yaml.tmp", sidecar)
    write("model_abc.pt", pt)
    write("model_abc.yaml", sidecar)
    write("notes.txt", b"hello")
    write("model_0003.pt", pt)  # no sidecar: never committed
    write("model_0007.yaml", yaml.safe_dump({"epoch": 7, "score": 50.0, "run": "side"}).encode())  # no .pt
    write("model_5.pt", pt)  # not the canonical name of epoch 5 (model_0005)
    write("model_5.yaml", yaml.safe_dump({"epoch": 5, "score": 60.0}).encode())
    write("model_0008.pt.bak", pt)

    assert [info.epoch for info in mgr.checkpoints()] == [2]
    assert mgr.find_latest_checkpoint() == committed
    assert mgr.find_best_checkpoint() == committed
    assert mgr.find_checkpoints_by_score(0.0) == [committed]
    assert find_latest_checkpoint(mgr.checkpoint_dir) == committed
    with pytest.raises(CheckpointNotFoundError):
        mgr.load_agent(3)
    with pytest.raises(CheckpointNotFoundError):
        mgr.load_agent(7)
    # Saving goes on normally next to them.
    newer = mgr.save_agent(Agent(width=2), 4)
    assert mgr.find_latest_checkpoint() == newer


def test_a_new_manager_ignores_leftover_temp_files(run_dir: str) -> None:
    """A manager opened on a directory with an interrupted save's temp files finds only committed checkpoints."""
    with CheckpointManager(run_dir, "side") as first:
        committed = first.save_agent(Agent(width=2), 1)
    fs, root = fsspec.core.url_to_fs(first.checkpoint_dir)
    fs.pipe_file(f"{root}/.model_0002.pt.tmp", b"partial")
    fs.pipe_file(f"{root}/model_0002.pt", b"partial")  # a .pt whose sidecar never came
    with CheckpointManager(run_dir, "side") as second:
        assert second.find_latest_checkpoint() == committed
        assert second.load_agent() is not None
        path = second.save_agent(Agent(width=2, seed=2), 2)  # the same epoch saves cleanly over the debris
        assert second.find_latest_checkpoint() == path
        assert second.load_agent(2) is not None


# ---- damaged sidecars --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"epoch: [unclosed\n",
        b"\xff\xfe\x00binary",
        b"- just\n- a list\n",
        b"",
        b"score: 0.5\nrun: side\n",
        b"epoch: 6\nscore: 0.5\n",
        b"epoch: 'four'\n",
        b"!!python/object:os.system {}\n",
    ],
    ids=["bad-yaml", "binary", "list", "empty", "no-epoch", "wrong-epoch", "str-epoch", "unsafe-tag"],
)
def test_an_unreadable_sidecar_is_skipped_with_a_warning(
    mgr: CheckpointManager, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    """A sidecar that is not valid YAML for its epoch makes search skip that checkpoint, with a WARNING naming it."""
    caplog.set_level(logging.WARNING, logger="bgsave")
    good = mgr.save_agent(Agent(width=2), 3, {"score": 0.1})
    mgr.wait()
    write = plant(mgr)
    write("model_0004.pt", tiny_pt())
    write("model_0004.yaml", content)

    assert mgr.find_latest_checkpoint() == good
    assert mgr.find_best_checkpoint() == good
    assert mgr.find_checkpoints_by_score(0.0) == [good]
    assert find_latest_checkpoint(mgr.checkpoint_dir) == good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model_0004.yaml" in w for w in warnings), warnings


@pytest.mark.parametrize(
    "score",
    ["high", None, [1, 2], {"a": 1}, True, "MISSING"],
    ids=["string", "null", "list", "dict", "bool", "missing"],
)
def test_a_missing_or_non_numeric_metric_is_skipped_for_that_metric(mgr: CheckpointManager, score: object) -> None:
    """A checkpoint whose score is missing or not a number is never best by score, but still counts as latest."""
    best = mgr.save_agent(Agent(width=2), 1, {"score": 0.3, "avg_reward": 1.0})
    mgr.wait()
    write = plant(mgr)
    write("model_0002.pt", tiny_pt())
    sidecar: dict[str, Any] = {"epoch": 2, "agent_step": 0, "avg_reward": 5.0, "total_time": 0.0, "run": "side"}
    if score != "MISSING":
        sidecar["score"] = score
    write("model_0002.yaml", yaml.safe_dump(sidecar).encode())

    assert str(mgr.find_latest_checkpoint()).endswith("model_0002.pt")
    assert mgr.find_best_checkpoint() == best
    assert mgr.find_checkpoints_by_score(-1e9) == [best]
    assert str(mgr.find_best_checkpoint("avg_reward")).endswith("model_0002.pt")  # other metrics still count


def test_non_finite_scores_are_stored_but_never_best(mgr: CheckpointManager) -> None:
    """NaN and +/-inf scores are written to the sidecar as given, and never chosen as best nor matched by score."""
    finite = mgr.save_agent(Agent(width=2), 1, {"score": 0.5})
    mgr.save_agent(Agent(width=2), 2, {"score": math.nan})
    mgr.save_agent(Agent(width=2), 3, {"score": math.inf})
    mgr.save_agent(Agent(width=2), 4, {"score": -math.inf})
    mgr.save_agent(Agent(width=2), 5, {"score": np.float32("nan")})
    mgr.wait()
    assert math.isnan(read_yaml(mgr, 2)["score"])
    assert read_yaml(mgr, 3)["score"] == math.inf
    assert read_yaml(mgr, 4)["score"] == -math.inf
    assert math.isnan(read_yaml(mgr, 5)["score"])
    assert mgr.find_best_checkpoint() == finite
    assert mgr.find_checkpoints_by_score(0.0) == [finite]
    assert str(mgr.find_latest_checkpoint()).endswith("model_0005.pt")  # still committed checkpoints


def test_only_non_finite_scores_means_no_best(mgr: CheckpointManager) -> None:
    """A run whose every score is NaN or absent has no best checkpoint."""
    mgr.save_agent(Agent(width=2), 1, {"score": math.nan})
    mgr.save_agent(Agent(width=2), 2)
    assert mgr.find_best_checkpoint() is None
    assert mgr.find_checkpoints_by_score(-math.inf) == []


def test_by_score_returns_epoch_order(mgr: CheckpointManager) -> None:
    """find_checkpoints_by_score lists matches in epoch order, not score order, with min_score inclusive."""
    scores = {7: 0.9, 1: 0.6, 12: 0.7, 3: 0.2, 10000: 0.8, 5: 0.6}
    for epoch, score in scores.items():
        mgr.save_agent(Agent(width=2), epoch, {"score": score})
    assert epochs_of(mgr.find_checkpoints_by_score(0.6)) == [1, 5, 7, 12, 10000]
    assert epochs_of(mgr.find_checkpoints_by_score(0.85)) == [7]
    assert epochs_of(mgr.find_checkpoints_by_score(1)) == []  # an int threshold is fine
