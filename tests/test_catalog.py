"""The catalog: best by a metric in either direction, search by any metric, and what each question costs in reads.

Reads are counted by wrapping the real storage's ``read_many_with_facts`` (every sidecar read goes through it),
on real files and on the loopback S3 server.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest
import torch
import yaml

from bgsave import CheckpointManager, InvalidArgumentError
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog
from bgsave.layout import checkpoint_name
from bgsave.policies import RetentionPolicy, rank
from bgsave.storage import FileFacts, Storage, open_storage

pytestmark = pytest.mark.timeout(120)

LOSSES = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.8}


def save_losses(mgr: CheckpointManager) -> None:
    for epoch, loss in LOSSES.items():
        mgr.save_agent(torch.nn.Linear(2, 2), epoch, {"loss": loss, "score": -loss, "avg_reward": epoch / 10})
    mgr.wait()


def epoch_of(path: str | None) -> int:
    assert path is not None
    return int(os.path.basename(path)[len("model_") : -len(".pt")])


def test_best_by_a_lower_is_better_metric_agrees_with_retention(local_run_dir: str) -> None:
    """mode="min": retention keeps the lowest loss and find_best_checkpoint returns that same epoch."""
    with CheckpointManager(local_run_dir, "loss", keep_last=1, keep_best=1, metric="loss", mode="min") as mgr:
        save_losses(mgr)
        assert [info.epoch for info in mgr.checkpoints()] == [2, 4]  # the best (0.1) and the newest
        assert epoch_of(mgr.find_best_checkpoint("loss")) == 2  # the manager's mode for its own metric
        assert epoch_of(mgr.find_best_checkpoint("loss", mode="max")) == 4
        assert epoch_of(mgr.find_best_checkpoint("score")) == 2  # another metric: higher is better
        assert epoch_of(mgr.find_best_checkpoint("score", mode="min")) == 4
        with pytest.raises(InvalidArgumentError, match="mode"):
            mgr.find_best_checkpoint("loss", mode="lowest")


def test_find_checkpoints_by_score_takes_any_metric(local_run_dir: str) -> None:
    """find_checkpoints_by_score(min_score, metric=...) filters by the named sidecar key."""
    with CheckpointManager(local_run_dir, "by") as mgr:
        save_losses(mgr)
        assert [epoch_of(p) for p in mgr.find_checkpoints_by_score(0.3, metric="avg_reward")] == [3, 4]
        assert [epoch_of(p) for p in mgr.find_checkpoints_by_score(0.8, metric="loss")] == [3, 4]
        assert [epoch_of(p) for p in mgr.find_checkpoints_by_score(-0.5)] == [1, 2]  # score, as before


def test_rank_is_the_one_ordering_of_best() -> None:
    """rank() orders best first, later epoch on ties; RetentionPolicy.best uses the same order."""
    storage = open_storage("memory://rank-test")
    infos = Catalog(storage, storage.root).committed()
    assert infos == []
    from bgsave.catalog import CheckpointInfo

    made = [CheckpointInfo(e, f"m{e}", 1, {"epoch": e, "loss": v}) for e, v in [(1, 0.3), (2, 0.1), (3, 0.1), (4, 0.7)]]
    assert [i.epoch for i in rank(made, "loss", "min")] == [3, 2, 1, 4]
    assert [i.epoch for i in rank(made, "loss", "max")] == [4, 1, 3, 2]
    assert [i.epoch for i in RetentionPolicy(keep_last=1, keep_best=2, metric="loss", mode="min").best(made)] == [3, 2]


# ---- what questions cost ----------------------------------------------------------------------------
class CountingReads:
    """Wraps a storage's real sidecar reads (read_many_with_facts) and counts the files asked for."""

    def __init__(self, storage: Storage) -> None:
        self.files = 0
        real = storage.read_many_with_facts

        def read_many_with_facts(paths: Iterable[str]) -> dict[str, tuple[bytes, FileFacts | None] | Exception]:
            paths = list(paths)
            self.files += len(paths)
            return real(paths)

        storage.read_many_with_facts = read_many_with_facts  # type: ignore[method-assign]


