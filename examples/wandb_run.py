"""Train the CartPole policy of ``train_rl.py`` and log every checkpoint to Weights & Biases as a model artifact.

Run from the repository root (``pip install 'bgsave[wandb]'``)::

    python examples/wandb_run.py                        # online if a W&B API key is configured, else offline
    WANDB_MODE=offline python examples/wandb_run.py     # offline whatever the key

Online needs an API key: ``WANDB_API_KEY`` in the environment, or ``wandb login`` (which stores it in
``~/.netrc``). Without one the run is offline: W&B records everything, artifacts included, in a local run
file that ``wandb sync`` uploads later; its directories go under the run directory, not your home.

The flow, each bgsave call marked ``# bgsave:``:

1. ``wandb.init`` starts the W&B run; ``CheckpointManager(..., wandb_run=run)`` logs each committed
   checkpoint to it as a ``model`` artifact named after the bgsave run, aliased ``latest`` and
   ``epoch_NNNN``, with the sidecar (score, agent_step, ...) as its metadata. The upload is done by bgsave's
   worker after the checkpoint is on disk: training never waits for W&B.
2. Preemption after ``--stop-after``; the new job resumes the *same* W&B run: its id is kept in the
   checkpoints' sidecars, so it survives with them.
3. Each job closes the manager before ``run.finish()``: closing waits until every checkpoint has been handed
   to W&B, and a finished run accepts no more artifacts.
"""

from __future__ import annotations

import argparse
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import wandb
from train_rl import LEARNING_RATE, SEED, evaluate, make_policy, print_timings, reinforce_update

from bgsave import CheckpointManager

PROJECT = "bgsave-examples"


def api_key_source() -> str | None:
    """Where a W&B API key is configured (``WANDB_API_KEY`` or the netrc entry ``wandb login`` writes), or None."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return None
    return f"netrc entry for {host} (wandb login)" if entry else None


def choose_mode(run_dir: str) -> str:
    """Online with a configured key, else offline with W&B's directories under the run directory."""
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
        print(f"W&B mode {mode!r}, from WANDB_MODE")
    elif (source := api_key_source()) is not None:
        mode = "online"
        print(f"W&B online: API key from {source}")
    else:
        mode = "offline"
        print("W&B offline: no API key configured (WANDB_API_KEY or `wandb login`)")
    if mode == "offline":
        # Directories already set in the environment win; the rest go under the run directory.
        root = Path(run_dir) / "wandb" if "://" not in run_dir else Path("wandb-offline")
        subdirs = {"WANDB_DIR": "", "WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_CONFIG_DIR": "config"}
        for var, sub in subdirs.items():
            os.environ.setdefault(var, os.fspath(root / sub))
            os.makedirs(os.environ[var], exist_ok=True)
    return mode


def previous_wandb_run_id(run_dir: str, run_name: str) -> str | None:
    """The W&B run id recorded in the latest checkpoint's sidecar, if the run has one."""
    # bgsave: a manager that only reads takes no writer lock; its checkpoints() reads sidecars only.
    with CheckpointManager(run_dir, run_name) as reader:
        infos = reader.checkpoints()
    return infos[-1].sidecar.get("wandb_run_id") if infos else None


def train(run_dir: str, *, mode: str, epochs: int, save_every: int, stop_after: int | None = None) -> bool:
    """Train the run in ``run_dir`` up to ``epochs`` (resuming it and its W&B run); False if preempted."""
    run_name = Path(run_dir).name
    run_id = previous_wandb_run_id(run_dir, run_name)
    run: Any = wandb.init(
        project=PROJECT,
        name=run_name,
        id=run_id,  # None: W&B makes one up, stored below in every sidecar
        resume="allow",
        mode=mode,
        dir=os.environ.get("WANDB_DIR"),
        config={"epochs": epochs, "save_every": save_every, "learning_rate": LEARNING_RATE},
        settings=wandb.Settings(quiet=True),
    )
    print(f"W&B run {run.id} ({'resumed' if run_id else 'new'})")
    try:
        # bgsave: every committed checkpoint is logged to `run` as an artifact, after it is on disk.
        # Leaving the `with` block waits for the writes and those hand-overs: before run.finish().
        with CheckpointManager(run_dir, run_name, wandb_run=run) as mgr:
            preempted = train_loop(mgr, run, epochs=epochs, save_every=save_every, stop_after=stop_after)
            # bgsave: wait for the writes; then each agent save's record says whether its upload failed.
            mgr.wait()
            print_timings(mgr)
            records = [r for r in mgr.records if r.kind == "agent"]
        for record in records:
            if record.after_error is not None:  # logged as a WARNING too; the checkpoint itself is committed
                print(f"epoch {record.epoch} is committed but its W&B upload failed: {record.after_error}")
        where(run, run_name, [r.epoch for r in records if r.ok and r.after_error is None])
    finally:
        run.finish()
    return not preempted


