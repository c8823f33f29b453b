"""torch.distributed (gloo, CPU): every rank makes the same calls, rank 0 writes; start_run, wait, close are collective.

Real ranks (``spawn``ed interpreters on 127.0.0.1, :mod:`dist_harness`), real files, real ``torch.save``
and ``torch.load``; the files are checked here, in a process with no process group. A spawn costs
5-8 s of imports on two cores (the first ``DDP()`` 5 s more), so the 2-rank checks run one after
another in *one* spawn (a module fixture): each check runs on every rank and reports JSON, a barrier
on the training group between checks; the tests assert on the reports. The last check kills rank 1;
a second, small spawn kills the writer. A check that raises on one rank is reported (with its
traceback) by that rank, and the others' collectives fail within ``collective_timeout_s``.

``torch.compile``'s wrapper is not tested here: wrapping a module imports torch's compiler stack,
9 s a rank on this machine.

The 4-rank run of the basic checks is slow (4 processes on 2 cores) and runs only with ``--ranks4``
or ``BGSAVE_RANKS4=1``.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
import yaml

import dist_harness
from _models import Agent, UnpicklableAgent, UnwritableAgent, make_optimizer, state_of, train
from bgsave import (
    BgsaveError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DistributedError,
    InvalidArgumentError,
)
from dist_harness import Rank, digest, files_under

pytestmark = pytest.mark.distributed

# collective_timeout_s of the scenarios' managers: a broken check fails within it instead of hanging.
TIMEOUT_S = 20.0
# collective_timeout_s where a rank is meant to stay away, so the wait for it is part of the test.
SHORT_TIMEOUT_S = 3.0
# Well within TIMEOUT_S: how long a failure that is detected (not waited out) may take.
PROMPT_S = 8.0
KILLED_EXIT = 17
LOCK = ".bgsave-writer.lock"
INDEX = "checkpoints/.bgsave-catalog.json"
DDP_STEPS = 40
DDP_EVERY = 4
DDP_WIDTH = 128


@dataclass(frozen=True)
class Setup:
    """Where a scenario's ranks work: ``base`` (shared by every rank) and an ``s3://`` bucket (None: no S3)."""

    base: Path
    s3_url: str | None = None


Check = Callable[[Rank, Setup], dict[str, Any]]


# ---- helpers (every rank) ------------------------------------------------------------------------
def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "epoch": getattr(exc, "epoch", None),
        "path": getattr(exc, "path", None),
        "write_error": isinstance(exc, CheckpointWriteError),
    }


class _LeaveError(Exception):
    """Raised inside a ``with`` block to leave it the way a failing training loop does."""


def _close_alone(mgr: CheckpointManager) -> None:
    """Close without a collective (a ``with`` block that raises): for managers whose group is broken."""
    try:
        with mgr:
            raise _LeaveError
    except _LeaveError:
        pass


