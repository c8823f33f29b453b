"""Worker health (issue 6, section 5): a hung or dead background worker gives the caller an error, never a hang.

The faults wrap the real thing: the agent carries an object whose ``__reduce__`` returns at once on the
main thread, where bgsave's snapshot pickles the agent, but on any other thread (the writer, inside
``torch.save``) blocks on an event or raises a ``BaseException`` subclass, which bgsave's worker does not
catch and which kills it. Every wait in this file has a deadline and the module has a pytest timeout.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from bgsave import (
    BgsaveError,
    CheckpointManager,
    ManagerClosedError,
    WorkerError,
    WorkerTimeoutError,
    load_checkpoint,
)

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0


class Die(BaseException):
    """Not an Exception: nothing in bgsave's worker catches it, so it takes the worker down."""


_FAULTS: dict[str, Fault] = {}


def _revive(fault_id: str) -> Fault:
    """Unpickle a Fault: the same one while its test runs, else an inert one."""
    return _FAULTS.get(fault_id) or Fault("inert")


class Fault:
    """Pickles normally on the main thread; on another thread (the writer) hangs until released, or dies.

    Args:
        action: "hang" (block until :meth:`release`, at most 30 s), "die" (raise :class:`Die` once
            released) or "inert".
    """

    def __init__(self, action: str) -> None:
        self.id = uuid.uuid4().hex
        self.action = action
        self.entered = threading.Event()
        self._released = threading.Event()
        _FAULTS[self.id] = self

    def __reduce__(self) -> tuple[Callable[[str], Fault], tuple[str]]:
        if self.action != "inert" and threading.current_thread() is not threading.main_thread():
            self.entered.set()
            self._released.wait(30)
            if self.action == "die":
                raise Die(f"fault {self.id} killed the writer")
        return (_revive, (self.id,))

    def release(self) -> None:
        """Let a held write go on (or die)."""
        self._released.set()

    def wait_entered(self) -> None:
        """Wait until the writer reached the fault; fail the test if it never does."""
        assert self.entered.wait(DEADLINE), "the background write never reached the fault"


@pytest.fixture
def faults() -> Iterator[list[Fault]]:
    """Faults made by a test; all released at its end, so no writer stays blocked."""
    made: list[Fault] = []
    yield made
    for fault in made:
        fault.release()
        _FAULTS.pop(fault.id, None)
    gc.collect()  # a dead worker's managers go now, so what they leak warns in this test, not a later one


def agent_with(fault: Fault | None = None, seed: int = 0) -> nn.Module:
    """A small torch model, optionally carrying a fault in its attributes."""
    torch.manual_seed(seed)
    agent = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    if fault is not None:
        agent.fault = fault  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    return agent


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition the library offers no event for, up to DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def worker_threads(run_name: str) -> list[threading.Thread]:
    """The manager's background event-loop thread (anyio's portal, named after the run)."""
    return [t for t in threading.enumerate() if t.name == f"bgsave-{run_name}"]


def kill_worker(mgr: CheckpointManager, faults: list[Fault], epoch: int = 1) -> None:
    """Make the background write of ``epoch`` raise Die, and wait until the worker thread has ended."""
    threads = worker_threads(mgr.run_name)
    assert threads, "no background worker thread found"
    fault = Fault("die")
    faults.append(fault)
    mgr.save_agent(agent_with(fault), epoch, {"score": 1.0})
    fault.wait_entered()
    fault.release()
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the worker thread survived a BaseException in its write"


@contextlib.contextmanager
def dies_once_called(fault: Fault) -> Iterator[None]:
    """Around a blocking call: another thread lets ``fault`` kill the writer once the call has begun.

    Two interleavings are possible, and a test using this must pass with either, so it never depends on the
    timing. Usually the caller is already blocked when the worker dies: it keeps the GIL from the moment it
    signals until it blocks, while the death still has to pass from the writer's thread to the event loop.
    Otherwise the death is found as the call begins. The error the caller gets is asserted the same way both
    times; the death before any call is covered by test_a_dead_worker_is_detected_at_the_next_call.
    """
    called = threading.Event()

    def release() -> None:
        if called.wait(DEADLINE):
            fault.release()

    releaser = threading.Thread(target=release, name="release-fault")
    releaser.start()
    try:
        called.set()
        yield
    finally:
        releaser.join(DEADLINE)
        assert not releaser.is_alive(), "the releasing thread never finished"


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups among them."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


