"""The whole trainer state (optimizer, extra, RNG): committed with its epoch, taken at the call, restored at once."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

from _models import Agent, UnpicklableAgent, UnwritableAgent, make_optimizer, train
from bgsave import CheckpointManager, CheckpointWriteError, InvalidArgumentError, RunLockedError, load_checkpoint


class Normalizer:
    """An observation normalizer with state_dict()/load_state_dict(), as RL code keeps them."""

    def __init__(self) -> None:
        self.count, self.mean = 0, torch.zeros(3)

    def update(self, x: torch.Tensor) -> None:
        self.count += 1
        self.mean += (x - self.mean) / self.count

    def state_dict(self) -> dict[str, object]:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.count, self.mean = state["count"], state["mean"].clone()  # type: ignore[assignment, attr-defined]


def trainer(agent: Agent) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR, Normalizer]:
    optimizer = make_optimizer(agent)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5), Normalizer()


def step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR, norm: Normalizer) -> None:
    optimizer.step()
    scheduler.step()
    norm.update(torch.randn(3))


def draws() -> tuple[float, float, float]:
    """One draw from each stream a trainer uses."""
    return float(torch.rand(())), float(np.random.rand()), random.random()


def names(run_dir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_save_at_interval_commits_the_whole_trainer_state_and_restore_puts_it_back(local_run_dir: str) -> None:
    """Agent, optimizer, scheduler, normalizer, a counter and the RNG of one epoch; a new process restores them
    and continues the same random streams."""
    agent = Agent(seed=1)
    optimizer, scheduler, norm = trainer(agent)
    train(agent, optimizer, 2)
    for _ in range(3):
        step(optimizer, scheduler, norm)
    counters = {"env_steps": 4096}
    with CheckpointManager(local_run_dir, "ts") as mgr:
        extra = {"scheduler": scheduler, "obs_norm": norm, "counters": counters}
        mgr.save_at_interval(agent, 3, interval=1, optimizer=optimizer, extra=extra, rng=True)
        expected_draws = draws()  # what the run draws next, right after the save
        # Mutated after the call: none of it reaches the files.
        step(optimizer, scheduler, norm)
        counters["env_steps"] = -1
    assert names(local_run_dir) == ["model_0003.pt", "model_0003.yaml", "trainer_0003.pt"]

    fresh = Agent(seed=9)
    optimizer2, scheduler2, norm2 = trainer(fresh)
    torch.manual_seed(123)  # another process: other RNG states
    with CheckpointManager(local_run_dir, "ts") as mgr:
        start = mgr.start_run(Agent)
        optimizer2 = make_optimizer(start.agent)
        scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=2, gamma=0.5)
        start.restore(optimizer2, extra={"scheduler": scheduler2, "obs_norm": norm2})
    assert draws() == expected_draws
    assert start.extra["counters"] == {"env_steps": 4096}
    assert (scheduler2.last_epoch, scheduler2.get_last_lr()) == (3, [0.01 * 0.5])
    assert norm2.count == 3
    saved = start.trainer_state
    assert saved is not None
    assert set(saved) == {"optimizer_state", "epoch", "agent_step", "run", "extra", "rng"}
    assert saved["optimizer_state"]["state"][0]["step"] == 5  # Adam's state at the call (5 steps), not after
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], saved["optimizer_state"]["state"][0]["exp_avg"])


def test_a_new_run_with_rng_resumed_from_epoch_0_continues_the_same_stream(local_run_dir: str) -> None:
    """start_run(rng=True) saves the RNG right after make_agent: a resume from epoch 0 draws what the run drew."""
    torch.manual_seed(0)
    with CheckpointManager(local_run_dir, "ts0") as mgr:
        first = mgr.start_run(lambda: Agent(seed=0), rng=True)
        expected = draws()
    assert not first.resumed
    torch.manual_seed(99)
    with CheckpointManager(local_run_dir, "ts0") as mgr:
        start = mgr.start_run(lambda: Agent(seed=0), rng=True)
        optimizer = make_optimizer(start.agent)
        start.restore(optimizer)  # epoch 0 saved no optimizer state: the new optimizer is left as it is
    assert (start.epoch, start.resumed) == (0, True)
    assert draws() == expected
    assert optimizer.state_dict()["state"] == {}


def test_an_extra_value_that_cannot_be_saved_is_refused_at_the_call_naming_its_key(local_run_dir: str) -> None:
    """No state_dict() and not picklable: InvalidArgumentError naming extra['hook']; nothing queued or written."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        mgr.save_agent(agent, 1)
        mgr.wait()
        before = names(local_run_dir)
        with pytest.raises(InvalidArgumentError, match=r"extra\['hook'\]"):
            mgr.save_at_interval(agent, 2, interval=1, optimizer=optimizer, extra={"hook": lambda: None, "n": 1})
        with pytest.raises(InvalidArgumentError, match=r"extra\['hook'\]"):
            mgr.save_trainer_state(optimizer, 2, 0, extra={"hook": lambda: None})
        mgr.wait()
        assert names(local_run_dir) == before


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, a, o: m.save_trainer_state(o, 1, 0, extra=[1]), "extra must be a dict"),
        (lambda m, a, o: m.save_trainer_state(o, 1, 0, extra={1: 2}), "extra's keys"),
        (lambda m, a, o: m.save_trainer_state(o, 1, 0, rng="yes"), "rng must be True or False"),
        (lambda m, a, o: m.save_trainer_state(None, 1, 0), "optimizer must have a state_dict"),
        (lambda m, a, o: m.save_at_interval(a, 1, interval=1, extra={"n": 1}), "pass optimizer="),
        (lambda m, a, o: m.save_at_interval(a, 1, interval=1, rng=True), "pass optimizer="),
        (lambda m, a, o: m.start_run(Agent, rng=1), "rng must be True or False"),
    ],
)
def test_bad_trainer_state_arguments_are_refused_and_write_nothing(
    local_run_dir: str, call: object, match: str
) -> None:
    """Each bad argument names itself; the run directory stays as it was (nothing there at all)."""
    agent = Agent()
    with CheckpointManager(local_run_dir, "ts") as mgr, pytest.raises(InvalidArgumentError, match=match):
        call(mgr, agent, make_optimizer(agent))  # type: ignore[operator]
    assert not os.path.exists(os.path.join(local_run_dir, "checkpoints"))


