"""SIGTERM (preemption): pending writes and one final save are flushed, then the process exits as it would have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch

from bgsave import CheckpointManager, load_checkpoint

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, torch
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
    state = {"epoch": 0}
    mgr = CheckpointManager(run_dir, "pre")
    mgr.handle_sigterm(
        grace_s=60, final_save=lambda: mgr.save_agent(agent, state["epoch"] + 1, {"final": True})
    )
    epoch = 0
    while True:
        with torch.no_grad():
            agent.weight.fill_(float(epoch))
        mgr.save_agent(agent, epoch, {"agent_step": epoch})
        state["epoch"] = epoch
        print(epoch, flush=True)
        epoch += 1
    """
)


def _run_until_sigterm(run_dir: str, mode: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, run_dir, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(3):  # a few saves are under way
        assert proc.stdout.readline().strip().isdigit()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _committed(run_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".yaml"))


def test_sigterm_flushes_final_save_and_dies_by_sigterm(local_run_dir: str) -> None:
    """The final save is committed, nothing half-written remains, and the exit status is still 'killed by SIGTERM'."""
    done = _run_until_sigterm(local_run_dir, "default")
    assert done.returncode == -signal.SIGTERM, done.stderr
    with CheckpointManager(local_run_dir, "pre") as mgr:
        infos = mgr.checkpoints()
        final = infos[-1]
        assert final.sidecar.get("final") is True
        agent = load_checkpoint(final.path)
        # The final save holds the live weights at SIGTERM: those of the last epoch the loop reached,
        # which is the final version's epoch - 1, or the version itself if the signal hit mid-epoch.
        value = float(agent.weight.detach()[0, 0])
        assert value in (final.epoch - 1, final.epoch)
        assert torch.equal(agent.weight, torch.full((256, 256), value))
    names = os.listdir(os.path.join(local_run_dir, "checkpoints"))
    assert not [n for n in names if n.endswith(".bgsave-tmp")]
    assert not os.path.exists(os.path.join(local_run_dir, ".bgsave-writer.lock"))


def test_sigterm_hands_over_to_the_applications_handler(local_run_dir: str) -> None:
    """An application's own SIGTERM handler still runs, after the flush: it sees the final checkpoint."""
    done = _run_until_sigterm(local_run_dir, "app-handler")
    assert done.returncode == 3, done.stderr
    with open(os.path.join(local_run_dir, "app_handler.json")) as f:
        seen_by_app = json.load(f)
    assert _committed(local_run_dir)[-1] in seen_by_app


def test_handle_sigterm_restores_previous_handler_on_close(local_run_dir: str) -> None:
    """Closing the manager puts back the handler that was there before."""
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(local_run_dir, "r")
    mgr.handle_sigterm()
    assert signal.getsignal(signal.SIGTERM) is not before
    mgr.close()
    assert signal.getsignal(signal.SIGTERM) is before