def _start_record(start: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    return {
        "resumed": start.resumed,
        "epoch": start.epoch,
        "agent_step": start.agent_step,
        "agent": digest(state_of(start.agent)),
        "optimizer": None if optimizer is None else digest(optimizer.state_dict()),
    }


# ---- checks (every rank runs each, in order) -----------------------------------------------------
def _separate_dirs(ctx: Rank, setup: Setup) -> dict[str, Any]:
    run_dir = setup.base / "separate" / f"rank{ctx.rank}"
    mgr = CheckpointManager(run_dir, "separate", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(Agent)
    optimizer = make_optimizer(start.agent)
    train(start.agent, optimizer, 2)
    paths: list[str | None] = [mgr.save_agent(start.agent, 1, metadata={"score": 0.5})]
    mgr.save_trainer_state(optimizer, 1, 10)
    paths.append(mgr.save_at_interval(start.agent, 2, interval=2, optimizer=optimizer, metadata={"agent_step": 20}))
    mgr.update_metadata(1, score=0.75)
    mgr.wait()
    during = files_under(run_dir)
    mgr.close()
    return {
        "who": [mgr.rank, mgr.world_size, mgr.is_writer],
        "paths": [os.path.relpath(str(p), run_dir) for p in paths],
        "during": during,
        "after": files_under(run_dir),
    }


def _shared_dir(ctx: Rank, setup: Setup) -> dict[str, Any]:
    made: list[int] = []

    def make() -> Agent:
        made.append(ctx.rank)
        return Agent(seed=7)

    mgr = CheckpointManager(setup.base / "shared", "shared", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(make)
    started = _start_record(start)
    optimizer = make_optimizer(start.agent)
    paths: list[str | None] = [mgr.save_agent(start.agent, 1, metadata={"score": 0.25})]
    train(start.agent, optimizer, 1)
    paths.append(
        mgr.save_at_interval(start.agent, 2, interval=2, optimizer=optimizer, metadata={"agent_step": 2, "score": 0.5})
    )
    skipped = mgr.save_at_interval(start.agent, 3, interval=2, optimizer=optimizer)
    mgr.update_metadata(2, score=0.9)
    refused = []
    calls: list[Callable[[], object]] = [
        lambda: mgr.save_agent(start.agent, -1),
        lambda: mgr.update_metadata(1),
        lambda: mgr.save_trainer_state(cast(Any, object()), 3, 3),
        lambda: mgr.save_at_interval(start.agent, 4, interval=0),
    ]
    for call in calls:
        try:
            call()
            refused.append("")
        except InvalidArgumentError as exc:
            refused.append(type(exc).__name__)
    mgr.wait()  # collective: rank 0's writes are durable before any rank returns
    seen = {
        "latest": mgr.find_latest_checkpoint(),
        "best": mgr.find_best_checkpoint(),
        "epochs": [info.epoch for info in mgr.checkpoints()],
    }
    mgr.close()
    return {
        "made": made,
        "start": started,
        "paths": paths,
        "skipped": skipped,
        "refused": refused,
        "seen": seen,
        "files": files_under(setup.base / "shared"),
    }


def _same_start_everywhere(ctx: Rank, setup: Setup) -> dict[str, Any]:
    run_dir = setup.base / "resume"
    made: list[int] = []

    def make() -> Agent:
        made.append(ctx.rank)
        return Agent(seed=10 + ctx.rank)  # a rank that made its own would show

    out: dict[str, Any] = {}
    mgr = CheckpointManager(run_dir, "resume", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(make, rng=True)
    out["fresh"] = _start_record(start)
    optimizer = make_optimizer(start.agent)
    train(start.agent, optimizer, 3)  # the same data on every rank: the same weights and optimizer state
    torch.manual_seed(1000 + ctx.rank)  # each rank its own RNG: a resume must give rank 0's to all
    mgr.save_at_interval(start.agent, 5, interval=5, optimizer=optimizer, rng=True, metadata={"agent_step": 50})
    out["draw_after_save"] = torch.rand(4).tolist()
    out["saved"] = _start_record(start, optimizer)
    mgr.close()
    for resume in ("broadcast", "each_rank"):
        mgr = CheckpointManager(run_dir, "resume", resume=resume, collective_timeout_s=TIMEOUT_S)
        again = mgr.start_run(make, rng=True)
        optimizer = make_optimizer(again.agent)
        torch.manual_seed(5 + ctx.rank)
        again.restore(optimizer)
        out[resume] = {**_start_record(again, optimizer), "draw": torch.rand(4).tolist()}
        mgr.close()
    out["made"] = made
    return out


def _node_local_dirs(ctx: Rank, setup: Setup) -> dict[str, Any]:
    own = setup.base / "node" / f"rank{ctx.rank}"
    out: dict[str, Any] = {}
    # distributed="off": one manager per process, each writing its own directory (no collectives).
    alone = CheckpointManager(own, "node", distributed="off")
    out["off_who"] = [alone.rank, alone.world_size, alone.is_writer]
    agent = Agent(seed=50 + ctx.rank)
    optimizer = make_optimizer(agent)
    for epoch in (3, 5) if ctx.rank == 0 else (2,):  # rank 0's directory is ahead of the others'
        train(agent, optimizer, 1)
        alone.save_at_interval(agent, epoch, interval=1, optimizer=optimizer, metadata={"agent_step": epoch})
    out["off_saved"] = digest(state_of(agent))
    alone.close()
    out["off_files"] = files_under(own)

    made: list[int] = []

    def make() -> Agent:
        made.append(ctx.rank)
        return Agent(seed=70 + ctx.rank)

    mgr = CheckpointManager(own, "node", collective_timeout_s=TIMEOUT_S)
    out["broadcast"] = _start_record(mgr.start_run(make))
    mgr.close()
    out["files_after_broadcast"] = files_under(own)

    mgr = CheckpointManager(own, "node", resume="each_rank", collective_timeout_s=TIMEOUT_S)
    began = time.monotonic()
    try:
        mgr.start_run(make)
        out["each_rank"] = None
    except CheckpointNotFoundError as exc:
        out["each_rank"] = _error(exc)
    out["each_rank_s"] = time.monotonic() - began
    mgr.close()

    fresh = setup.base / "node-fresh" / f"rank{ctx.rank}"  # a new run: rank 0's new agent, as with "broadcast"
    mgr = CheckpointManager(fresh, "node-fresh", resume="each_rank", collective_timeout_s=TIMEOUT_S)
    out["each_rank_new"] = _start_record(mgr.start_run(make))
    mgr.close()
    out["each_rank_new_files"] = files_under(fresh)
    out["made"] = made
    return out


def _write_failure_everywhere(ctx: Rank, setup: Setup) -> dict[str, Any]:
    mgr = CheckpointManager(setup.base / "failing", "failing", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(Agent)
    out: dict[str, Any] = {"paths": [mgr.save_agent(UnwritableAgent(), 1)]}  # fails in rank 0's worker
    try:
        mgr.wait()
        out["wait"] = None
    except BgsaveError as exc:
        out["wait"] = _error(exc)
    out["paths"].append(mgr.save_agent(start.agent, 2))  # the run goes on
    out["paths"].append(mgr.save_agent(UnwritableAgent(), 3))
    try:
        mgr.close()
        out["close"] = None
    except BgsaveError as exc:
        out["close"] = _error(exc)
    out["files"] = files_under(setup.base / "failing")
    return out


def _unpicklable_agent(ctx: Rank, setup: Setup) -> dict[str, Any]:
    mgr = CheckpointManager(setup.base / "unpicklable", "unpicklable", collective_timeout_s=TIMEOUT_S)
    mgr.start_run(Agent)
    try:
        out: dict[str, Any] = {"returned": mgr.save_agent(UnpicklableAgent(), 1), "raised": None}
    except BgsaveError as exc:
        out = {"returned": None, "raised": _error(exc)}
    mgr.close()
    return out


def _raising_with_block(ctx: Rank, setup: Setup) -> dict[str, Any]:
    mgr = CheckpointManager(setup.base / "raising", "raising", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(Agent)
    path = mgr.save_agent(start.agent, 1)
    began = time.monotonic()
    try:
        with mgr:
            if ctx.rank == 0:
                dist.barrier()  # the training group: the others arrive only once their with block is left
            began = time.monotonic()
            raise _LeaveError
    except _LeaveError:
        pass
    left_s = time.monotonic() - began
    if ctx.rank != 0:
        dist.barrier()
    return {"left_s": left_s, "path": path}


def _preempted_everywhere(ctx: Rank, setup: Setup) -> dict[str, Any]:
    handed_on: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: handed_on.append(signum))
    try:
        mgr = CheckpointManager(setup.base / "preempted", "preempted", collective_timeout_s=TIMEOUT_S)
        start = mgr.start_run(Agent)
        mgr.handle_sigterm(grace_s=60)
        before = mgr.preempted
        if ctx.rank == ctx.world_size - 1:
            signal.raise_signal(signal.SIGTERM)  # the last rank only: the signal reached it first
        path = mgr.save_at_interval(start.agent, 3, interval=10)  # not an interval epoch: saved for the signal
        preempted = mgr.preempted
        mgr.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {"before": before, "path": path, "preempted": preempted, "handed_on": handed_on}


def _rank_not_joining(ctx: Rank, setup: Setup) -> dict[str, Any]:
    mgr = CheckpointManager(setup.base / "absent", "absent", collective_timeout_s=SHORT_TIMEOUT_S)
    start = mgr.start_run(Agent)
    mgr.save_agent(start.agent, 1)
    out: dict[str, Any] = {"wait": None, "wait_s": None}
    if ctx.rank == 0:  # the others never call wait()
        began = time.monotonic()
        try:
            mgr.wait()
        except BgsaveError as exc:
            out["wait"] = _error(exc)
        out["wait_s"] = time.monotonic() - began
    dist.barrier()
    _close_alone(mgr)
    return out


def _ddp_training(ctx: Rank, setup: Setup) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Agent(width=DDP_WIDTH, seed=20 + ctx.rank))  # rank 0's weights, broadcast
    optimizer = make_optimizer(model)
    mgr = CheckpointManager(setup.base / "ddp", "ddp", collective_timeout_s=TIMEOUT_S)
    data = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own batches: gradients are all-reduced
    saved: dict[str, str] = {}
    paths = []
    for step in range(1, DDP_STEPS + 1):
        x = torch.randn(16, DDP_WIDTH, generator=data)
        loss = (model(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        path = mgr.save_at_interval(
            model, step, interval=DDP_EVERY, optimizer=optimizer, metadata={"agent_step": step, "loss": loss.item()}
        )
        if path is not None:
            paths.append(path)
            saved[str(step)] = digest(state_of(model.module))
    mgr.wait()
    weights = digest(model.module.state_dict())
    mgr.close()
    return {"paths": paths, "saved": saved, "weights": weights, "files": files_under(setup.base / "ddp")}


def _s3_run_dir(ctx: Rank, setup: Setup) -> dict[str, Any]:
    if setup.s3_url is None:
        return {"skipped": True}
    made: list[int] = []

    def make() -> Agent:
        made.append(ctx.rank)
        return Agent(seed=90)

    mgr = CheckpointManager(setup.s3_url, "s3run", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(make)
    optimizer = make_optimizer(start.agent)
    paths = []
    for epoch in (1, 2):
        train(start.agent, optimizer, 1)
        paths.append(mgr.save_at_interval(start.agent, epoch, interval=1, optimizer=optimizer))
    mgr.wait()
    latest = mgr.find_latest_checkpoint()
    mgr.close()
    return {
        "skipped": False,
        "made": made,
        "paths": paths,
        "latest": latest,
        "agent": digest(state_of(start.agent)),
    }


def _rank_killed(ctx: Rank, setup: Setup, victim: int) -> None:
    """Last: ``victim`` dies (os._exit) after a committed save; the others' next collective fails at once."""
    mgr = CheckpointManager(setup.base / f"killed{victim}", "killed", collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(Agent)
    path = mgr.save_agent(start.agent, 1)
    mgr.wait()
    ctx.report("killed", {"path": path, "agent": digest(state_of(start.agent))})
    if ctx.rank == victim:
        ctx.die(KILLED_EXIT)
    out: dict[str, Any] = {}
    for what, call in (("wait", mgr.wait), ("close", mgr.close)):
        began = time.monotonic()
        try:
            call()
            out[what] = None
        except BgsaveError as exc:
            out[what] = _error(exc)
        out[f"{what}_s"] = time.monotonic() - began
    ctx.report("survivor", out)


def _mirrored(ctx: Rank, setup: Setup) -> dict[str, Any]:
    """Node-local run dirs and one mirror: rank 0 uploads; then "new nodes" (empty dirs) resume from the mirror."""
    mirror = setup.s3_url.replace("/runs/dist", "/runs/mirrored") if setup.s3_url else str(setup.base / "mirror")
    node = setup.base / "mirrored" / f"rank{ctx.rank}"
    mgr = CheckpointManager(node, "mirrored", mirror=mirror, collective_timeout_s=TIMEOUT_S)
    start = mgr.start_run(Agent)
    optimizer = make_optimizer(start.agent)
    for epoch in (1, 2):
        train(start.agent, optimizer, 1)
        mgr.save_at_interval(start.agent, epoch, interval=1, optimizer=optimizer)
    mgr.wait()
    status = [(s.epoch, s.state) for s in mgr.mirror_status()]
    saved = _start_record(start, optimizer)
    mgr.close()
    fresh = CheckpointManager(setup.base / "fresh" / f"rank{ctx.rank}", "mirrored", mirror=mirror)
    resumed = fresh.start_run(Agent)
    again = make_optimizer(resumed.agent)
    resumed.restore(again)
    fresh.close()
    return {
        "status": status,
        "local": files_under(node),
        "saved": saved,
        "resumed": _start_record(resumed, again),
    }


CHECKS: dict[str, Check] = {
    check.__name__: check
    for check in (
        _separate_dirs,
        _shared_dir,
        _same_start_everywhere,
        _node_local_dirs,
        _write_failure_everywhere,
        _unpicklable_agent,
        _raising_with_block,
        _preempted_everywhere,
        _rank_not_joining,
        _ddp_training,
        _s3_run_dir,
        _mirrored,
    )
}
BASIC = ("_separate_dirs", "_shared_dir", "_same_start_everywhere", "_node_local_dirs", "_raising_with_block")


def _scenario(ctx: Rank, setup: Setup, checks: tuple[str, ...], victim: int | None) -> None:
    """Every rank: the named checks in order (each reported, a failure as its traceback), then maybe a kill."""
    for name in checks:
        began = time.monotonic()
        try:
            value = CHECKS[name](ctx, setup)
        except Exception:
            value = {"error": traceback.format_exc()}
        ctx.report(name, {**value, "check_s": round(time.monotonic() - began, 3)})
        dist.barrier()  # back in step, even after a check failed on one rank
    if victim is not None:
        _rank_killed(ctx, setup, victim)


# ---- the runs (this process) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A scenario's reports, one per rank, and where its ranks worked."""

    setup: Setup
    reports: list[dict[str, Any]]

    @property
    def world(self) -> int:
        """How many ranks ran."""
        return len(self.reports)

    def of(self, check: Callable[..., Any] | str) -> list[dict[str, Any]]:
        """What each rank reported for ``check``; fails the test with a rank's traceback if it raised."""
        return dist_harness.reported(self.reports, check if isinstance(check, str) else check.__name__)


def _spawn(setup: Setup, nprocs: int, checks: tuple[str, ...], victim: int | None) -> Run:
    dies = {} if victim is None else {victim: KILLED_EXIT}
    reports = dist_harness.run(
        _scenario, setup.base / "reports", nprocs=nprocs, args=(setup, checks, victim), dies=dies, deadline_s=240
    )
    return Run(setup, reports)


def _bucket(request: pytest.FixtureRequest) -> str | None:
    """``s3://<fresh bucket>/runs/dist`` on the session's loopback S3 server (the ranks inherit its AWS_* env).

    None without s3fs / moto.
    """
    try:
        endpoint: str = request.getfixturevalue("s3_endpoint")
    except pytest.skip.Exception:
        return None
    import s3fs

    bucket = f"bgsave-dist-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/runs/dist"


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Run:
    """Every 2-rank check in one spawn, ending with rank 1 killed."""
    setup = Setup(tmp_path_factory.mktemp("two-ranks"), _bucket(request))
    return _spawn(setup, 2, tuple(CHECKS), victim=1)


def _load(path: str | Path) -> Any:
    assert not dist.is_initialized()  # this process has no process group: the file must load anyway
    return torch.load(path, weights_only=False)


def _sidecar(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(Path(str(path)[: -len(".pt")] + ".yaml").read_text())
    return data


def _checkpoint_files(files: list[str]) -> set[str]:
    """The files a run directory holds, less the catalog index (an optimisation, written when it can be)."""
    return set(files) - {INDEX}


def _same(values: list[Any]) -> Any:
    assert all(v == values[0] for v in values), values
    return values[0]


# ---- assertions shared by the 2- and 4-rank runs -------------------------------------------------
def _assert_separate_dirs(run: Run) -> None:
    got = run.of(_separate_dirs)
    assert [g["who"] for g in got] == [[r, run.world, r == 0] for r in range(run.world)]
    _same([g["paths"] for g in got])
    model = {f"checkpoints/model_000{e}.{s}" for e in (0, 1, 2) for s in ("pt", "yaml")}
    trainers = {"checkpoints/trainer_0001.pt", "checkpoints/trainer_0002.pt"}
    assert set(got[0]["during"]) == {LOCK, *model, *trainers}
    assert _checkpoint_files(got[0]["after"]) == {*model, *trainers}
    for rank in range(1, run.world):
        assert got[rank]["during"] == got[rank]["after"] == [], rank
    assert _sidecar(run.setup.base / "separate/rank0/checkpoints/model_0001.pt")["score"] == 0.75


def _assert_shared_dir(run: Run) -> None:
    got = run.of(_shared_dir)
    assert [g["made"] for g in got] == [[0]] + [[]] * (run.world - 1)
    start = _same([g["start"] for g in got])
    assert start["resumed"] is False and start["epoch"] == 0
    assert start["agent"] == digest(state_of(Agent(seed=7)))
    paths = _same([g["paths"] for g in got])
    assert _same([g["skipped"] for g in got]) is None
    assert _same([g["refused"] for g in got]) == ["InvalidArgumentError"] * 4
    assert _same([g["seen"] for g in got]) == {"latest": paths[1], "best": paths[1], "epochs": [0, 1, 2]}
    files = _same([g["files"] for g in got])
    assert _checkpoint_files(files) == {"checkpoints/trainer_0002.pt"} | {
        f"checkpoints/model_000{e}.{s}" for e in (0, 1, 2) for s in ("pt", "yaml")
    }
    assert digest(state_of(_load(run.setup.base / "shared/checkpoints/model_0000.pt"))) == start["agent"]
    sidecar = _sidecar(paths[1])
    assert (sidecar["world_size"], sidecar["score"], sidecar["agent_step"]) == (run.world, 0.9, 2)


def _assert_same_start_everywhere(run: Run) -> None:
    got = run.of(_same_start_everywhere)
    assert [g["made"] for g in got] == [[0]] + [[]] * (run.world - 1)
    fresh = _same([g["fresh"] for g in got])
    assert (fresh["resumed"], fresh["epoch"], fresh["agent"]) == (
        False,
        0,
        digest(state_of(Agent(seed=10))),
    )
    saved = _same([g["saved"] for g in got])
    for resume in ("broadcast", "each_rank"):
        again = _same([g[resume] for g in got])
        assert (again["resumed"], again["epoch"], again["agent_step"]) == (True, 5, 50), resume
        assert (again["agent"], again["optimizer"]) == (saved["agent"], saved["optimizer"]), resume
        assert again["draw"] == got[0]["draw_after_save"], resume  # rank 0's random streams, on every rank
    assert got[1]["draw_after_save"] != got[0]["draw_after_save"]  # (they were different before)


def _assert_node_local_dirs(run: Run) -> None:
    got = run.of(_node_local_dirs)
    committed = {0: (3, 5)} | {r: (2,) for r in range(1, run.world)}
    for rank, g in enumerate(got):
        assert g["off_who"] == [0, 1, True], rank
        expected = {f"checkpoints/model_000{e}.{s}" for e in committed[rank] for s in ("pt", "yaml")}
        expected |= {f"checkpoints/trainer_000{e}.pt" for e in committed[rank]}
        assert _checkpoint_files(g["off_files"]) == expected, rank
        assert g["files_after_broadcast"] == g["off_files"], rank
        sidecar = _sidecar(run.setup.base / f"node/rank{rank}/checkpoints/model_000{committed[rank][-1]}.pt")
        assert "world_size" not in sidecar, rank  # distributed="off": one process, one run
    broadcast = _same([g["broadcast"] for g in got])
    assert (broadcast["resumed"], broadcast["epoch"], broadcast["agent"]) == (True, 5, got[0]["off_saved"])
    failed = _same([g["each_rank"] for g in got])
    assert failed is not None and (failed["type"], failed["epoch"]) == ("CheckpointNotFoundError", 5)
    message = failed["message"]
    assert "epoch 5" in message and "rank 0:" not in message
    for rank in range(1, run.world):
        assert f"rank {rank}:" in message, message
    assert max(g["each_rank_s"] for g in got) < PROMPT_S
    new = _same([g["each_rank_new"] for g in got])
    assert (new["resumed"], new["epoch"], new["agent"]) == (False, 0, digest(state_of(Agent(seed=70))))
    assert "checkpoints/model_0000.pt" in got[0]["each_rank_new_files"]
    assert all(g["each_rank_new_files"] == [] for g in got[1:])
    assert [g["made"] for g in got] == [[0]] + [[]] * (run.world - 1)  # the new run only


def _assert_raising_with_block(run: Run) -> None:
    got = run.of(_raising_with_block)
    assert max(g["left_s"] for g in got) < PROMPT_S  # a collective would wait TIMEOUT_S for a rank not there
    path = _same([g["path"] for g in got])
    assert isinstance(_load(path), Agent)  # rank 0's close (alone) still flushed the save


# ---- tests ---------------------------------------------------------------------------------------
def test_only_rank_0_writes_in_separate_run_directories(two: Run) -> None:
    """Each rank given its own run_dir: only rank 0's holds files (and, while open, the lock); the others stay empty."""
    _assert_separate_dirs(two)


def test_shared_run_directory_holds_one_set_of_files(two: Run) -> None:
    """One shared run_dir: no RunLockedError, one set of files, the same paths and refusals on every rank."""
    _assert_shared_dir(two)


def test_start_run_gives_every_rank_the_same_agent_and_trainer_state(two: Run) -> None:
    """New run (only rank 0 calls make_agent) and resumed (broadcast, each_rank): same weights, optimizer, RNG."""
    _assert_same_start_everywhere(two)


def test_node_local_run_directories_resume_rank_0s_epoch_or_fail_everywhere(two: Run) -> None:
    """Rank 1's run_dir older: "broadcast" resumes rank 0's epoch on both; "each_rank" fails on both, naming rank 1."""
    _assert_node_local_dirs(two)


def test_a_with_block_that_raises_closes_without_a_collective(two: Run) -> None:
    """Leaving ``with mgr:`` by an exception closes at once on each rank (no collective); rank 0 still flushes."""
    _assert_raising_with_block(two)


def test_a_write_failure_on_rank_0_is_raised_on_every_rank(two: Run) -> None:
    """A background write failure on rank 0 is raised by wait() and close() on both ranks: same class, epoch, path."""
    got = two.of(_write_failure_everywhere)
    paths = _same([g["paths"] for g in got])
    for what, epoch in (("wait", 1), ("close", 3)):
        first, second = (g[what] for g in got)
        assert first is not None and second is not None, what
        assert first["write_error"] and second["type"] == first["type"], what
        assert (first["epoch"], second["epoch"]) == (epoch, epoch), what
        assert first["path"] == second["path"] == paths[epoch - 1], what
        assert second["message"] == f"on rank 0: {first['message']}", what
    files = _same([g["files"] for g in got])
    assert "checkpoints/model_0001.pt" not in files and "checkpoints/model_0003.pt" not in files
    assert {"checkpoints/model_0000.yaml", "checkpoints/model_0002.yaml"} <= set(files)


def test_an_agent_that_cannot_be_pickled_is_refused_by_rank_0(two: Run) -> None:
    """An agent that cannot be pickled: rank 0's save_agent raises CheckpointWriteError at once and writes nothing."""
    got = two.of(_unpicklable_agent)
    assert got[0]["raised"] is not None and got[0]["raised"]["write_error"]
    assert not (two.setup.base / "unpicklable/checkpoints/model_0001.pt").exists()


def test_a_rank_that_does_not_join_fails_the_collective_after_the_timeout(two: Run) -> None:
    """Rank 1 never calls wait(): rank 0's wait() raises DistributedError after collective_timeout_s, not never."""
    got = two.of(_rank_not_joining)
    error = got[0]["wait"]
    assert error is not None and error["type"] == DistributedError.__name__
    assert "rank 0 of 2" in error["message"] and f"collective_timeout_s={SHORT_TIMEOUT_S:g}" in error["message"]
    assert SHORT_TIMEOUT_S * 0.8 <= got[0]["wait_s"] < SHORT_TIMEOUT_S + PROMPT_S


def test_ddp_training_with_background_saves(two: Run) -> None:
    """40 DDP steps while rank 0 saves the DDP model every 4: no mismatch; files load unwrapped."""
    got = two.of(_ddp_training)
    paths = _same([g["paths"] for g in got])
    assert len(paths) == DDP_STEPS // DDP_EVERY
    _same([g["weights"] for g in got])  # DDP kept the ranks equal
    for step, saved in got[0]["saved"].items():
        agent = _load(paths[int(step) // DDP_EVERY - 1])
        assert type(agent) is Agent  # the module, not the DDP wrapper (which only loads in a process group)
        assert digest(state_of(agent)) == saved, step
        assert _sidecar(paths[int(step) // DDP_EVERY - 1])["world_size"] == 2
    assert not [f for f in got[0]["files"] if "tmp" in f]


def test_s3_run_directory_from_two_ranks(two: Run) -> None:
    """Both ranks on one s3:// run_dir: rank 0 writes one set of objects, both get the same paths and latest."""
    got = two.of(_s3_run_dir)
    if got[0]["skipped"]:
        pytest.skip("s3fs / moto not installed")
    import s3fs

    assert [g["made"] for g in got] == [[0], []]
    paths = _same([g["paths"] for g in got])
    assert _same([g["latest"] for g in got]) == paths[-1]
    url = two.setup.s3_url
    assert url is not None
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://")
    names = sorted(p.removeprefix(root + "/") for p in fs.find(root))
    expected = [f"checkpoints/model_000{e}.{s}" for e in (0, 1, 2) for s in ("pt", "yaml")]
    assert _checkpoint_files(names) == {*expected, "checkpoints/trainer_0001.pt", "checkpoints/trainer_0002.pt"}
    with fs.open(paths[-1].removeprefix("s3://"), "rb") as f:
        agent = torch.load(f, weights_only=False)
    assert digest(state_of(agent)) == _same([g["agent"] for g in got])


def test_a_killed_rank_makes_the_next_collective_fail_at_once(two: Run) -> None:
    """Rank 1 os._exit()s: rank 0's wait() and close() raise DistributedError in well under collective_timeout_s."""
    survivor = two.reports[0]["survivor"]
    for what in ("wait", "close"):
        error = survivor[what]
        assert error is not None and error["type"] == DistributedError.__name__, what
        assert "rank 0 of 2" in error["message"] and f"collective_timeout_s={TIMEOUT_S:g}" in error["message"]
        assert survivor[f"{what}_s"] < PROMPT_S, what
    killed = two.reports[1]["killed"]
    assert digest(state_of(_load(killed["path"]))) == killed["agent"]  # what was committed stays


@pytest.fixture(scope="module")
def writer_killed(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Rank 0, the writer, os._exit()s after a committed save."""
    return _spawn(Setup(tmp_path_factory.mktemp("writer-killed")), 2, (), victim=0)


def test_a_killed_writer_makes_the_next_collective_fail_at_once(writer_killed: Run) -> None:
    """Rank 0 os._exit()s: rank 1's wait() and close() raise DistributedError at once; rank 0's committed save loads."""
    survivor = writer_killed.reports[1]["survivor"]
    for what in ("wait", "close"):
        error = survivor[what]
        assert error is not None and error["type"] == DistributedError.__name__, what
        assert "rank 1 of 2" in error["message"], what
        assert survivor[f"{what}_s"] < PROMPT_S, what
    killed = writer_killed.reports[0]["killed"]
    assert digest(state_of(_load(killed["path"]))) == killed["agent"]


def _only_rank_0_constructs(ctx: Rank) -> None:
    if ctx.rank == 0:
        began = time.monotonic()
        try:
            CheckpointManager(ctx.workdir / "run", "alone", collective_timeout_s=SHORT_TIMEOUT_S)
            ctx.report("error", None)
        except DistributedError as exc:
            ctx.report("error", _error(exc))
        ctx.report("took_s", time.monotonic() - began)
    dist.barrier()  # the training group still works: rank 1 waits here for rank 0


def test_a_manager_built_on_rank_0_only_is_a_named_error_not_a_hang(tmp_path: Path) -> None:
    """A manager built on one rank only fails within collective_timeout_s, saying every rank must build it."""
    reports = dist_harness.run(_only_rank_0_constructs, tmp_path, nprocs=2, deadline_s=120)
    error = reports[0]["error"]
    assert error is not None and error["type"] == "DistributedError"
    assert "every rank constructs the CheckpointManager" in error["message"] and "distributed='off'" in error["message"]
    assert SHORT_TIMEOUT_S <= reports[0]["took_s"] < SHORT_TIMEOUT_S + PROMPT_S
    assert not (tmp_path / "run" / "checkpoints").exists()


def _raises(ctx: Rank) -> None:
    raise ValueError(f"rank {ctx.rank} fails on purpose")


def _aborts(ctx: Rank) -> None:
    os.abort()  # what a gloo collective mismatch does, from a C++ thread


def test_the_harness_fails_on_a_rank_that_raises_or_dies_of_a_signal(tmp_path: Path) -> None:
    """A rank's exception (with its traceback) or SIGABRT fails the run; one rank each, both runs at once (2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    def failure(fn: Callable[[Rank], None], name: str) -> str:
        with pytest.raises(dist_harness.RankFailedError) as info:
            dist_harness.run(fn, tmp_path / name, nprocs=1, deadline_s=120)
        return str(info.value)

    with ThreadPoolExecutor(2) as pool:
        raised, aborted = pool.map(failure, [_raises, _aborts], ["raises", "aborts"])
    assert "rank 0 exited with code 1" in raised and "ValueError: rank 0 fails on purpose" in raised
    assert "rank 0 died of SIGABRT" in aborted


def test_world_size_without_a_process_group_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WORLD_SIZE=2 (torchrun) and no process group yet: InvalidArgumentError naming init_process_group; "off" works."""
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_dir = tmp_path / "run"
    with pytest.raises(InvalidArgumentError, match="init_process_group"):
        CheckpointManager(run_dir, "early")
    assert not run_dir.exists()
    with CheckpointManager(run_dir, "early", distributed="off") as mgr:
        assert (mgr.rank, mgr.world_size, mgr.is_writer) == (0, 1, True)
        mgr.save_agent(Agent(), 1)
    assert "world_size" not in _sidecar(run_dir / "checkpoints/model_0001.pt")
    monkeypatch.setenv("WORLD_SIZE", "1")
    CheckpointManager(tmp_path / "one", "one").close()


@pytest.mark.parametrize(
    "kwargs",
    [{"distributed": "on"}, {"resume": "rank0"}, {"collective_timeout_s": 0}, {"collective_timeout_s": True}],
    ids=["distributed", "resume", "timeout-0", "timeout-bool"],
)
def test_bad_distributed_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    """A bad distributed=, resume= or collective_timeout_s= is an InvalidArgumentError naming it; nothing on disk."""
    with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
        CheckpointManager(tmp_path / "run", "bad", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_four_ranks(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The basic checks on 4 ranks (only with --ranks4 or BGSAVE_RANKS4=1: 4 processes on 2 cores are slow)."""
    if not (request.config.getoption("--ranks4") or os.environ.get("BGSAVE_RANKS4") == "1"):
        pytest.skip("4-rank run: pass --ranks4 or set BGSAVE_RANKS4=1")
    run = _spawn(Setup(tmp_path), 4, BASIC, victim=None)
    _assert_separate_dirs(run)
    _assert_shared_dir(run)
    _assert_same_start_everywhere(run)
    _assert_node_local_dirs(run)
    _assert_raising_with_block(run)


def test_a_sigterm_on_one_rank_makes_the_next_save_a_boundary_everywhere(two: Run) -> None:
    """A SIGTERM on one rank: save_at_interval saves whatever the interval and mgr.preempted is true on every rank."""
    got = two.of(_preempted_everywhere)
    path = _same([g["path"] for g in got])
    assert path == str(two.setup.base / "preempted" / "checkpoints" / "model_0003.pt")
    assert [(g["before"], g["preempted"]) for g in got] == [(False, True)] * two.world
    # close hands the signal on where it came, and only there
    assert [g["handed_on"] for g in got] == [[]] * (two.world - 1) + [[signal.SIGTERM]]
    assert _load(path).__class__ is Agent


def test_a_mirror_is_uploaded_by_rank_0_and_new_nodes_resume_from_it(two: Run) -> None:
    """Rank 0 alone writes and uploads; ranks on "new nodes" (empty run dirs) all resume epoch 2 from the mirror."""
    got = two.of(_mirrored)
    assert got[0]["status"] == [[0, "mirrored"], [1, "mirrored"], [2, "mirrored"]]
    assert "checkpoints/model_0002.pt" in got[0]["local"]
    assert all(g["local"] == [] for g in got[1:])
    resumed = _same([g["resumed"] for g in got])
    assert (resumed["resumed"], resumed["epoch"]) == (True, 2)
    assert (resumed["agent"], resumed["optimizer"]) == (got[0]["saved"]["agent"], got[0]["saved"]["optimizer"])