def test_restore_refuses_what_was_not_saved_before_changing_anything(local_run_dir: str) -> None:
    """An extra key not saved, or an object without load_state_dict: InvalidArgumentError, optimizer untouched."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    train(agent, optimizer, 1)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        mgr.save_at_interval(agent, 1, interval=1, optimizer=optimizer, extra={"n": 5})
    with CheckpointManager(local_run_dir, "ts") as mgr:
        start = mgr.start_run(Agent)
    fresh = make_optimizer(start.agent)
    with pytest.raises(InvalidArgumentError, match=r"extra\['scheduler'\] was not saved"):
        start.restore(fresh, extra={"scheduler": torch.optim.lr_scheduler.StepLR(fresh, 1)})
    with pytest.raises(InvalidArgumentError, match=r"read the saved value from RunStart.extra\['n'\]"):
        start.restore(fresh, extra={"n": 0})
    assert fresh.state_dict()["state"] == {}  # nothing was restored
    start.restore(fresh)
    assert fresh.state_dict()["state"][0]["step"] == 1


def test_a_failed_trainer_state_write_leaves_nothing_of_the_epoch(local_run_dir: str) -> None:
    """The trainer state's write fails after the .pt was written: no sidecar, no .pt, no trainer file remain."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        mgr.save_at_interval(agent, 1, interval=1, optimizer=optimizer)
        mgr.wait()
        # Copied at the call; rebuilding it in the writer fails, after the agent's .pt is on disk.
        mgr.save_at_interval(agent, 2, interval=1, optimizer=optimizer, extra={"bad": UnwritableAgent().payload})
        with pytest.raises(CheckpointWriteError) as info:
            mgr.wait()
        assert info.value.epoch == 2
    assert names(local_run_dir) == ["model_0001.pt", "model_0001.yaml", "trainer_0001.pt"]


