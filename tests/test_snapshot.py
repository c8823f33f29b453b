"""Snapshot semantics: a file holds the state at the moment of the call, whatever the caller does next.

The race is made real by wrapping the real writer: a :class:`_models.Gate` in the agent (or in the
optimizer's param group) holds ``torch.save`` mid-pickle, before any tensor bytes are written, while
the test mutates the live objects. A library that wrote the live agent instead of a copy would put
the mutated values in the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from _models import Agent, Gate, GatedAgent, assert_state_equal, make_optimizer, state_of, train
from bgsave import CheckpointError, CheckpointManager, load_checkpoint

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def manager(run_dir: str) -> Iterator[CheckpointManager]:
    """A background manager on the run directory, closed after the test."""
    mgr = CheckpointManager(run_dir, "snap", max_pending=2)
    yield mgr
    with contextlib.suppress(CheckpointError):
        mgr.close()


def mutate_everything(agent: Agent) -> None:
    """Change every kind of state an Agent holds, in place and by reassignment."""
    with torch.no_grad():
        agent.encoder.weight.fill_(7.0)  # a parameter, in place (tied: the decoder's too)
        agent.encoder.bias.add_(1.0)
        agent.running.mul_(-1.0)  # a buffer
        agent.table.zero_()  # a plain tensor attribute, and the view on it
        agent.history[0].fill_(3.0)  # a tensor in a list, in place
    agent.history.append(torch.ones(4))  # the list itself
    agent.history[1] = torch.full((2,), 9.0)  # an element reassigned
    agent.name = "changed"  # Python attributes, reassigned and mutated
    agent.epsilon = 0.01
    agent.config["gamma"] = 0.5
    agent.config["layers"].append(99)
    agent.encoder = nn.Linear(agent.encoder.in_features, agent.encoder.out_features)  # a submodule replaced


def test_file_holds_the_agent_as_it_was_at_the_call(manager: CheckpointManager) -> None:
    """Mutating the agent right after save_agent returns (while the write is in progress) does not reach the file."""
    gate = Gate()
    agent = GatedAgent(gate, seed=1)
    expected = state_of(agent)
    try:
        path = manager.save_agent(agent, 1, {"score": 0.5})
        assert gate.wait_entered(), "the write never started"
        mutate_everything(agent)
        gate.let_through()
        manager.wait()
    finally:
        gate.open()
    assert_state_equal(expected, load_checkpoint(path))


def test_optimizer_state_file_holds_the_state_at_the_call(manager: CheckpointManager) -> None:
    """Stepping the optimizer right after save_trainer_state (write in progress) does not reach the file."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    train(agent, optimizer, 3)
    gate = Gate()
    optimizer.param_groups[0]["gate"] = gate  # travels in state_dict()["param_groups"]
    expected = {
        key: {name: value.clone() for name, value in entry.items()}
        for key, entry in optimizer.state_dict()["state"].items()
    }
    try:
        manager.save_trainer_state(optimizer, 3, 300)
        assert gate.wait_entered(), "the write never started"
        train(agent, optimizer, 2, seed=1)  # exp_avg, exp_avg_sq and step change in place
        optimizer.param_groups[0]["lr"] = 123.0
        gate.let_through()
        manager.wait()
    finally:
        gate.open()
    state = load_checkpoint(f"{manager.checkpoint_dir}/trainer_0003.pt")  # no agent of epoch 3: not resumable
    saved = state["optimizer_state"]
    assert (state["epoch"], state["agent_step"]) == (3, 300)
    assert saved["param_groups"][0]["lr"] == 0.01
    assert saved["state"].keys() == expected.keys()
    for key, entry in expected.items():
        for name, value in entry.items():
            assert torch.equal(saved["state"][key][name], value), (key, name)
    # The live optimizer really moved on, so the comparison above means something.
    live = optimizer.state_dict()["state"]
    assert not all(torch.equal(live[k]["exp_avg"], expected[k]["exp_avg"]) for k in expected)


def test_queued_snapshots_each_keep_their_own_state(manager: CheckpointManager) -> None:
    """Several saves queued behind a held write (buffers reused between saves) each hold the state of their call."""
    gate = Gate()
    agent = GatedAgent(gate, seed=3)
    expected: dict[int, dict[str, Any]] = {}
    paths: dict[int, str] = {}
    try:
        for epoch in range(1, 6):
            with torch.no_grad():
                agent.encoder.weight.fill_(float(epoch))
                agent.table.fill_(-float(epoch))
                agent.history[0].fill_(epoch * 10.0)
            agent.epsilon = epoch / 100
            expected[epoch] = state_of(agent)
            paths[epoch] = manager.save_agent(agent, epoch)
            if epoch == 1:
                assert gate.wait_entered()
            elif epoch >= 3:
                gate.let_through()  # keep the queue moving so buffers come back and are reused
        gate.open()
        manager.wait()
    finally:
        gate.open()
    for epoch, path in paths.items():
        assert_state_equal(expected[epoch], load_checkpoint(path))


