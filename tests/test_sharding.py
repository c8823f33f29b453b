"""FSDP2 agents (gloo, CPU): ``sharding="full"`` writes whole-agent files, ``sharding="dcp"`` each rank's shards.

Real ranks (:mod:`dist_harness`), real ``fully_shard`` (each block, then the root, on a CPU device
mesh), real DCP; the files are checked here, in a process with no process group. One spawn runs
every 2-rank check in order (a module fixture; each check reports JSON, a barrier on the training
group between checks) and ends with both ranks killed while a DCP save is in flight: a spawn costs
5-8 s of imports and the first ``fully_shard`` 2-4 s more on two cores.

Faults are injected by wrapping the real thing inside the ranks: DCP's
``FileSystemWriter.write_data`` (a rank's shards held until that rank lets them go), and rank 0's
``LocalStorage.write_bytes_atomic`` (what the DCP directory holds when a sidecar is written).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

import dist_harness
from _models import Blocks
from bgsave import CheckpointManager, CheckpointReadError, InvalidArgumentError
from bgsave.catalog import Catalog
from bgsave.cli import main as bgsave_main
from bgsave.storage import open_storage
from dist_harness import Rank, digest, files_under

pytestmark = pytest.mark.distributed

# collective_timeout_s of the ranks' managers, and how long a held shard write waits at most.
TIMEOUT_S = 20.0
KILLED_EXIT = 17
WIDTH = 16
SEED = 3  # make_agent's
LR = 0.01


@dataclass(frozen=True)
class Setup:
    """Where the ranks work: ``base``, shared by every rank."""

    base: Path


# ---- helpers (every rank, and this process) ------------------------------------------------------
def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "epoch": getattr(exc, "epoch", None)}


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """Digests of the full (unsharded) model and optimizer state dicts; collective: every rank gets them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    return {
        "model": digest(get_model_state_dict(model, options=options)),
        "optimizer": digest(get_optimizer_state_dict(model, optimizer, options=options)),
    }


def _plain_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """:func:`_full_state` of a module that is not sharded, in a process without a process group."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {
        "model": digest(model.state_dict()),
        "optimizer": digest(get_optimizer_state_dict(model, optimizer)),
    }


_MESH: list[Any] = []


def _shard(model: Blocks) -> Blocks:
    """FSDP2: ``fully_shard`` each block, then the root, on a CPU mesh of every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not _MESH:
        _MESH.append(init_device_mesh("cpu", (dist.get_world_size(),)))
    for block in model.blocks:
        fully_shard(block, mesh=_MESH[0])
    fully_shard(model, mesh=_MESH[0])
    return model