def test_a_trainer_state_of_another_run_is_passed_over(local_run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """trainer_0002.pt replaced by another run's: the resume takes epoch 1's consistent pair and says why at INFO."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "mine") as mgr:
        for epoch in (1, 2):
            mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer)
    path = os.path.join(local_run_dir, "checkpoints", "trainer_0002.pt")
    foreign = load_checkpoint(path)
    torch.save({**foreign, "run": "theirs"}, path)
    with caplog.at_level(logging.INFO, logger="bgsave"), CheckpointManager(local_run_dir, "mine") as mgr:
        start = mgr.start_run(Agent)
        loaded = mgr.load_trainer_state()  # the same choice as start_run's
    assert loaded is not None and loaded["epoch"] == 1
    assert start.epoch == 1
    assert start.trainer_state is not None and start.trainer_state["epoch"] == 1
    assert any("passing over epoch 2" in r.getMessage() and "'theirs'" in r.getMessage() for r in caplog.records)


def test_retention_keeps_the_checkpoint_a_resume_would_pick(local_run_dir: str) -> None:
    """keep_last=2 and trainer states every 3rd epoch: the newest epoch with one survives every prune."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "ts", keep_last=2) as mgr:
        for epoch in range(1, 9):
            mgr.save_agent(agent, epoch)
            if epoch % 3 == 0:
                mgr.save_trainer_state(optimizer, epoch, epoch)
    assert names(local_run_dir) == [
        "model_0006.pt",
        "model_0006.yaml",
        "model_0007.pt",
        "model_0007.yaml",
        "model_0008.pt",
        "model_0008.yaml",
        "trainer_0006.pt",
    ]
    with CheckpointManager(local_run_dir, "ts") as mgr:
        assert mgr.start_run(Agent).epoch == 6


def test_trainer_state_first_then_agent_commits_both_at_the_agents_sidecar(local_run_dir: str) -> None:
    """The other order: the trainer file is durable before the agent's sidecar, so the epoch commits whole."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        mgr.save_trainer_state(optimizer, 4, 40)
        mgr.save_agent(agent, 4, {"agent_step": 40})
    with CheckpointManager(local_run_dir, "ts") as mgr:
        start = mgr.start_run(Agent)
    assert start.trainer_state is not None and (start.epoch, start.trainer_state["epoch"]) == (4, 4)


def test_a_resave_without_a_trainer_state_removes_the_old_one(local_run_dir: str) -> None:
    """Epoch 2 saved again, agent only: the trainer state of its first save is not paired with the new agent."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        mgr.save_at_interval(agent, 1, interval=1, optimizer=optimizer)
        mgr.save_at_interval(agent, 2, interval=1, optimizer=optimizer)
        mgr.wait()
        mgr.save_agent(Agent(seed=5), 2)
    assert "trainer_0002.pt" not in names(local_run_dir)
    with CheckpointManager(local_run_dir, "ts") as mgr:
        assert mgr.start_run(Agent).epoch == 1


def test_start_run_is_refused_on_a_run_another_writer_holds(local_run_dir: str) -> None:
    """A duplicate launch: start_run raises RunLockedError before make_agent is called or anything is loaded."""
    made: list[Agent] = []

    def make() -> Agent:
        made.append(Agent())
        return made[-1]

    with CheckpointManager(local_run_dir, "dup") as first:
        first.start_run(Agent)
        second = CheckpointManager(local_run_dir, "dup")
        with pytest.raises(RunLockedError):
            second.start_run(make)
        second.close()
    assert made == []


def test_each_backend_resumes_the_newest_epoch_with_its_trainer_state(any_run_dir: str) -> None:
    """Local, memory:// and s3:// alike: epochs 1-2 committed whole, epoch 3's agent alone: the resume is epoch 2."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(any_run_dir, "tiers") as mgr:
        for epoch in (1, 2):
            train(agent, optimizer, 1)
            mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer, rng=True)
        mgr.save_agent(agent, 3)  # as if killed before epoch 3's trainer state
        infos = mgr.checkpoints()
    assert [(i.epoch, i.has_trainer_state) for i in infos] == [(1, True), (2, True), (3, False)]
    with CheckpointManager(any_run_dir, "tiers") as mgr:
        start = mgr.start_run(Agent)
    assert start.trainer_state is not None
    assert (start.epoch, start.trainer_state["epoch"], start.trainer_state["optimizer_state"]["state"][0]["step"]) == (
        2,
        2,
        2,
    )


def test_the_first_write_removes_what_a_killed_save_or_prune_left_for_good(local_run_dir: str) -> None:
    """A .pt and a trainer state without their sidecar below the newest committed epoch go; a newer one stays."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "debris") as mgr:
        for epoch in (1, 2, 3):
            mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer)
    checkpoints = os.path.join(local_run_dir, "checkpoints")
    os.remove(os.path.join(checkpoints, "model_0001.yaml"))  # a prune killed after the sidecar: .pt and trainer left
    os.remove(os.path.join(checkpoints, "model_0003.yaml"))  # the newest: as if its save had been killed
    for name in ("notes.txt", "model_0001.pt.bak"):
        with open(os.path.join(checkpoints, name), "w") as f:
            f.write("the user's")
    with CheckpointManager(local_run_dir, "debris") as mgr:
        mgr.save_agent(agent, 4)
    assert names(local_run_dir) == [
        "model_0001.pt.bak",
        "model_0002.pt",
        "model_0002.yaml",
        "model_0003.pt",  # newer than the newest committed epoch when the writer came: a save in flight
        "model_0004.pt",
        "model_0004.yaml",
        "notes.txt",
        "trainer_0002.pt",
        "trainer_0003.pt",
    ]