def test_saving_never_changes_the_callers_agent(manager: CheckpointManager) -> None:
    """Saving leaves the caller's agent, its tensors' identities, devices, grads and optimizer untouched."""
    agent = Agent(seed=2)
    optimizer = make_optimizer(agent)
    train(agent, optimizer, 2)
    loss = agent(torch.ones(2, agent.encoder.in_features)).sum()
    loss.backward()  # grads present at save time
    before = state_of(agent)
    grads = {name: p.grad.clone() for name, p in agent.named_parameters() if p.grad is not None}
    ids = {name: id(p) for name, p in agent.named_parameters(remove_duplicate=False)}
    devices = {t.device for t in agent.state_dict().values()}
    opt_before = {k: {n: v.clone() for n, v in e.items()} for k, e in optimizer.state_dict()["state"].items()}
    agent.train()

    manager.save_agent(agent, 1)
    manager.save_trainer_state(optimizer, 1, 10)
    manager.wait()

    assert_state_equal(before, agent)
    assert {name: id(p) for name, p in agent.named_parameters(remove_duplicate=False)} == ids
    assert {t.device for t in agent.state_dict().values()} == devices
    assert all(p.requires_grad for p in agent.parameters())
    assert agent.training
    for name, p in agent.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, grads[name]), name
    assert agent.decoder.weight is agent.encoder.weight
    assert agent.window.untyped_storage().data_ptr() == agent.table.untyped_storage().data_ptr()
    assert optimizer.param_groups[0]["params"][0] is agent.encoder.weight
    for key, entry in opt_before.items():
        for name, value in entry.items():
            assert torch.equal(optimizer.state_dict()["state"][key][name], value)


def test_tied_weights_and_views_survive_the_round_trip(manager: CheckpointManager) -> None:
    """After load, tied parameters are one object and a view still shares its base's storage."""
    agent = Agent(width=6)
    path = manager.save_agent(agent, 1)
    manager.wait()
    loaded = load_checkpoint(path)
    assert_state_equal(state_of(agent), loaded)

    assert loaded.decoder.weight is loaded.encoder.weight
    assert isinstance(loaded.encoder.weight, nn.Parameter)
    assert loaded.encoder.weight.requires_grad
    assert "running" in dict(loaded.named_buffers())
    assert loaded.window.untyped_storage().data_ptr() == loaded.table.untyped_storage().data_ptr()
    assert loaded.window.storage_offset() == agent.window.storage_offset()
    loaded.table[6] = 42.0  # the first element of the window
    assert loaded.window[0].item() == 42.0


def test_agent_with_a_non_leaf_tensor_attribute(manager: CheckpointManager) -> None:
    """An agent caching an autograd output (a non-leaf tensor with grad_fn) saves its values, as torch.save would."""
    agent = Agent()
    output = agent(torch.ones(2, agent.encoder.in_features))  # requires grad, has a grad_fn
    agent.last_output = output
    expected = output.detach().clone()
    path = manager.save_agent(agent, 1)
    with torch.no_grad():
        agent.encoder.weight.zero_()
    manager.wait()
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.last_output.detach(), expected)


def test_agent_holding_its_own_optimizer(manager: CheckpointManager) -> None:
    """An agent that keeps its optimizer as an attribute is saved consistently: the optimizer refers to its params."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    agent.optimizer = optimizer  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    train(agent, optimizer, 2)
    expected = state_of(agent)
    expected_avg = optimizer.state[agent.encoder.weight]["exp_avg"].clone()
    path = manager.save_agent(agent, 1)
    train(agent, optimizer, 1, seed=5)
    manager.wait()

    loaded = load_checkpoint(path)
    assert_state_equal(expected, loaded)
    assert loaded.optimizer.param_groups[0]["params"][0] is loaded.encoder.weight
    assert torch.equal(loaded.optimizer.state[loaded.encoder.weight]["exp_avg"], expected_avg)


def test_an_agent_that_changes_shape_between_saves(manager: CheckpointManager) -> None:
    """Snapshots of differently sized agents with the same manager (buffers reused or not) each load intact."""
    saved: dict[int, Agent] = {}
    paths: dict[int, str] = {}
    for epoch, width in enumerate([8, 16, 4, 16, 8]):
        saved[epoch] = Agent(width=width, seed=epoch)
        paths[epoch] = manager.save_agent(saved[epoch], epoch)
    manager.wait()
    for epoch, agent in saved.items():
        assert_state_equal(state_of(agent), load_checkpoint(paths[epoch]))


def test_snapshot_without_background_is_the_same(local_run_dir: str) -> None:
    """With background=False the file also holds the state at the call (written before save_agent returns)."""
    agent = Agent(seed=8)
    expected = state_of(agent)
    with CheckpointManager(local_run_dir, "sync", background=False) as mgr:
        path = mgr.save_agent(agent, 1)
        mutate_everything(agent)
    assert_state_equal(expected, load_checkpoint(path))