def train_loop(mgr: CheckpointManager, run: Any, *, epochs: int, save_every: int, stop_after: int | None) -> bool:
    """The training of ``train_rl.py``, with the W&B run id in each sidecar; True if preempted."""
    # bgsave: load the latest checkpoint, or save make_policy() as epoch 0 (uploaded like any other).
    start = mgr.start_run(make_policy)
    policy = start.agent
    optimizer = torch.optim.Adam(policy.parameters(), lr=LEARNING_RATE)
    agent_step, total_time = start.agent_step, 0.0
    if not start.resumed:
        # bgsave: start_run saved epoch 0 without these: add them to its sidecar (its artifact keeps the old one).
        mgr.update_metadata(0, score=evaluate(policy), wandb_run_id=run.id)
        print(f"new run in {mgr.checkpoint_dir}: saved the initial policy as epoch 0")
    else:
        total_time = start.info.sidecar["total_time"]
        start.restore(optimizer)  # bgsave: the optimizer state saved with this epoch
        print(f"resumed from epoch {start.epoch} (agent_step {agent_step})")
    if start.epoch >= epochs:
        print(f"nothing left to train: the run is at epoch {start.epoch} of {epochs}")

    for epoch in range(start.epoch + 1, epochs + 1):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
        avg_reward, steps = reinforce_update(policy, optimizer, generator)
        agent_step += steps
        score = evaluate(policy)
        total_time += time.perf_counter() - began
        run.log({"epoch": epoch, "agent_step": agent_step, "avg_reward": avg_reward, "score": score})
        metadata = {
            "agent_step": agent_step,
            "score": score,
            "avg_reward": avg_reward,
            "total_time": total_time,
            "wandb_run_id": run.id,  # an extra sidecar key: the resumed job reads it back
        }
        # bgsave: queue the write; the artifact metadata is this sidecar, so the score goes in now.
        saved = mgr.save_at_interval(policy, epoch, interval=save_every, metadata=metadata, optimizer=optimizer)
        print(f"epoch {epoch:3d}  agent_step {agent_step:7d}  score {score:6.1f}" + ("  -> saved" if saved else ""))
        if epoch == stop_after:
            print(f"-- preempted after epoch {epoch}: the job stops here --")
            return True
    return False


def where(run: Any, run_name: str, epochs: list[int]) -> None:
    """Say which checkpoints this job logged, and where W&B recorded them."""
    if not epochs:
        return
    logged = ", ".join(f"{run_name}:epoch_{epoch:04d}" for epoch in epochs)
    if run.settings.mode == "disabled":
        print("W&B is disabled (WANDB_MODE=disabled): its run ignored the artifacts")
    elif run.offline:
        # W&B's run file: the artifacts are recorded in it and uploaded by `wandb sync`.
        print(f"logged {logged} (type model): recorded offline in {run.settings.sync_file}")
        print(f"upload them with: wandb sync {run.settings.sync_dir}")
    else:
        print(f"logged {logged} (type model) to {run.entity}/{run.project}: {run.url}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/wandb-demo", help="local path (default: runs/wandb-demo)")
    parser.add_argument("--epochs", type=int, default=30, help="train up to this epoch (default: 30)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs (default: 5)")
    parser.add_argument(
        "--stop-after", type=int, default=13, help="simulate preemption after this epoch, then resume; 0: never"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see train_rl.py: tiny ops, spinning threads
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    options = {"mode": choose_mode(args.run_dir), "epochs": args.epochs, "save_every": args.save_every}
    if not train(args.run_dir, stop_after=args.stop_after or None, **options):
        print("\n-- a new job starts with the same command and resumes the run, and its W&B run --")
        train(args.run_dir, **options)
    print(f"\ndone in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
