"""The RL example's policy trained with DistributedDataParallel on several ranks, checkpointed by bgsave.

Run from the repository root (gloo on CPU; with CUDA, one GPU per rank and NCCL for the training)::

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py                  # preempted after 13, resumed
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --stop-after 0   # without the interruption

Every rank runs this same code and makes the same bgsave calls (``# bgsave:``); rank 0 alone writes,
in the background, and the other ranks only check their arguments. ``start_run`` is collective: rank 0
resumes the run (or builds the policy) and every rank gets the same policy and trainer state.

Each rank plays its own episodes, drawn from a seed every rank takes from the global RNG (the same
stream on every rank) plus its rank. ``rng=True`` saves rank 0's RNG states and ``restore`` puts them
back on every rank, which is right here because the global streams are equal on all ranks. DDP sums
the gradients in the same order every step, so the final weights of an interrupted, resumed run are
bitwise those of an uninterrupted one (``--print-digest``; ``tests/test_examples_distributed.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from agents import Policy, rollout  # examples/agents.py: checkpoints unpickle the policy's class from there
from torch.nn.parallel import DistributedDataParallel
from train_rl import EVAL_EPISODES, LEARNING_RATE, SEED, digest, reinforce_update

from bgsave import CheckpointManager


def make_policy() -> Policy:
    # Only rank 0 calls it (start_run sends the policy to the others): from a generator of its own, so the
    # global RNG stays the same stream on every rank.
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return Policy()


@torch.no_grad()
def evaluate(policy: torch.nn.Module) -> float:
    """Mean return of the greedy policy, from the same start states every time (as train_rl.evaluate)."""
    _, rewards = rollout(policy, EVAL_EPISODES, torch.Generator().manual_seed(SEED + 12345), greedy=True)
    return rewards.sum(0).mean().item()


def train(run_dir: str, *, epochs: int, save_every: int, stop_after: int | None, device: torch.device) -> Policy:
    """Train the run in ``run_dir`` up to ``epochs`` (resuming it if it exists), or until ``stop_after``."""
    rank = dist.get_rank()
    torch.manual_seed(SEED)  # every rank: the same global stream; a resume replaces it with the saved one
    # bgsave: the same manager on every rank (it makes a gloo group of its own for its collectives).
    with CheckpointManager(run_dir, Path(run_dir).name) as mgr:
        mgr.handle_sigterm()
        # bgsave: collective. Rank 0 resumes the latest epoch with its trainer state or builds a new policy
        # (saved as epoch 0 with the RNG states); every rank gets that policy.
        start = mgr.start_run(make_policy, rng=True)
        policy = start.agent.to(device)
        model = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
        # The env runs on the CPU: DDP moves its observations to the device, this brings the logits back.
        model.register_forward_hook(lambda _module, _inputs, logits: logits.cpu())
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        start.restore(optimizer)  # bgsave: optimizer and RNG states of the resumed epoch (rank 0's, on every rank)
        if rank == 0:
            print(f"resumed from epoch {start.epoch}" if start.resumed else "new run: epoch 0 saved")
        agent_step = start.agent_step
        for epoch in range(start.epoch + 1, epochs + 1):
            seed = int(torch.randint(2**62, ()).item())  # the same on every rank
            avg_reward, steps = reinforce_update(model, optimizer, torch.Generator().manual_seed(seed + rank))
            counts = torch.tensor([steps, avg_reward], dtype=torch.float64)
            dist.all_reduce(counts)  # every rank's env steps, and their mean return
            agent_step += int(counts[0])
            metadata = {"agent_step": agent_step, "avg_reward": counts[1].item() / dist.get_world_size()}
            if epoch % save_every == 0:
                metadata["score"] = evaluate(model)
            # bgsave: every rank calls it; rank 0 copies the policy (DDP unwrapped), optimizer and RNG states
            # and writes them in the background; the others return at once.
            mgr.save_at_interval(model, epoch, interval=save_every, optimizer=optimizer, rng=True, metadata=metadata)
            if rank == 0:
                print(f"epoch {epoch:3d}  agent_step {agent_step:7d}  avg_reward {metadata['avg_reward']:6.1f}")
            # bgsave: after a SIGTERM the save above was made, whatever the interval. mgr.preempted is each rank's
            # own signal, which may land between two ranks' saves: rank 0's (the one that saves) decides for all.
            stop = torch.tensor(mgr.preempted or epoch == stop_after)
            dist.broadcast(stop, src=0)
            if stop:
                if rank == 0:
                    print(f"-- stopped after epoch {epoch} --")
                break
        mgr.wait()  # bgsave: collective: rank 0's writes are durable (a failed one is raised on every rank)
        if rank == 0 and mgr.records:
            stalls = [r.stall_s * 1e3 for r in mgr.records]
            print(f"rank 0: {len(stalls)} saves, training blocked {statistics.median(stalls):.2f} ms (median)")
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/ddp", help="local path or fsspec URL (default: runs/ddp)")
    parser.add_argument("--epochs", type=int, default=30, help="train up to this epoch (default: 30)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs (default: 5)")
    parser.add_argument("--stop-after", type=int, default=13, help="stop after this epoch, then resume; 0: never")
    parser.add_argument("--print-digest", action="store_true", help="print the sha256 of the final weights")
    args = parser.parse_args()
    torch.set_num_threads(1)  # ops this small gain nothing from intra-op threads (see train_rl.py)
    torch.use_deterministic_algorithms(True)
    if torch.cuda.is_available():  # one GPU per rank; bgsave's collectives and the env stay on the CPU (gloo)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    started = time.perf_counter()
    options = {"epochs": args.epochs, "save_every": args.save_every, "device": device}
    policy = train(args.run_dir, stop_after=args.stop_after or None, **options)
    if args.stop_after and args.stop_after < args.epochs:
        if dist.get_rank() == 0:
            print("\n-- a new job starts with the same command and resumes the run --")
        policy = train(args.run_dir, stop_after=None, **options)
    if dist.get_rank() == 0:
        if args.print_digest:
            print(f"digest sha256:{digest(policy)}")
        print(f"done in {time.perf_counter() - started:.1f}s on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
