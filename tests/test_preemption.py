"""SIGTERM (preemption): a flag the loop reads at its boundary; the save there is exact; close hands the signal on.

Each test runs a real training loop in a child process and sends it a real SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from bgsave import CheckpointManager, load_checkpoint

pytestmark = pytest.mark.timeout(180)

# Each epoch sets every weight (and, through one step of SGD with momentum, the optimizer's buffers) to
# values of the epoch alone, so a checkpoint says which boundary it was taken at.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, warnings, torch
    from bgsave import CheckpointManager

    run_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "app-handler":
        def app_handler(signum, frame):
            names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
            with open(os.path.join(run_dir, "app_handler.json"), "w") as f:
                json.dump(names, f)
            sys.exit(3)
        signal.signal(signal.SIGTERM, app_handler)

    agent = torch.nn.Linear(256, 256)
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0, momentum=0.9)
    mgr = CheckpointManager(run_dir, "pre", max_pending=0)
    if mode == "final-save":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.handle_sigterm(grace_s=60, final_save=lambda: mgr.save_agent(agent, 99999, {"final": True}))
        print("deprecated" if caught and caught[0].category is DeprecationWarning else "no warning", flush=True)
    else:
        mgr.handle_sigterm(grace_s=1 if mode == "never-closes" else 60)
    epoch = 0
    while True:
        epoch += 1
        with torch.no_grad():
            agent.weight.fill_(float(epoch))
        agent.weight.grad = torch.full_like(agent.weight, float(epoch))
        optimizer.step()
        if mode == "final-save":
            mgr.save_agent(agent, epoch, {"agent_step": epoch})  # the old pattern: saves outside the interval
        else:
            mgr.save_at_interval(agent, epoch, interval=1000, optimizer=optimizer, metadata={"agent_step": epoch})
        print(epoch, flush=True)
        if mgr.preempted and mode != "never-closes":
            break
    mgr.close()
    print("after close", flush=True)
    """
)


def _run_until_sigterm(run_dir: str, mode: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Start the child, SIGTERM it once it has printed three lines, return it finished and its stdout lines."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, run_dir, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(3)]  # a few epochs are under way
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), lines + out.split()


def _names(run_dir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_the_loop_saves_at_its_boundary_then_the_process_dies_by_sigterm(local_run_dir: str) -> None:
    """The save at the boundary holds the last finished epoch and its trainer state; exit status: killed by SIGTERM."""
    done, lines = _run_until_sigterm(local_run_dir, "default")
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "after close" not in lines  # close() handed the signal on: the default action ended the process
    last = int(lines[-1])
    with CheckpointManager(local_run_dir, "pre") as mgr:
        infos = mgr.checkpoints()
        # interval=1000: the only checkpoint is the one the SIGTERM asked for, at the loop's boundary.
        assert [info.epoch for info in infos] == [last]
        assert infos[0].has_trainer_state
        agent = load_checkpoint(infos[0].path)
        assert torch.equal(agent.weight, torch.full((256, 256), float(last)))
        state = mgr.load_trainer_state()
    assert state is not None and (state["epoch"], state["agent_step"]) == (last, last)
    momentum = state["optimizer_state"]["state"][0]["momentum_buffer"]
    assert torch.allclose(momentum[0, :3], torch.full((3,), sum(0.9 ** (last - e) * e for e in range(1, last + 1))))
    assert not [n for n in _names(local_run_dir) if n.endswith(".bgsave-tmp")]
    assert not os.path.exists(os.path.join(local_run_dir, ".bgsave-writer.lock"))


def test_close_hands_the_signal_to_the_applications_handler(local_run_dir: str) -> None:
    """An application's own SIGTERM handler runs after the flush, at close: it sees the boundary's checkpoint."""
    done, lines = _run_until_sigterm(local_run_dir, "app-handler")
    assert done.returncode == 3, done.stderr
    with open(os.path.join(local_run_dir, "app_handler.json")) as f:
        seen_by_app = json.load(f)
    last = int(lines[-1])
    assert {f"model_{last:04d}.pt", f"model_{last:04d}.yaml", f"trainer_{last:04d}.pt"} <= set(seen_by_app)


def test_a_loop_that_never_closes_is_flushed_and_ended_at_the_deadline(local_run_dir: str) -> None:
    """grace_s=1 and a loop that ignores the flag: flushed, then killed by SIGTERM; every checkpoint is whole."""
    done, _ = _run_until_sigterm(local_run_dir, "never-closes")
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "did not" in done.stderr or "not closed" in done.stderr  # the deadline is logged, naming itself
    with CheckpointManager(local_run_dir, "pre") as mgr:
        infos = mgr.checkpoints()
        assert infos  # the loop kept saving at every boundary once preempted
        for info in infos:
            assert torch.equal(load_checkpoint(info.path).weight, torch.full((256, 256), float(info.epoch)))


def test_the_deprecated_final_save_runs_on_the_main_thread_without_hanging(local_run_dir: str) -> None:
    """final_save warns DeprecationWarning; a SIGTERM inside save_agent no longer hangs: it runs at the next save."""
    done, lines = _run_until_sigterm(local_run_dir, "final-save")
    assert lines[0] == "deprecated"
    assert done.returncode == -signal.SIGTERM, done.stderr
    with CheckpointManager(local_run_dir, "pre") as mgr:
        final = mgr.checkpoints()[-1]
    assert final.epoch == 99999 and final.sidecar.get("final") is True


def test_handle_sigterm_restores_previous_handler_on_close(local_run_dir: str) -> None:
    """Closing the manager without a signal puts back the handler that was there before."""
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(local_run_dir, "r")
    mgr.handle_sigterm()
    assert signal.getsignal(signal.SIGTERM) is not before
    assert mgr.preempted is False
    mgr.close()
    assert signal.getsignal(signal.SIGTERM) is before