def deletes(mgr: CheckpointManager) -> list[str]:
    """The checkpoint files the manager deletes from now on (its real storage's ``delete``, wrapped)."""
    storage = mgr._catalog.storage
    real, deleted = storage.delete, []

    def delete(path: str) -> None:
        name = os.path.basename(path)
        if name.startswith(("model_", "trainer_")):  # not the writer lock's own temp file
            deleted.append(name)
        real(path)

    storage.delete = delete  # type: ignore[method-assign]
    return deleted


def test_a_new_epoch_deletes_nothing_and_a_resave_uncommits_the_old_sidecar_and_trainer_state(
    local_run_dir: str,
) -> None:
    """No DELETE for an epoch that has no files; a re-save of one this manager or an earlier one wrote, or one
    with a killed save's trainer state, deletes the old sidecar and trainer state before the new .pt commits."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "resave") as mgr:
        deleted = deletes(mgr)
        for epoch in (1, 2):
            mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer)
        mgr.wait()
        assert deleted == []
        mgr.save_agent(Agent(seed=1), 1)  # agent only: the old trainer state must not pair with it
        mgr.wait()
        assert deleted == ["model_0001.yaml", "trainer_0001.pt"]
    checkpoints = os.path.join(local_run_dir, "checkpoints")
    os.remove(os.path.join(checkpoints, "model_0002.yaml"))  # epoch 2's save killed before its sidecar...
    os.remove(os.path.join(checkpoints, "model_0002.pt"))  # ...and its .pt: only its trainer state is left
    with CheckpointManager(local_run_dir, "resave") as mgr:
        deleted = deletes(mgr)
        mgr.save_agent(Agent(seed=2), 2)  # the killed save's trainer state was listed with the lock
        mgr.save_agent(Agent(seed=3), 3)
        mgr.save_agent(Agent(seed=4), 1)  # committed by the earlier manager
        mgr.wait()
        assert deleted == ["model_0002.yaml", "trainer_0002.pt", "model_0001.yaml", "trainer_0001.pt"]
        start = mgr.start_run(Agent)
    assert names(local_run_dir) == [f"model_000{e}.{suffix}" for e in (1, 2, 3) for suffix in ("pt", "yaml")]
    assert start.epoch == 3 and start.trainer_state is None


def test_a_refused_agent_save_does_not_unpair_a_trainer_state_saved_before(local_run_dir: str) -> None:
    """Trainer state first, an agent refused at the call, then the agent again: the trainer file stays paired."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "pair") as mgr:
        mgr.save_trainer_state(optimizer, 1, 10)
        with pytest.raises(CheckpointWriteError, match="cannot be pickled"):
            mgr.save_agent(UnpicklableAgent(), 1)
        mgr.save_agent(agent, 1, {"agent_step": 10})
    assert names(local_run_dir) == ["model_0001.pt", "model_0001.yaml", "trainer_0001.pt"]


@pytest.mark.parametrize(("saved_epoch", "used"), [(2, True), (1, False)])
def test_an_older_bgsaves_trainer_state_pt_is_used_only_for_its_own_epoch(
    local_run_dir: str, caplog: pytest.LogCaptureFixture, saved_epoch: int, used: bool
) -> None:
    """A run directory of an older bgsave (one trainer_state.pt): resumed with it when its epoch is the one resumed."""
    agent = Agent()
    with CheckpointManager(local_run_dir, "old") as mgr:
        for epoch in (1, 2):
            mgr.save_agent(agent, epoch)
    state = {"optimizer_state": make_optimizer(agent).state_dict(), "epoch": saved_epoch, "agent_step": 20}
    torch.save(state, os.path.join(local_run_dir, "checkpoints", "trainer_state.pt"))
    with caplog.at_level(logging.WARNING, logger="bgsave"), CheckpointManager(local_run_dir, "old") as mgr:
        start = mgr.start_run(Agent)
    assert start.epoch == 2
    assert (start.trainer_state is not None) is used
    assert any("trainer_state.pt is from epoch 1, not epoch 2" in r.getMessage() for r in caplog.records) is not used
