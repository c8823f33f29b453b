"""Train on a node's local disk, mirror every checkpoint to a bucket, then resume on a "new node" from the bucket.

Run from the repository root::

    python examples/mirror_run.py                                   # a local S3 server, started for the demo
    python examples/mirror_run.py --mirror s3://my-bucket/runs/x    # your bucket, your AWS credentials

Without ``--mirror`` and with no S3 endpoint or credentials in the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``), the script starts moto's S3 server on 127.0.0.1 and creates a bucket in it
(both gone when the script exits). The flow, each bgsave call marked ``# bgsave:``:

1. Node 1 trains the CartPole policy of ``train_rl.py`` with its run directory on local disk (a temp
   directory, standing for the node's NVMe) and ``mirror=`` the bucket. Each save commits locally at
   local-disk speed; the upload to the bucket runs behind it. Local retention keeps 2 checkpoints,
   the bucket keeps all. Then node 1 is "lost": its local directory is deleted.
2. Node 2 starts with an empty local directory and the same mirror: ``start_run`` resumes the newest
   epoch from the bucket, with that epoch's optimizer state, and trains on; its saves mirror too.
3. ``bgsave ls RUN_DIR --mirror URL`` shows which tier holds which epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time

import torch
from bucket_run import local_s3_server
from train_rl import LEARNING_RATE, SEED, evaluate, make_policy, reinforce_update

import bgsave.cli
from bgsave import CheckpointManager


def train(run_dir: str, mirror: str, *, first: int, last: int, save_every: int) -> None:
    """Train epochs up to ``last`` on this node, resuming from whichever tier is newer."""
    # bgsave: the run directory is local (fast); every committed checkpoint is uploaded to `mirror` behind it.
    with CheckpointManager(run_dir, "cartpole", mirror=mirror, keep_last=2) as mgr:
        # bgsave: the newest epoch of either tier, with its own trainer state; a new run saves epoch 0.
        start = mgr.start_run(make_policy)
        policy = start.agent
        optimizer = torch.optim.Adam(policy.parameters(), lr=LEARNING_RATE)
        start.restore(optimizer)
        where = "new run" if not start.resumed else f"resumed epoch {start.epoch} from {start.info.path}"
        print(f"{run_dir}: {where}")
        agent_step = start.agent_step
        for epoch in range(max(first, start.epoch + 1), last + 1):
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
            avg_reward, steps = reinforce_update(policy, optimizer, generator)
            agent_step += steps
            metadata = {"agent_step": agent_step, "avg_reward": avg_reward}
            # bgsave: returns once the CPU copy is taken; the local write and then the upload run behind.
            if mgr.save_at_interval(policy, epoch, interval=save_every, metadata=metadata, optimizer=optimizer):
                print(f"epoch {epoch:3d}  avg_reward {avg_reward:6.1f}  -> saved")
        # bgsave: wait() returns once every checkpoint is durable locally *and* in the bucket.
        mgr.wait()
        states = ", ".join(f"{s.epoch}:{s.state}" for s in mgr.mirror_status())
        print(f"mirror status (epoch:state): {states}")
        print(f"eval of the last policy: {evaluate(policy):.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", help="bucket URL, s3://BUCKET/PREFIX (default: a local S3 server's)")
    parser.add_argument("--epochs", type=int, default=20, help="node 1 trains to this epoch, node 2 to twice it")
    parser.add_argument("--save-every", type=int, default=4, help="checkpoint every N epochs (default: 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configured = [var for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID") if os.environ.get(var)]
    if args.mirror is None and configured:
        parser.error(f"{' and '.join(configured)} set: pass --mirror s3://BUCKET/PREFIX for a bucket you own")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        mirror = args.mirror or stack.enter_context(local_s3_server()).replace("/cartpole", "/cartpole-mirror")
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="bgsave-nodes-"))
        node1, node2 = os.path.join(scratch, "node1", "run"), os.path.join(scratch, "node2", "run")
        print(f"-- node 1: local run directory {node1}, mirror {mirror} --")
        train(node1, mirror, first=1, last=args.epochs, save_every=args.save_every)
        shutil.rmtree(os.path.dirname(node1))
        print("\n-- node 1 is lost with its local disk; node 2 starts with an empty one --")
        train(node2, mirror, first=1, last=2 * args.epochs, save_every=args.save_every)
        print(f"\n$ bgsave ls {node2} --mirror {mirror}")
        # bgsave: the command line, in-process: each epoch with the tiers that hold it.
        bgsave.cli.main(["ls", node2, "--mirror", mirror])
    print(f"\ndone in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