@pytest.fixture
def run_dir(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(os.fspath(tmp_path), "run")


# ---- a hung write ----------------------------------------------------------------------------


def test_wait_with_timeout_raises_and_the_write_completes_afterwards(run_dir: str, faults: list[Fault]) -> None:
    """wait(timeout) on a hung write raises WorkerTimeoutError (a TimeoutError) in time; released, the write commits."""
    fault = Fault("hang")
    faults.append(fault)
    agent = agent_with(fault)
    mgr = CheckpointManager(run_dir, "hung")
    try:
        path = mgr.save_agent(agent, 1, {"score": 0.5})
        fault.wait_entered()
        started = time.monotonic()
        with pytest.raises(WorkerTimeoutError) as info:
            mgr.wait(timeout=0.3)
        assert time.monotonic() - started < 0.3 + 3.0
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, WorkerError)
        assert "hung" in str(info.value)
        assert "0.3" in str(info.value)
        assert not os.path.exists(path), "the hung write is visible before it finished"
        with pytest.raises(TimeoutError):  # again: still hung, still a clean timeout
            mgr.wait(timeout=0.05)

        fault.release()
        mgr.wait(timeout=DEADLINE)  # the same write finishes; no error is left over from the timeouts
        assert mgr.find_latest_checkpoint() == path
        assert same_weights(load_checkpoint(path), agent)
        assert [(r.epoch, r.ok) for r in mgr.records] == [(1, True)]
    finally:
        fault.release()
        mgr.close(timeout=DEADLINE)


def test_close_with_timeout_raises_instead_of_hanging(run_dir: str, faults: list[Fault]) -> None:
    """close(timeout) on a hung write raises WorkerTimeoutError in time; the manager is closed; the write lands."""
    fault = Fault("hang")
    faults.append(fault)
    agent = agent_with(fault)
    mgr = CheckpointManager(run_dir, "hung-close")
    path = mgr.save_agent(agent, 1, {"score": 0.5})
    fault.wait_entered()
    started = time.monotonic()
    with pytest.raises(WorkerTimeoutError) as info:
        mgr.close(timeout=0.3)
    assert time.monotonic() - started < 0.3 + 3.0
    assert isinstance(info.value, TimeoutError)
    assert "hung-close" in str(info.value)
    mgr.close(timeout=0.1)  # idempotent, returns at once
    with pytest.raises(ManagerClosedError):
        mgr.save_agent(agent_with(), 2)

    fault.release()  # the abandoned write was in progress: it completes and commits on its own
    wait_until(lambda: os.path.exists(path[: -len(".pt")] + ".yaml"), "the abandoned write to commit")
    assert same_weights(load_checkpoint(path), agent)
    wait_until(lambda: not worker_threads("hung-close"), "the abandoned worker thread to end")


def test_wait_with_timeout_while_writes_queue_up_behind_a_hung_one(run_dir: str, faults: list[Fault]) -> None:
    """Saves queued behind a hung write: wait(timeout) raises; once released all of them commit in order."""
    fault = Fault("hang")
    faults.append(fault)
    with CheckpointManager(run_dir, "queue", max_pending=2) as mgr:
        mgr.save_agent(agent_with(fault), 1)
        fault.wait_entered()
        mgr.save_agent(agent_with(seed=2), 2)
        mgr.save_agent(agent_with(seed=3), 3)
        with pytest.raises(WorkerTimeoutError):
            mgr.wait(timeout=0.2)
        fault.release()
        mgr.wait(timeout=DEADLINE)
        assert [info.epoch for info in mgr.checkpoints()] == [1, 2, 3]
    assert same_weights(load_checkpoint(f"{run_dir}/checkpoints/model_0003.pt"), agent_with(seed=3))


# ---- a dead worker ----------------------------------------------------------------------------


def _calls() -> dict[str, Callable[[CheckpointManager], Any]]:
    optimizer = torch.optim.SGD(agent_with().parameters(), lr=0.1)
    return {
        "save_agent": lambda m: m.save_agent(agent_with(), 2),
        "save_trainer_state": lambda m: m.save_trainer_state(optimizer, 2, 0),
        "save_at_interval": lambda m: m.save_at_interval(agent_with(), 2, interval=1),
        "update_metadata": lambda m: m.update_metadata(0, score=1.0),
        "wait": lambda m: m.wait(),
        "wait-timeout": lambda m: m.wait(timeout=5.0),
        "checkpoints": lambda m: m.checkpoints(),
        "find_latest_checkpoint": lambda m: m.find_latest_checkpoint(),
        "load_agent": lambda m: m.load_agent(),
        "close": lambda m: m.close(),
    }


@pytest.mark.parametrize("call", list(_calls()))
def test_a_dead_worker_is_detected_at_the_next_call(run_dir: str, faults: list[Fault], call: str) -> None:
    """After the worker died, the next call raises WorkerError naming the run, the BaseException chained; no hang."""
    mgr = CheckpointManager(run_dir, "dead")
    mgr.save_agent(agent_with(), 0)
    mgr.wait()
    kill_worker(mgr, faults)
    with pytest.raises(WorkerError) as info:
        _calls()[call](mgr)
    error = info.value
    assert not isinstance(error, WorkerTimeoutError)
    assert isinstance(error, (BgsaveError, RuntimeError))
    assert "dead" in str(error)
    assert error.__cause__ is not None
    assert any(isinstance(e, Die) for e in causes(error)), repr(error.__cause__)
    if call != "close":  # the dead worker stays dead: later calls say so too, and close() never hangs
        with pytest.raises(WorkerError):
            mgr.wait(timeout=1.0)
        with pytest.raises(WorkerError):
            mgr.close(timeout=1.0)
    mgr.close()  # now closed: idempotent
    # The save that killed the worker left nothing visible; the earlier checkpoint still loads.
    names = os.listdir(f"{run_dir}/checkpoints")
    assert not [n for n in names if n.endswith(".tmp")], names
    assert "model_0001.yaml" not in names
    reader = CheckpointManager(run_dir, "dead")
    try:
        assert [info.epoch for info in reader.checkpoints()] == [0]
        assert isinstance(reader.load_agent(), nn.Sequential)
    finally:
        reader.close()


