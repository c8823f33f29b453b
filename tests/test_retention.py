"""Retention: the pure policy (which epochs go) without I/O, then prune on real files on every backend.

The policy tests build :class:`CheckpointInfo` values by hand. The prune tests write real checkpoints
(``torch.save`` plus a sidecar, the layout the manager writes) and observe deletions by wrapping the
real ``Storage.delete``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog, CheckpointInfo
from bgsave.errors import CheckpointWriteError, InvalidArgumentError
from bgsave.layout import checkpoint_name
from bgsave.policies import RetentionPolicy
from bgsave.storage import Storage, open_storage

pytestmark = pytest.mark.timeout(60)


def info(epoch: int, score: Any = None, **extra: Any) -> CheckpointInfo:
    """A CheckpointInfo as list_checkpoints would return it, with ``score`` (absent when ``...``)."""
    sidecar: dict[str, Any] = {"epoch": epoch, "agent_step": epoch * 10, **extra}
    if score is not ...:
        sidecar["score"] = score
    return CheckpointInfo(epoch=epoch, path=f"/run/checkpoints/{checkpoint_name(epoch, 'pt')}", size=1, sidecar=sidecar)


def epochs(infos: list[CheckpointInfo]) -> list[int]:
    return [i.epoch for i in infos]


# ---- the policy, pure ---------------------------------------------------------------------------
def test_keep_last_keeps_the_newest_n() -> None:
    """keep_last=3 of ten checkpoints deletes the seven oldest, in epoch order."""
    infos = [info(e, 0.5) for e in range(10)]
    policy = RetentionPolicy(keep_last=3)
    assert epochs(policy.to_delete(infos)) == [0, 1, 2, 3, 4, 5, 6]
    assert epochs(policy.to_keep(infos)) == [7, 8, 9]


def test_the_checkpoint_a_resume_would_pick_is_kept() -> None:
    """keep_last=2: the newest epoch with its trainer state (3) stays, though older than the two newest."""
    infos = [dataclasses.replace(info(e, 0.5), has_trainer_state=e in (1, 3)) for e in range(7)]
    policy = RetentionPolicy(keep_last=2)
    assert epochs(policy.to_keep(infos)) == [3, 5, 6]
    assert epochs(policy.to_delete(infos)) == [0, 1, 2, 4]


@pytest.mark.parametrize(
    ("mode", "best"),
    [("max", [2, 5]), ("min", [0, 3])],
)
def test_keep_best_by_mode(mode: str, best: list[int]) -> None:
    """keep_best=2 keeps the two highest (max) or lowest (min) scores as well as the newest."""
    scores = [0.1, 0.4, 0.9, 0.2, 0.5, 0.8, 0.3]
    infos = [info(e, s) for e, s in enumerate(scores)]
    kept = RetentionPolicy(keep_last=1, keep_best=2, mode=mode).to_keep(infos)
    assert epochs(kept) == sorted({*best, 6})


def test_keep_best_ranks_by_the_named_metric() -> None:
    """metric= ranks by another sidecar key; score is then irrelevant."""
    infos = [info(e, 1.0, avg_reward=r) for e, r in enumerate([5.0, -1.0, 3.0, 0.0])]
    policy = RetentionPolicy(keep_last=1, keep_best=1, metric="avg_reward", mode="min")
    assert epochs(policy.to_keep(infos)) == [1, 3]


def test_best_ties_go_to_the_later_epoch() -> None:
    """Equal scores: the later epoch wins the last best slot, as bgsave.policies.ranked picks."""
    infos = [info(0, 0.9), info(1, 0.9), info(2, 0.9), info(3, 0.1), info(4, 0.0)]
    assert epochs(RetentionPolicy(keep_last=1, keep_best=2).to_keep(infos)) == [1, 2, 4]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_non_finite_or_missing_metric_never_counts_as_best(mode: str) -> None:
    """NaN, +-inf, None, a string, a bool and a missing key never take a best slot, in either mode."""
    bad: list[Any] = [math.nan, math.inf, -math.inf, None, "0.99", True, ...]
    infos = [info(e, s) for e, s in enumerate(bad)]
    infos.insert(3, info(100, 0.5))  # the one finite score, not the newest
    infos.append(info(200, math.nan))  # the newest
    kept = RetentionPolicy(keep_last=1, keep_best=3, mode=mode).to_keep(infos)
    assert epochs(kept) == [100, 200]


def test_newest_is_kept_whatever_the_input_order_or_its_score() -> None:
    """The newest epoch survives when given out of order and with the worst score."""
    infos = [info(e, s) for e, s in [(7, -5.0), (3, 1.0), (5, 2.0), (1, 3.0)]]
    policy = RetentionPolicy(keep_last=1, keep_best=1)
    assert epochs(policy.to_keep(infos)) == [1, 7]
    assert epochs(policy.to_delete(infos)) == [3, 5]


def test_protected_epochs_survive_without_changing_the_count() -> None:
    """protect= spares those epochs; the newest N and best K are still counted over every checkpoint."""
    infos = [info(e, s) for e, s in enumerate([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])]
    policy = RetentionPolicy(keep_last=2, keep_best=1)
    assert epochs(policy.to_delete(infos)) == [1, 2, 3]
    assert epochs(policy.to_delete(infos, protect={2, 5, 99})) == [1, 3]


def test_keep_last_none_keeps_everything() -> None:
    """The default policy deletes nothing and says so."""
    policy = RetentionPolicy()
    assert policy.keeps_everything
    assert policy.to_delete([info(e, e) for e in range(5)]) == []
    assert not RetentionPolicy(keep_last=2).keeps_everything


@pytest.mark.parametrize("count", [0, 1, 3])
def test_fewer_checkpoints_than_kept_deletes_nothing(count: int) -> None:
    """Nothing to delete when the run is shorter than keep_last (also an empty run)."""
    assert RetentionPolicy(keep_last=3, keep_best=2).to_delete([info(e, e) for e in range(count)]) == []


def test_invariants_on_random_runs() -> None:
    """On 500 random runs: newest and best K always kept, kept = newest N plus best K exactly."""
    rng = random.Random(1234)
    values: list[Any] = [None, math.nan, math.inf, ...]
    for _ in range(500):
        chosen = rng.sample(range(60), rng.randint(0, 25))
        infos = [info(e, rng.choice([*values, rng.uniform(-1, 1), round(rng.uniform(0, 1), 1)])) for e in chosen]
        keep_last, keep_best = rng.randint(1, 6), rng.randint(0, 4)
        mode = rng.choice(["max", "min"])
        policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, mode=mode)
        deleted, kept = policy.to_delete(infos), policy.to_keep(infos)

        assert sorted(epochs(deleted) + epochs(kept)) == sorted(chosen)
        assert epochs(deleted) == sorted(epochs(deleted))
        newest_n = set(sorted(chosen)[-keep_last:])
        sign = 1 if mode == "max" else -1
        finite = [(sign * i.sidecar["score"], i.epoch) for i in infos if i.metric("score") is not None]
        best_k = {e for _, e in sorted(finite, reverse=True)[:keep_best]}
        assert set(epochs(kept)) == newest_n | best_k
        if chosen:
            assert max(chosen) in epochs(kept)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": -1}, "keep_last"),
        ({"keep_last": True}, "keep_last"),
        ({"keep_last": 2.0}, "keep_last"),
        ({"keep_last": "3"}, "keep_last"),
        ({"keep_last": 1, "keep_best": -1}, "keep_best"),
        ({"keep_last": 1, "keep_best": False}, "keep_best"),
        ({"keep_last": 1, "keep_best": None}, "keep_best"),
        ({"keep_best": 2}, "keep_last"),
        ({"keep_last": 1, "mode": "maximum"}, "mode"),
        ({"keep_last": 1, "mode": None}, "mode"),
        ({"keep_last": 1, "metric": ""}, "metric"),
        ({"keep_last": 1, "metric": 3}, "metric"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], named: str) -> None:
    """Each bad argument raises InvalidArgumentError (a ValueError) whose message names it."""
    with pytest.raises(InvalidArgumentError, match=named) as caught:
        RetentionPolicy(**kwargs)
    assert isinstance(caught.value, ValueError)


# ---- prune on real files -----------------------------------------------------------------------
def write_checkpoint(storage: Storage, directory: str, epoch: int, score: float | None) -> None:
    """A committed checkpoint as the manager writes it: the .pt, then its sidecar."""
    storage.makedirs(directory)
    storage.write_atomic(
        Storage.join_dir(directory, checkpoint_name(epoch, "pt")),
        lambda f: torch.save({"weight": torch.full((4,), float(epoch))}, f),
    )
    data = sidecar_schema.dumps(sidecar_schema.build("run", epoch, {"score": score, "agent_step": epoch}))
    storage.write_bytes_atomic(Storage.join_dir(directory, checkpoint_name(epoch, "yaml")), data)


def list_checkpoints(storage: Storage, directory: str) -> list[CheckpointInfo]:
    """The committed checkpoints, read afresh."""
    return Catalog(storage, directory).committed()


def prune(
    storage: Storage,
    directory: str,
    infos: list[CheckpointInfo],
    policy: RetentionPolicy,
    *,
    protect: range | tuple[int, ...] = (),
    dry_run: bool = False,
) -> list[CheckpointInfo]:
    """What the manager's writer and ``bgsave prune`` do: the policy decides, the catalog deletes."""
    doomed = policy.to_delete(infos, protect=protect)
    if not dry_run:
        Catalog(storage, directory).remove(doomed)
    return doomed


