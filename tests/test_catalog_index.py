"""The catalog index: a writer leaves what it knew of the sidecars; a new reader uses it only where the listing agrees.

Sidecar reads are counted by wrapping the real storage's ``read_many_with_facts``.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from bgsave import CheckpointManager, catalog_index
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog
from bgsave.catalog_index import MIN_ENTRIES
from bgsave.layout import CATALOG_INDEX, checkpoint_name
from bgsave.storage import open_storage
from test_catalog import CountingReads

pytestmark = pytest.mark.timeout(180)
N = MIN_ENTRIES + 20


def run_of(run_dir: str) -> None:
    """N checkpoints saved by one writer, score = epoch % 50; it writes the index as it closes."""
    agent = torch.nn.Linear(2, 2)
    with CheckpointManager(run_dir, "idx", background=False) as mgr:
        for epoch in range(N):
            mgr.save_agent(agent, epoch, {"score": float(epoch % 50)})


def fresh(run_dir: str) -> tuple[Catalog, CountingReads]:
    storage = open_storage(run_dir)
    return Catalog(storage, storage.join("checkpoints")), CountingReads(storage)


def test_a_new_reader_uses_the_writers_index_instead_of_the_sidecars(local_run_dir: str) -> None:
    """After the writer closed, a fresh catalog ranks all N checkpoints without reading one sidecar."""
    run_dir = local_run_dir
    run_of(run_dir)
    index = os.path.join(run_dir, "checkpoints", CATALOG_INDEX)
    with open(index) as f:
        assert len(json.load(f)["sidecars"]) == N
    catalog, reads = fresh(run_dir)
    best = catalog.best("score")
    assert best is not None and best.epoch == max(e for e in range(N) if e % 50 == 49)  # ties: the later epoch
    assert len(catalog.committed()) == N
    assert reads.files == 0
    # The CLI is a new reader too.
    manager = CheckpointManager(run_dir, "idx")
    assert manager.find_best_checkpoint() == best.path
    manager.close()


def test_what_changed_since_the_index_is_read_again(local_run_dir: str) -> None:
    """A sidecar rewritten after the index, one deleted and one added: read or left out, never taken from the index."""
    run_of(local_run_dir)
    storage = open_storage(local_run_dir)
    directory = storage.join("checkpoints")
    data = sidecar_schema.dumps(sidecar_schema.build("idx", 3, {"score": 1000.0}))
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(3, "yaml")), data)
    storage.delete(storage.join_dir(directory, checkpoint_name(49, "yaml")))  # uncommitted now
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(N, "pt")), b"pt")
    extra = sidecar_schema.dumps(sidecar_schema.build("idx", N, {"score": -1.0}))
    storage.write_bytes_atomic(storage.join_dir(directory, checkpoint_name(N, "yaml")), extra)

    catalog, reads = fresh(local_run_dir)
    best = catalog.best("score")
    assert best is not None and best.epoch == 3 and best.sidecar["score"] == 1000.0
    epochs = [info.epoch for info in catalog.committed()]
    assert 49 not in epochs and N in epochs and len(epochs) == N
    assert reads.files == 2  # epoch 3's new sidecar and the new epoch N


def test_an_unreadable_index_only_costs_reads(local_run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged index is ignored with a WARNING naming it; every sidecar is read; the answers are the same."""
    run_of(local_run_dir)
    index = os.path.join(local_run_dir, "checkpoints", CATALOG_INDEX)
    with open(index, "r+b") as f:
        f.truncate(100)
    catalog, reads = fresh(local_run_dir)
    with caplog.at_level(logging.WARNING, logger="bgsave"):
        assert len(catalog.committed()) == N
    assert reads.files == N
    assert any(CATALOG_INDEX in r.getMessage() for r in caplog.records)


def test_a_forged_entry_for_another_file_is_not_used(local_run_dir: str) -> None:
    """An index entry whose size or tag does not match the listed sidecar is ignored: the file is read."""
    run_of(local_run_dir)
    index = os.path.join(local_run_dir, "checkpoints", CATALOG_INDEX)
    with open(index) as f:
        parsed = json.load(f)
    i = parsed["names"].index(checkpoint_name(7, "yaml"))
    parsed["sidecars"][i]["score"] = 9999.0  # content claimed for an unchanged file
    parsed["tags"][i] = 12345  # ...but its tag no longer matches
    with open(index, "w") as f:
        json.dump(parsed, f)
    catalog, reads = fresh(local_run_dir)
    best = catalog.best("score")
    assert best is not None and best.sidecar["score"] == 49.0
    assert reads.files == 1


@pytest.mark.parametrize(
    "index",
    [
        {"format": 1, "sidecars": {}},  # the first format: a list per entry
        {"format": 2, "names": ["model_0001.yaml"], "sizes": [], "tags": [], "sidecars": []},  # columns unequal
        {"format": 2, "names": {}, "sizes": [], "tags": [], "sidecars": []},
    ],
)
def test_an_index_of_another_shape_is_refused(index: dict[str, object]) -> None:
    """loads() refuses what is not this format's four equal columns; the catalog then ignores the index."""
    with pytest.raises(ValueError):
        catalog_index.loads(json.dumps(index).encode())