def _optimizer(model: torch.nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=LR)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One training step on this rank's own batch of ``step`` (the same batch in any run that takes it)."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(8, WIDTH, generator=g)
    loss = (model(x) - x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class _Factory:
    """``make_agent``: a new ``Blocks(seed=SEED)``, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Blocks:
        self.calls += 1
        return Blocks(WIDTH, seed=SEED)


class _ShardWrites:
    """DCP's ``FileSystemWriter.write_data`` wrapped in this rank: held until :meth:`release`, if ``held``.

    :attr:`written` is set once this rank's shards of a save are written (the real call returned).
    A held write waits ``TIMEOUT_S`` at most, then fails the save.
    """

    def __init__(self, held: bool) -> None:
        self.go = threading.Event()
        self.written = threading.Event()
        if not held:
            self.go.set()

    def release(self) -> None:
        self.go.set()

    @contextmanager
    def installed(self) -> Iterator[_ShardWrites]:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        real = FileSystemWriter.write_data

        def write_data(writer: Any, plan: Any, planner: Any) -> Any:
            if not self.go.wait(TIMEOUT_S):
                raise TimeoutError("the test never released this rank's shard write")
            result = real(writer, plan, planner)
            self.written.set()
            return result

        FileSystemWriter.write_data = write_data  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            self.go.set()
            FileSystemWriter.write_data = real  # type: ignore[method-assign]


@contextmanager
def _sidecar_probe(records: list[dict[str, Any]]) -> Iterator[None]:
    """Rank 0's ``LocalStorage.write_bytes_atomic`` wrapped: at each sidecar write, what its ``.dcp`` holds."""
    from bgsave.storage.local import LocalStorage

    real = LocalStorage.write_bytes_atomic

    def write_bytes_atomic(storage: LocalStorage, path: str, data: bytes) -> int:
        name = os.path.basename(path)
        if name.startswith("model_") and name.endswith(".yaml"):
            folder = os.path.dirname(path)
            stem = name[: -len(".yaml")]
            shards = os.path.join(folder, stem + ".dcp")
            records.append(
                {
                    "sidecar": name,
                    "dcp": sorted(os.listdir(shards)) if os.path.isdir(shards) else None,
                    "trainer": os.path.exists(os.path.join(folder, stem.replace("model_", "trainer_") + ".pt")),
                }
            )
        return real(storage, path, data)

    LocalStorage.write_bytes_atomic = write_bytes_atomic  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        LocalStorage.write_bytes_atomic = real  # type: ignore[method-assign]


def _start_record(start: Any, make: _Factory) -> dict[str, Any]:
    return {
        "resumed": start.resumed,
        "epoch": start.epoch,
        "agent_step": start.agent_step,
        "type": type(start.agent).__name__,
        "agent": digest(start.agent.state_dict()),
        "shards": None if start.shards is None else os.path.basename(start.shards),
        "gathered": start.gathered,
        "new_agent": digest(start.agent.state_dict()) == digest(make().state_dict()),
    }


def _resume_and_train(
    mgr: CheckpointManager, make: _Factory, fresh: _Factory, steps: tuple[int, ...], out: dict[str, Any]
) -> tuple[Blocks, torch.optim.Adam]:
    """start_run, shard, restore(opt, model=), then ``steps``: reported as resumed / restored / continued."""
    again = mgr.start_run(make)
    out["resumed"] = _start_record(again, fresh)
    model = _shard(again.agent)
    optimizer = _optimizer(model)
    again.restore(optimizer, model=model)
    out["restored"] = _full_state(model, optimizer)
    for step in steps:
        _step(model, optimizer, step)
    out["continued"] = _full_state(model, optimizer)
    return model, optimizer


# ---- checks (every rank runs each, in order) -----------------------------------------------------
def _full(ctx: Rank, setup: Setup) -> dict[str, Any]:
    run_dir = setup.base / "full"
    make = _Factory()
    out: dict[str, Any] = {}
    mgr = CheckpointManager(run_dir, "full", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(make)
    out["start"] = {
        "resumed": start.resumed,
        "epoch": start.epoch,
        "agent": digest(start.agent.state_dict()),
    }
    model = _shard(start.agent)
    optimizer = _optimizer(model)
    start.restore(optimizer, model=model)  # a new run: nothing to restore
    for step in (1, 2):
        _step(model, optimizer, step)
    rng = digest(torch.get_rng_state())
    model.name, model.config["lr"] = "trained", 3  # what the run changed since make_agent is saved too
    path = mgr.save_at_interval(model, 2, interval=1, optimizer=optimizer, metadata={"agent_step": 2})
    out["rng_kept"] = rng == digest(torch.get_rng_state())  # the template's make_agent drew from it
    out["saved"] = {"path": path, **_full_state(model, optimizer)}
    out["class"] = type(model).__name__
    for step in (3, 4):
        _step(model, optimizer, step)
    out["uninterrupted"] = _full_state(model, optimizer)
    mgr.close()
    made_first = make.calls

    mgr = CheckpointManager(run_dir, "full", collective_timeout_s=TIMEOUT_S)
    model, optimizer = _resume_and_train(mgr, make, _Factory(), (3, 4), out)
    out["save_agent"] = {"path": mgr.save_agent(model, 4), "model": out["continued"]["model"]}
    mgr.close()
    out["made"] = [made_first, make.calls - made_first]

    mgr = CheckpointManager(setup.base / "no-start", "no-start", collective_timeout_s=TIMEOUT_S)
    model = _shard(Blocks(WIDTH, seed=5))
    optimizer = _optimizer(model)
    calls: dict[str, Callable[[], object]] = {
        "save_agent": lambda: mgr.save_agent(model, 1),
        "save_at_interval": lambda: mgr.save_at_interval(model, 1, interval=1, optimizer=optimizer),
    }
    out["no_start"] = {}
    for name, call in calls.items():
        try:
            call()
            out["no_start"][name] = None
        except InvalidArgumentError as exc:
            out["no_start"][name] = _error(exc)
    mgr.close()
    out["no_start_files"] = files_under(setup.base / "no-start")
    return out


def _dcp(ctx: Rank, setup: Setup) -> dict[str, Any]:
    run_dir = setup.base / "dcp"
    sidecar_0001 = run_dir / "checkpoints" / "model_0001.yaml"
    make = _Factory()
    sidecars: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    mgr = CheckpointManager(run_dir, "dcp", sharding="dcp", keep_last=1, collective_timeout_s=TIMEOUT_S)
    with _sidecar_probe(sidecars):
        start = mgr.start_run(make)
        model = _shard(start.agent)
        optimizer = _optimizer(model)
        _step(model, optimizer, 1)
        out["saved1"] = _full_state(model, optimizer)
        with _ShardWrites(held=ctx.rank == 1).installed() as writes:
            out["path1"] = mgr.save_at_interval(model, 1, interval=1, optimizer=optimizer, metadata={"agent_step": 1})
            for step in (2, 3):  # training goes on while rank 1's shards are held
                _step(model, optimizer, step)
            if ctx.rank == 0:
                out["sidecar_while_held"] = sidecar_0001.exists()
            dist.barrier()
            writes.release()
        out["saved2"] = _full_state(model, optimizer)
        metadata = {"agent_step": 3, "score": 0.5}
        out["path2"] = mgr.save_at_interval(model, 3, interval=1, optimizer=optimizer, metadata=metadata)
        for step in (4, 5):
            _step(model, optimizer, step)
        out["uninterrupted"] = _full_state(model, optimizer)
        mgr.wait()
        out["catalog"] = [
            [info.epoch, os.path.basename(info.path), info.sharded, info.has_trainer_state]
            for info in mgr.checkpoints()
        ]
        try:
            mgr.load_agent(3)
            out["load_agent"] = None
        except CheckpointReadError as exc:
            out["load_agent"] = _error(exc)
        mgr.close()
    out["sidecars"] = sidecars
    out["files"] = files_under(run_dir / "checkpoints")

    mgr = CheckpointManager(run_dir, "dcp", sharding="dcp", collective_timeout_s=TIMEOUT_S)
    model, optimizer = _resume_and_train(mgr, make, make, (4, 5), out)
    try:
        mgr.save_trainer_state(optimizer, 6, 6)
        out["trainer_alone"] = None
    except InvalidArgumentError as exc:
        out["trainer_alone"] = _error(exc)
    mgr.close()
    return out


def _killed_mid_save(ctx: Rank, setup: Setup) -> None:
    """Last: epoch 1 committed, then both ranks die while epoch 2's DCP save is in flight (rank 1's shards held)."""
    mgr = CheckpointManager(setup.base / "killed", "killed", sharding="dcp", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(_Factory())
    model = _shard(start.agent)
    optimizer = _optimizer(model)
    _step(model, optimizer, 1)
    mgr.save_at_interval(model, 1, interval=1, optimizer=optimizer, metadata={"agent_step": 1})
    mgr.wait()
    killed: dict[str, Any] = {"committed": _full_state(model, optimizer)}
    ctx.report("killed", killed)
    _step(model, optimizer, 2)
    with _ShardWrites(held=ctx.rank == 1).installed() as writes:
        killed["path"] = mgr.save_at_interval(model, 2, interval=1, optimizer=optimizer, metadata={"agent_step": 2})
        if ctx.rank == 0:  # its own shards are on disk: the directory is there, the save is not done
            killed["shards_written"] = writes.written.wait(TIMEOUT_S)
        ctx.report("killed", killed)
        dist.barrier()
        ctx.die(KILLED_EXIT)  # both ranks, inside the block: rank 1's write is still held


CHECKS: dict[str, Callable[[Rank, Setup], dict[str, Any]]] = {check.__name__: check for check in (_full, _dcp)}


def _scenario(ctx: Rank, setup: Setup) -> None:
    """Every rank: each check in order (reported, a failure as its traceback), then both ranks killed mid-save."""
    for name, check in CHECKS.items():
        began = time.monotonic()
        try:
            value = check(ctx, setup)
        except Exception:
            value = {"error": traceback.format_exc()}
        ctx.report(name, {**value, "check_s": round(time.monotonic() - began, 3)})
        dist.barrier()  # back in step, even after a check failed on one rank
    _killed_mid_save(ctx, setup)


# ---- the run (this process) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """The ranks' reports, one per rank, and where they worked."""

    setup: Setup
    reports: list[dict[str, Any]]

    def of(self, name: str) -> list[dict[str, Any]]:
        """What each rank reported under ``name``; fails the test with a rank's traceback if it raised."""
        return dist_harness.reported(self.reports, name)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Every 2-rank check in one spawn, ending with both ranks killed during a DCP save."""
    setup = Setup(tmp_path_factory.mktemp("sharding"))
    reports = dist_harness.run(
        _scenario,
        setup.base / "reports",
        nprocs=2,
        args=(setup,),
        dies={0: KILLED_EXIT, 1: KILLED_EXIT},
        deadline_s=240,
    )
    return Run(setup, reports)


def _load(path: str | Path) -> Any:
    assert not dist.is_initialized()  # this process has no process group: the file must load anyway
    return torch.load(path, weights_only=False)


def _sidecar(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _same(values: list[Any]) -> Any:
    assert all(v == values[0] for v in values), values
    return values[0]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = bgsave_main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, (argv, out)
    return out


# ---- sharding="full" -----------------------------------------------------------------------------
def test_full_files_load_with_torch_load_as_the_plain_module(two: Run) -> None:
    """FSDP2 "full": model/trainer files load without a process group: plain Blocks, gathered weights and optimizer."""
    got = two.of("_full")
    assert _same([g["class"] for g in got]) != "Blocks"  # fully_shard changed the class (FSDPBlocks)
    start = _same([g["start"] for g in got])
    assert (start["resumed"], start["epoch"]) == (False, 0)
    checkpoints = two.setup.base / "full" / "checkpoints"
    first = _load(checkpoints / "model_0000.pt")  # a new run's epoch 0: the agent before it was sharded
    assert type(first) is Blocks and digest(first.state_dict()) == start["agent"]
    assert start["agent"] == digest(Blocks(WIDTH, seed=SEED).state_dict())

    saved = _same([g["saved"] for g in got])
    assert saved["path"] == str(checkpoints / "model_0002.pt")
    agent = _load(saved["path"])
    assert type(agent) is Blocks  # the plain module, not FSDP's class (which does not even pickle)
    assert not any(type(t).__name__ == "DTensor" for t in agent.state_dict().values())
    assert digest(agent.state_dict()) == saved["model"]  # the full state dict the ranks gathered
    assert (agent.name, agent.config) == ("trained", {"width": WIDTH, "depth": 2, "lr": 3})  # the live agent's
    trainer = _load(checkpoints / "trainer_0002.pt")
    assert trainer["epoch"] == 2 and trainer["run"] == "full"
    assert digest(trainer["optimizer_state"]) == saved["optimizer"]
    sidecar = _sidecar(checkpoints / "model_0002.yaml")
    assert (sidecar["world_size"], sidecar["agent_step"]) == (2, 2)
    assert all(g["rng_kept"] for g in got)  # the CPU template's make_agent() left the RNG as it was


def test_full_resume_restores_the_shards_and_training_continues_identically(two: Run) -> None:
    """Resume, shard, restore(opt, model=): every rank's full state dicts are the saved ones; next steps identical."""
    got = two.of("_full")
    saved = _same([g["saved"] for g in got])
    for rank, g in enumerate(got):
        resumed = g["resumed"]
        assert (resumed["resumed"], resumed["epoch"], resumed["agent_step"]) == (True, 2, 2), rank
        assert (resumed["type"], resumed["shards"], resumed["gathered"]) == ("Blocks", None, True), rank
        assert g["restored"] == {"model": saved["model"], "optimizer": saved["optimizer"]}, rank
        assert g["continued"] == g["uninterrupted"], rank  # steps 3-4 after the resume = without one
    # Rank 0 loaded the checkpoint; rank 1 got no copy of it, only a new agent that restore() filled.
    assert got[0]["resumed"]["agent"] == saved["model"] and got[1]["resumed"]["new_agent"]
    assert got[1]["made"] == [0, 1]  # a new run's agent is rank 0's; on a resume rank 1 builds its own
    later = _same([g["save_agent"] for g in got])  # save_agent of the sharded model: a whole agent too
    agent = _load(later["path"])
    assert type(agent) is Blocks and digest(agent.state_dict()) == later["model"]


def test_a_sharded_agent_saved_without_start_run_is_refused_on_every_rank(two: Run) -> None:
    """An FSDP agent saved ("full") with no start_run(make_agent): InvalidArgumentError on both ranks, no files."""
    got = two.of("_full")
    for rank, g in enumerate(got):
        for call in ("save_agent", "save_at_interval"):
            error = g["no_start"][call]
            assert error is not None and error["type"] == "InvalidArgumentError", (rank, call)
            assert "start_run(make_agent)" in error["message"], (rank, call)
        assert not [f for f in g["no_start_files"] if f.startswith("checkpoints/")], rank


# ---- sharding="dcp" ------------------------------------------------------------------------------
def test_dcp_sidecar_is_written_only_after_every_shard_and_metadata(two: Run) -> None:
    """DCP: no sidecar while rank 1's shards are held; each comes after .metadata, every shard and the trainer state."""
    got = two.of("_dcp")
    assert got[0]["sidecar_while_held"] is False
    assert _same([g["path1"] for g in got]) == str(two.setup.base / "dcp/checkpoints/model_0001.dcp")
    by_name = {r["sidecar"]: r for r in got[0]["sidecars"]}
    assert by_name["model_0000.yaml"]["dcp"] is None  # epoch 0: a new run's plain agent
    for name in ("model_0001.yaml", "model_0003.yaml"):
        record = by_name[name]
        assert record["dcp"] is not None and {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(record["dcp"]), name
        assert not [f for f in record["dcp"] if f.endswith(".tmp")], name  # .metadata was in place, not mid-rename
        assert record["trainer"], name  # trainer_N.pt before the sidecar


def test_dcp_resume_loads_every_ranks_shards(two: Run) -> None:
    """DCP resume: a new make_agent(), then restore(opt, model=) loads the saved state on each rank; steps identical."""
    got = two.of("_dcp")
    saved = _same([g["saved2"] for g in got])
    for rank, g in enumerate(got):
        resumed = g["resumed"]
        assert (resumed["resumed"], resumed["epoch"], resumed["agent_step"]) == (True, 3, 3), rank
        assert (resumed["shards"], resumed["type"], resumed["new_agent"]) == ("model_0003.dcp", "Blocks", True), rank
        assert g["restored"] == saved, rank
        assert g["continued"] == g["uninterrupted"], rank


def test_dcp_retention_prunes_whole_directories_and_load_agent_refuses(two: Run) -> None:
    """keep_last=1: one .dcp directory left, listed as the epoch's weights; load_agent names `bgsave consolidate`."""
    got = two.of("_dcp")
    assert _same([g["catalog"] for g in got]) == [[3, "model_0003.dcp", True, True]]
    files = got[0]["files"]
    dirs = {f.split("/")[0] for f in files if "/" in f}
    assert dirs == {"model_0003.dcp"}, files
    assert {"model_0003.yaml", "trainer_0003.pt"} <= set(files)
    assert not [f for f in files if f.startswith(("model_0000", "model_0001", "trainer_0001"))], files
    for rank, g in enumerate(got):
        error = g["load_agent"]
        assert error is not None and error["epoch"] == 3, rank
        assert "bgsave consolidate" in error["message"] and "--epoch 3" in error["message"], rank
    sidecar = _sidecar(two.setup.base / "dcp/checkpoints/model_0003.yaml")
    assert (sidecar["world_size"], sidecar["score"]) == (2, 0.5)


def test_cli_lists_and_consolidates_a_dcp_epoch(two: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bgsave ls` lists the .dcp epoch as committed; `bgsave consolidate` writes a .pt a plain Blocks loads, equal."""
    got = two.of("_dcp")
    run_dir = str(two.setup.base / "dcp")
    listed = json.loads(_cli(capsys, "ls", run_dir, "--json"))
    assert [(r["epoch"], Path(r["path"]).name, r["committed"], r["trainer_state"]) for r in listed] == [
        (3, "model_0003.dcp", True, True)
    ]
    assert listed[0]["size"] > 0
    table = _cli(capsys, "ls", run_dir)
    assert "yes" in table and "a resume continues from epoch 3" in table

    out = tmp_path / "consolidated.pt"
    done = json.loads(_cli(capsys, "consolidate", run_dir, "--epoch", "3", "--out", str(out), "--json"))
    assert (done["epoch"], done["path"]) == (3, str(out))
    assert [p.name for p in tmp_path.iterdir()] == ["consolidated.pt"]  # no temp file left
    state = _load(out)
    assert set(state) == {"model", "optimizer"}
    module = Blocks(WIDTH, seed=99)
    module.load_state_dict(state["model"])
    saved = _same([g["saved2"] for g in got])
    assert digest(module.state_dict()) == saved["model"]
    assert digest(state["optimizer"]) == saved["optimizer"]  # the full optimizer state, keyed by FQN


# ---- a kill during a DCP save --------------------------------------------------------------------
def test_a_kill_during_a_dcp_save_leaves_an_uncommitted_directory_the_next_writer_removes(
    two: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both ranks killed mid-save: not committed (Catalog, `bgsave ls`); the next writer removes it, resumes epoch 1."""
    killed = two.reports[0]["killed"]
    assert killed["shards_written"] is True and "path" in two.reports[1]["killed"]
    assert _same([r["killed"]["committed"] for r in two.reports]) == killed["committed"]
    run_dir = two.setup.base / "killed"
    checkpoints = run_dir / "checkpoints"
    left = set(os.listdir(checkpoints / "model_0002.dcp"))
    assert "__0_0.distcp" in left and ".metadata" not in left, left
    assert not (checkpoints / "model_0002.yaml").exists() and not (checkpoints / "trainer_0002.pt").exists()

    storage = open_storage(str(run_dir))
    catalog = Catalog(storage, storage.join("checkpoints"))
    assert [info.epoch for info in catalog.committed()] == [0, 1]
    entries = {entry.epoch: entry for entry in catalog.entries()}
    assert entries[2].info is None and entries[2].path.endswith("model_0002.dcp")
    assert catalog.latest() is not None and catalog.latest().epoch == 1  # type: ignore[union-attr]
    listed = {r["epoch"]: r["committed"] for r in json.loads(_cli(capsys, "ls", str(run_dir), "--json"))}
    assert listed == {0: True, 1: True, 2: False}

    with CheckpointManager(run_dir, "killed", distributed="off") as mgr:  # the next writer: one process here
        start = mgr.start_run(_Factory())
        assert not (checkpoints / "model_0002.dcp").exists()  # removed at its first write
        assert (start.resumed, start.epoch, start.agent_step) == (True, 1, 1)
        assert start.shards is not None and start.shards.endswith("model_0001.dcp")
        model = start.agent
        optimizer = _optimizer(model)
        start.restore(optimizer, model=model)  # two ranks' shards, into one plain module
        assert _plain_state(model, optimizer) == killed["committed"]
    assert sorted(n for n in os.listdir(checkpoints) if not n.startswith(".")) == sorted(
        ["model_0000.pt", "model_0000.yaml", "model_0001.dcp", "model_0001.yaml", "trainer_0001.pt"]
    )


# ---- refusals (no ranks) -------------------------------------------------------------------------
def test_dcp_on_a_non_local_run_dir_is_refused(memory_run_dir: str) -> None:
    """sharding="dcp" on memory:// (DCP writes files itself): InvalidArgumentError naming it; nothing created."""
    import fsspec

    with pytest.raises(InvalidArgumentError, match="sharding='dcp'"):
        CheckpointManager(memory_run_dir, "remote", sharding="dcp")
    assert not fsspec.filesystem("memory").exists(memory_run_dir)


def test_a_bad_sharding_value_is_refused(tmp_path: Path) -> None:
    """sharding="zero3": InvalidArgumentError naming the argument and the choices; nothing on disk."""
    with pytest.raises(InvalidArgumentError, match="sharding") as info:
        CheckpointManager(tmp_path / "run", "bad", sharding="zero3")
    assert "full" in str(info.value) and "dcp" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_dcp_refuses_a_trainer_state_saved_apart_from_its_shards(two: Run) -> None:
    """sharding="dcp": save_trainer_state of an FSDP optimizer alone is refused on every rank, naming what to call."""
    for got in two.of("_dcp"):
        error = got["trainer_alone"]
        assert error is not None and error["type"] == "InvalidArgumentError"
        assert "save_at_interval" in error["message"] and "epoch 6" in error["message"]


def test_a_dcp_path_given_to_torch_load_helpers_names_consolidate(tmp_path: Path) -> None:
    """load_checkpoint of a model_N.dcp directory is a CheckpointReadError pointing at bgsave consolidate."""
    from bgsave import load_checkpoint

    shards = tmp_path / "checkpoints" / "model_0003.dcp"
    shards.mkdir(parents=True)
    with pytest.raises(CheckpointReadError, match="bgsave consolidate"):
        load_checkpoint(str(shards))


def test_a_write_after_the_guarded_file_closed_is_dropped_not_raised(tmp_path: Path) -> None:
    """torch's writer finishing its archive after the save was given up must not raise (it would abort)."""
    from bgsave.storage.retry import _Guard

    with open(tmp_path / "partial", "wb") as f:
        guard = _Guard(f, None)
        assert guard.write(b"abc") == 3
    assert guard.write(b"late end of archive") == len(b"late end of archive")
    assert guard.error is None
    assert (tmp_path / "partial").read_bytes() == b"abc"
