"""Train a policy with REINFORCE on CartPole, checkpointing in the background with bgsave.

Run from the repository root (a few seconds on a laptop CPU)::

    python examples/train_rl.py                    # 30 epochs, preempted after epoch 13, then resumed
    python examples/train_rl.py --stop-after 0     # the same run without the interruption

The flow, each bgsave call marked ``# bgsave:``:

1. A new run: ``start_run`` builds the policy and saves it as epoch 0.
2. Training: every ``--save-every`` epochs the policy and the optimizer are saved with the epoch's eval score.
   The save takes a CPU copy and returns; the file is written while the next epochs train.
   After each commit the manager deletes the older checkpoints, keeping the ``--keep-last`` newest and the best.
3. Preemption: after epoch ``--stop-after`` the job stops, as if its machine were taken away. Closing the manager
   lets the queued saves finish; epochs after the last checkpoint are lost.
4. Resume: a new job runs the same code. ``start_run`` finds the latest checkpoint and ``restore`` puts back the
   optimizer state and the random number generators saved with it. Each epoch's episodes are drawn from the
   restored RNG, so the lost epochs are redone exactly as they first ran, and the result is bitwise the same as an
   uninterrupted run's, however often and wherever the job is killed (``kill -9`` included):
   ``tests/test_exact_resume.py`` and ``scripts/resume_soak.py`` check it with ``--print-digest``.
5. Each job ends by printing how long training was blocked by each save, next to how long the write took in the
   background. Last, the run's checkpoints as their YAML sidecars describe them, and the best one by score, loaded
   back and evaluated.

Run it again with the same ``--run-dir`` and it resumes the finished run: nothing is left to train, and it prints
the summary. Delete the directory to start over.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import time
from pathlib import Path

import torch
from agents import Policy, rollout  # examples/agents.py, beside this script: see its docstring for why

from bgsave import CheckpointManager, load_checkpoint

SEED = 0
EPISODES = 32  # episodes per policy update
EVAL_EPISODES = 32
GAMMA = 0.99
LEARNING_RATE = 0.01


def make_policy() -> Policy:
    # Seeds the global RNG too: the episodes of every epoch are drawn from it, so the run is one random stream.
    torch.manual_seed(SEED)
    return Policy()


def digest(policy: Policy) -> str:
    """sha256 of the policy's parameters and buffers, in state_dict order: equal only for bitwise equal weights."""
    h = hashlib.sha256()
    for name, tensor in policy.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reinforce_update(policy: Policy, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> tuple[float, int]:
    """One policy-gradient step on a batch of episodes; returns their mean return and the env steps taken."""
    log_probs, rewards = rollout(policy, EPISODES, generator)
    returns = torch.zeros_like(rewards)  # discounted reward-to-go
    running = torch.zeros(EPISODES)
    for t in reversed(range(len(rewards))):
        running = rewards[t] + GAMMA * running
        returns[t] = running
    alive = rewards.bool()
    advantage = (returns - returns[alive].mean()) / (returns[alive].std() + 1e-8)
    loss = -(log_probs * advantage * rewards).sum() / rewards.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return rewards.sum(0).mean().item(), int(rewards.sum().item())


@torch.no_grad()
def evaluate(policy: Policy) -> float:
    """Mean return of the greedy policy, from the same start states every time."""
    _, rewards = rollout(policy, EVAL_EPISODES, torch.Generator().manual_seed(SEED + 12345), greedy=True)
    return rewards.sum(0).mean().item()


def train(
    run_dir: str, *, epochs: int, save_every: int, keep_last: int | None, stop_after: int | None = None
) -> tuple[bool, Policy]:
    """Train the run in ``run_dir`` up to ``epochs``, resuming it if it exists; (False if preempted, the policy)."""
    # bgsave: one manager per run. After each commit it deletes all but the `keep_last` newest checkpoints
    # and the best one by score. Leaving the `with` block waits until every queued save is on disk.
    retention = {"keep_last": keep_last, "keep_best": 1} if keep_last else {}
    with CheckpointManager(run_dir, Path(run_dir).name, **retention) as mgr:
        # bgsave: load the latest checkpoint whose trainer state is committed with it, or call make_policy() and
        # save the new policy as epoch 0, with the RNG states right after make_policy() (rng=True).
        start = mgr.start_run(make_policy, rng=True)
        policy = start.agent
        optimizer = torch.optim.Adam(policy.parameters(), lr=LEARNING_RATE)
        # bgsave: the optimizer state and the RNG states of the resumed epoch; nothing to do for a new run.
        start.restore(optimizer)
        agent_step, total_time = start.agent_step, 0.0
        if not start.resumed:
            print(f"new run in {mgr.checkpoint_dir}: saved the initial policy as epoch 0 (eval {evaluate(policy):.1f})")
        else:
            # bgsave: RunStart carries the agent step and the resumed checkpoint's sidecar (epoch 0's has no time).
            total_time = start.info.sidecar["total_time"] or 0.0
            state = start.trainer_state
            if state is None:  # a run saved by an older version of this script, without trainer states
                restored = "no trainer state: fresh optimizer"
            elif state["optimizer_state"] is None:
                restored = f"RNG state of epoch {state['epoch']} restored"
            else:
                restored = f"optimizer and RNG state of epoch {state['epoch']} restored"
            print(f"resumed from epoch {start.epoch} (agent_step {agent_step}, {restored})")
        if start.epoch >= epochs:
            print(f"nothing left to train: the run is at epoch {start.epoch} of {epochs}")

        preempted = False
        for epoch in range(start.epoch + 1, epochs + 1):
            began = time.perf_counter()
            # The episodes' seed comes from the global RNG, which a resume restores: an epoch redone after a
            # resume plays the same episodes only because the RNG is where the saved epoch left it.
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
            avg_reward, steps = reinforce_update(policy, optimizer, generator)
            agent_step += steps
            score = evaluate(policy)
            total_time += time.perf_counter() - began
            metadata = {"agent_step": agent_step, "score": score, "avg_reward": avg_reward, "total_time": total_time}
            # bgsave: every `save_every` epochs, copy the policy, the optimizer state and the RNG states, queue the
            # write, return. The policy and its trainer state commit together, as one epoch.
            saved = mgr.save_at_interval(
                policy, epoch, interval=save_every, metadata=metadata, optimizer=optimizer, rng=True
            )
            print(
                f"epoch {epoch:3d}  agent_step {agent_step:7d}  avg_reward {avg_reward:6.1f}  score {score:6.1f}"
                + ("  -> saved" if saved else "")
            )
            if epoch == stop_after:
                print(f"-- preempted after epoch {epoch}: the job stops here --")
                preempted = True
                break

        # bgsave: wait until the queued saves are durable, so their timings are all recorded.
        mgr.wait()
        print_timings(mgr)
    return not preempted, policy


def print_timings(mgr: CheckpointManager) -> None:
    """How long training was blocked by saves (stall) against how long the writes took in the background."""
    # bgsave: one SaveRecord per finished save of this manager.
    records = mgr.records
    if not records:
        return
    print("save timings (median / max):")
    for kind in ("agent", "trainer_state"):
        mine = [r for r in records if r.kind == kind]
        if not mine:
            continue
        stall = [r.stall_s * 1e3 for r in mine]
        write = [r.write_s * 1e3 for r in mine]
        print(
            f"  {kind:13s} x{len(mine):<3d} training blocked {statistics.median(stall):6.2f} / {max(stall):6.2f} ms"
            f"   written in background {statistics.median(write):6.2f} / {max(write):6.2f} ms"
            f"   {mine[-1].bytes / 1e3:.1f} kB"
        )


def report(run_dir: str, keep_last: int | None) -> None:
    """The run's checkpoints and the best one, read from a fresh manager as any later script would."""
    # bgsave: a manager that only reads never takes the run's writer lock.
    with CheckpointManager(run_dir, Path(run_dir).name) as mgr:
        # bgsave: the committed checkpoints, read from their YAML sidecars (nothing is unpickled).
        infos = mgr.checkpoints()
        kept = f"the newest {keep_last} and the best are kept" if keep_last else "all are kept"
        print(f"\ncheckpoints in {mgr.checkpoint_dir} ({kept}):")
        print(f"  {'epoch':>5s}  {'agent_step':>10s}  {'score':>6s}  {'avg_reward':>10s}  {'total_time':>10s}")
        for info in infos:
            s = info.sidecar
            score = "-" if s["score"] is None else f"{s['score']:.1f}"
            avg_reward = "-" if s["avg_reward"] is None else f"{s['avg_reward']:.1f}"
            print(f"  {info.epoch:5d}  {s['agent_step']:10d}  {score:>6s}  {avg_reward:>10s}  {s['total_time']:9.2f}s")
        # bgsave: the checkpoint with the highest score (ties go to the later epoch).
        best = mgr.find_best_checkpoint()
        if best is None:
            print("no checkpoint has a score yet")
            return
        best_info = next(info for info in infos if info.path == best)
        # bgsave: load it back (this unpickles: only load run directories you trust).
        policy = load_checkpoint(best, map_location="cpu")
        print(
            f"best: epoch {best_info.epoch}, score {best_info.sidecar['score']:.1f} ({best}); "
            f"loaded back, it scores {evaluate(policy):.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo", help="local path or fsspec URL (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=30, help="train up to this epoch (default: 30)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs (default: 5)")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=13,
        help="simulate preemption after this epoch, then resume; 0: never (default: 13)",
    )
    parser.add_argument(
        "--keep-last", type=int, default=4, help="keep the N newest checkpoints and the best; 0: keep all (default: 4)"
    )
    parser.add_argument(
        "--print-digest", action="store_true", help="print the sha256 of the final weights (to compare two runs)"
    )
    args = parser.parse_args(argv)
    # Ops this small gain nothing from intra-op threads, and those threads spin-wait: on a busy machine they
    # made this script 10x slower.
    torch.set_num_threads(1)
    # The same bits on every run, not just the same statistics: what makes an interrupted run comparable.
    torch.use_deterministic_algorithms(True)
    # Let bgsave's warnings through (a save that waited for the previous one, a trainer state from another epoch).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    options = {"epochs": args.epochs, "save_every": args.save_every, "keep_last": args.keep_last or None}
    finished, policy = train(args.run_dir, stop_after=args.stop_after or None, **options)
    if not finished:
        print("\n-- a new job starts with the same command and resumes the run --")
        _, policy = train(args.run_dir, **options)
    if args.print_digest:
        print(f"digest sha256:{digest(policy)}")
    report(args.run_dir, args.keep_last or None)
    print(f"\ndone in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