def write_run(storage: Storage, directory: str, epochs: range) -> None:
    """Committed checkpoints as the manager writes them: a .pt, then its sidecar."""
    storage.makedirs(directory)
    for epoch in epochs:
        storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(epoch, "pt")), b"pt")
        data = sidecar_schema.dumps(sidecar_schema.build("run", epoch, {"score": epoch % 7}))
        storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(epoch, "yaml")), data)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_latest_reads_one_sidecar_and_a_catalog_reads_each_once(backend: str, request: pytest.FixtureRequest) -> None:
    """Latest reads only the newest sidecar; best reads the rest once; asking again reads nothing."""
    run_dir: str = request.getfixturevalue(f"{backend}_run_dir")
    storage = open_storage(run_dir)
    directory = storage.join("checkpoints")
    write_run(storage, directory, range(30))
    catalog = Catalog(storage, directory)
    counter = CountingReads(storage)

    latest = catalog.latest()
    assert latest is not None and latest.epoch == 29
    assert counter.files == 1
    best = catalog.best("score")
    assert best is not None and best.epoch == 27  # score 6, the latest of 6, 13, 20, 27
    assert counter.files == 30  # the 29 not read yet
    assert catalog.latest() == latest and catalog.best("score") == best and len(catalog.committed()) == 30
    assert counter.files == 30

    # A sidecar changed behind the catalog's back is read again (the listing's tag changed).
    data = sidecar_schema.dumps(sidecar_schema.build("run", 27, {"score": -1.0}))
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(27, "yaml")), data)
    best = catalog.best("score")
    assert best is not None and best.epoch == 20
    assert counter.files == 31


def test_the_manager_never_reads_back_what_it_wrote(local_run_dir: str) -> None:
    """After its own saves and update_metadata, the writing manager finds and ranks without a sidecar read."""
    with CheckpointManager(local_run_dir, "own") as mgr:
        counter = CountingReads(mgr._catalog.storage)
        save_losses(mgr)
        mgr.update_metadata(3, loss=0.01)
        mgr.wait()
        assert epoch_of(mgr.find_best_checkpoint("loss", mode="min")) == 3
        assert epoch_of(mgr.find_latest_checkpoint()) == 4
        start = mgr.start_run(lambda: torch.nn.Linear(2, 2))
        assert start.epoch == 4 and start.info is not None and start.info.sidecar["loss"] == 0.8
        assert counter.files == 0
    with open(os.path.join(local_run_dir, "checkpoints", "model_0003.yaml")) as f:
        assert yaml.safe_load(f)["loss"] == 0.01


def test_entries_say_why_a_checkpoint_is_not_committed(local_run_dir: str) -> None:
    """entries() lists every .pt: committed, without a sidecar, or with an unreadable one (and why)."""
    storage = open_storage(local_run_dir)
    directory = storage.join("checkpoints")
    write_run(storage, directory, range(3))
    storage.delete(storage.join_dir(directory, checkpoint_name(1, "yaml")))
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(2, "yaml")), b"epoch: 7\n")
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(5, "yaml")), b"epoch: 5\n")
    entries = Catalog(storage, directory).entries()
    assert [(e.epoch, e.info is not None) for e in entries] == [(0, True), (1, False), (2, False)]
    assert "no sidecar" in entries[1].problem
    assert "says epoch 7" in entries[2].problem
    assert Catalog(storage, directory).entry(5).problem == "the .pt is missing"
    assert Catalog(storage, directory).entry(9).problem == "no sidecar"


def test_find_latest_checkpoint_takes_the_run_directory_or_its_checkpoints(local_run_dir: str) -> None:
    """bgsave.find_latest_checkpoint finds the same path given the run directory or its checkpoints/ folder."""
    from bgsave import find_latest_checkpoint

    with CheckpointManager(local_run_dir, "any") as mgr:
        save_losses(mgr)
        expected = mgr.find_latest_checkpoint()
    assert expected is not None and epoch_of(expected) == 4
    assert find_latest_checkpoint(os.path.join(local_run_dir, "checkpoints")) == expected
    assert find_latest_checkpoint(local_run_dir) == expected
    assert find_latest_checkpoint(os.path.join(local_run_dir, "nothing-here")) is None