def test_a_dead_worker_is_reported_to_a_caller_already_waiting(run_dir: str, faults: list[Fault]) -> None:
    """A caller in wait() when the worker dies gets WorkerError, the death chained, not an endless wait."""
    fault = Fault("die")
    faults.append(fault)
    mgr = CheckpointManager(run_dir, "dies-while-waited")
    try:
        mgr.save_agent(agent_with(fault), 1)
        fault.wait_entered()
        with pytest.raises(WorkerError) as info, dies_once_called(fault):
            mgr.wait()
        assert any(isinstance(e, Die) for e in causes(info.value))
    finally:
        fault.release()
        with pytest.raises(WorkerError):
            mgr.close(timeout=DEADLINE)


def test_a_dead_worker_is_reported_to_a_caller_waiting_for_a_slot(run_dir: str, faults: list[Fault]) -> None:
    """A save waiting for a slot (max_pending=0) when the worker dies gets WorkerError, not an endless wait."""
    fault = Fault("die")
    faults.append(fault)
    mgr = CheckpointManager(run_dir, "dies-while-full", max_pending=0)
    try:
        mgr.save_agent(agent_with(fault), 1)
        fault.wait_entered()
        with pytest.raises(WorkerError) as info, dies_once_called(fault):
            mgr.save_agent(agent_with(), 2)
        assert any(isinstance(e, Die) for e in causes(info.value))
    finally:
        fault.release()
        with pytest.raises(WorkerError):
            mgr.close(timeout=DEADLINE)


def test_a_call_racing_the_workers_death_still_raises_worker_error(
    tmp_path: os.PathLike[str], faults: list[Fault]
) -> None:
    """Called at the very moment the worker dies, wait() raises WorkerError with the death as its cause, 30 times."""
    leaked: list[str] = []
    for i in range(30):
        fault = Fault("die")
        faults.append(fault)
        mgr = CheckpointManager(os.path.join(os.fspath(tmp_path), f"run{i}"), f"race{i}")
        try:
            mgr.save_agent(agent_with(fault), 1)
            fault.wait_entered()
            fault.release()
            try:
                mgr.wait(timeout=DEADLINE)
            except WorkerError as exc:
                if not any(isinstance(e, Die) for e in causes(exc)):
                    leaked.append(f"WorkerError without its cause: {exc!r}")
            except Exception as exc:
                leaked.append(f"{type(exc).__module__}.{type(exc).__name__}")
            else:
                leaked.append("wait() returned as if the write had committed")
        finally:
            fault.release()
            with contextlib.suppress(WorkerError):
                mgr.close(timeout=DEADLINE)
        del mgr
    assert not leaked, leaked


# ---- what a dead or abandoned worker leaves: the writer lock ----------------------------------------


def test_a_new_manager_can_write_after_the_old_ones_worker_died(run_dir: str, faults: list[Fault]) -> None:
    """WorkerError says 'open a new manager': after closing the dead one, a new manager in the same process saves."""
    mgr = CheckpointManager(run_dir, "reopen")
    mgr.save_agent(agent_with(), 0)
    mgr.wait()
    kill_worker(mgr, faults)
    with pytest.raises(WorkerError):
        mgr.close()
    with CheckpointManager(run_dir, "reopen") as again:
        again.save_agent(agent_with(seed=5), 1)
    assert same_weights(load_checkpoint(f"{run_dir}/checkpoints/model_0001.pt"), agent_with(seed=5))


def test_a_new_manager_can_write_once_an_abandoned_write_finished(run_dir: str, faults: list[Fault]) -> None:
    """After close(timeout) expired and the abandoned write finished, a new manager in the same process saves."""
    fault = Fault("hang")
    faults.append(fault)
    mgr = CheckpointManager(run_dir, "abandon")
    path = mgr.save_agent(agent_with(fault), 1)
    fault.wait_entered()
    with pytest.raises(WorkerTimeoutError):
        mgr.close(timeout=0.2)
    fault.release()
    wait_until(lambda: os.path.exists(path[: -len(".pt")] + ".yaml"), "the abandoned write to commit")
    wait_until(lambda: not worker_threads("abandon"), "the abandoned worker thread to end")
    with CheckpointManager(run_dir, "abandon") as again:
        again.save_agent(agent_with(seed=6), 2)


def test_a_dead_workers_stream_is_closed(run_dir: str, faults: list[Fault]) -> None:
    """Closing a manager whose worker died releases everything: no ResourceWarning when it is collected."""
    mgr = CheckpointManager(run_dir, "leak")
    kill_worker(mgr, faults)
    with pytest.raises(WorkerError):
        mgr.close()
    del mgr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