def contents(storage: Storage, directory: str) -> dict[str, bytes]:
    names = storage.list_files(directory)
    return {name: storage.read_bytes(Storage.join_dir(directory, name)) for name in names}


@pytest.fixture
def run(any_run_dir: str) -> tuple[Storage, str]:
    """Six committed checkpoints (scores 0.3, 0.9, 0.1, 0.8, 0.2, 0.0) on each backend."""
    storage = open_storage(any_run_dir)
    directory = storage.join("checkpoints")
    for epoch, score in enumerate([0.3, 0.9, 0.1, 0.8, 0.2, 0.0]):
        write_checkpoint(storage, directory, epoch, score)
    return storage, directory


def record_deletes(storage: Storage, monkeypatch: pytest.MonkeyPatch, fail_on: Callable[[str], bool]) -> list[str]:
    """Wrap the real Storage.delete: record each name, raise OSError before deleting where ``fail_on``."""
    calls: list[str] = []
    real = storage.delete

    def delete(path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        calls.append(name)
        if fail_on(name):
            raise OSError(f"injected failure deleting {name}")
        real(path)

    monkeypatch.setattr(storage, "delete", delete)
    return calls


def test_prune_deletes_each_sidecar_before_its_pt(run: tuple[Storage, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Sidecar then .pt for every pruned epoch; the kept ones still list and load."""
    storage, directory = run
    calls = record_deletes(storage, monkeypatch, lambda _: False)
    policy = RetentionPolicy(keep_last=2, keep_best=1)

    deleted = prune(storage, directory, list_checkpoints(storage, directory), policy)

    assert epochs(deleted) == [0, 2, 3]
    assert calls == [checkpoint_name(e, s) for e in (0, 2, 3) for s in ("yaml", "pt")]
    assert epochs(list_checkpoints(storage, directory)) == [1, 4, 5]
    assert sorted(storage.list_files(directory)) == sorted(
        checkpoint_name(e, s) for e in (1, 4, 5) for s in ("pt", "yaml")
    )
    for epoch in (1, 4, 5):
        path = Storage.join_dir(directory, checkpoint_name(epoch, "pt"))
        state = storage.read_with(path, lambda f: torch.load(f, weights_only=True))
        assert torch.equal(state["weight"], torch.full((4,), float(epoch)))


def test_failure_between_sidecar_and_pt_leaves_nothing_committed_without_weights(
    run: tuple[Storage, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete failing after a sidecar is gone: typed error naming the epoch, no committed-looking loss."""
    storage, directory = run
    record_deletes(storage, monkeypatch, lambda name: name == checkpoint_name(2, "pt"))

    with pytest.raises(CheckpointWriteError, match=r"model_0002\.pt") as caught:
        prune(storage, directory, list_checkpoints(storage, directory), RetentionPolicy(keep_last=2, keep_best=1))

    assert caught.value.epoch == 2
    assert isinstance(caught.value.__cause__, OSError)
    names = storage.list_files(directory)
    assert checkpoint_name(2, "pt") in names  # left behind, but uncommitted
    assert epochs(list_checkpoints(storage, directory)) == [1, 3, 4, 5]
    for listed in list_checkpoints(storage, directory):
        assert checkpoint_name(listed.epoch, "pt") in names


def test_dry_run_changes_nothing(run: tuple[Storage, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """dry_run returns what a real prune then deletes, and leaves every byte in place."""
    storage, directory = run
    before = contents(storage, directory)
    calls = record_deletes(storage, monkeypatch, lambda _: True)
    policy = RetentionPolicy(keep_last=1, keep_best=2)

    would = prune(storage, directory, list_checkpoints(storage, directory), policy, dry_run=True)

    assert calls == []
    assert contents(storage, directory) == before
    monkeypatch.undo()
    assert prune(storage, directory, list_checkpoints(storage, directory), policy) == would
    assert epochs(would) == [0, 2, 4]


def test_nothing_to_delete_touches_no_file(run: tuple[Storage, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """When the policy keeps everything, prune makes no delete call at all."""
    storage, directory = run
    calls = record_deletes(storage, monkeypatch, lambda _: True)
    infos = list_checkpoints(storage, directory)
    assert prune(storage, directory, infos, RetentionPolicy(keep_last=6)) == []
    assert prune(storage, directory, infos, RetentionPolicy()) == []
    assert prune(storage, directory, infos, RetentionPolicy(keep_last=1), protect=range(5)) == []
    assert calls == []


def test_prune_leaves_uncommitted_files_alone(local_run_dir: str) -> None:
    """A .pt without a sidecar (maybe a save in progress) and foreign files are never pruned."""
    storage = open_storage(local_run_dir)
    directory = storage.join("checkpoints")
    for epoch in range(4):
        write_checkpoint(storage, directory, epoch, 0.5)
    storage.write_bytes_atomic(Storage.join_dir(directory, checkpoint_name(1, "yaml")) + ".bak", b"x")
    storage.delete(Storage.join_dir(directory, checkpoint_name(0, "yaml")))  # epoch 0: .pt only

    prune(storage, directory, list_checkpoints(storage, directory), RetentionPolicy(keep_last=1))

    assert sorted(storage.list_files(directory)) == [
        "model_0000.pt",
        "model_0001.yaml.bak",
        "model_0003.pt",
        "model_0003.yaml",
    ]
