"""Train the CartPole policy of ``train_rl.py`` with its run directory in an S3 bucket.

Run from the repository root::

    python examples/bucket_run.py                                   # a local S3 server, started for the demo
    python examples/bucket_run.py --run-dir s3://my-bucket/runs/x   # your bucket, your AWS credentials
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/bucket_run.py --run-dir s3://bucket/runs/x  # MinIO...

Without ``--run-dir`` and with no S3 endpoint or credentials in the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``), the script starts moto's S3 server on 127.0.0.1, creates a bucket in it and trains
there; the server and everything in it are gone when the script exits. With ``--run-dir`` the bucket must
exist. s3fs (``pip install 'bgsave[s3]'``) reads the endpoint and credentials from the environment, as does
the ``bgsave`` command, so the same code runs against AWS, MinIO or the local server.

The flow, each bgsave call marked ``# bgsave:``:

1. A new run: ``start_run`` builds the policy and saves it as epoch 0 to the bucket.
2. Training: every ``--save-every`` epochs the policy and the optimizer are saved. The save returns once the
   CPU copy is taken; the upload runs while training goes on. The eval score is computed *after* the save
   returned and added to the checkpoint's sidecar with ``update_metadata``, as a score from a separate
   evaluation job would be.
3. Preemption after ``--stop-after``, then a new job resumes from the latest checkpoint in the bucket, with
   its optimizer state.
4. The run's checkpoints listed with ``bgsave ls s3://...``, the latest and the best found, the best loaded
   back from the bucket and evaluated.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch
from train_rl import LEARNING_RATE, SEED, evaluate, make_policy, print_timings, reinforce_update

import bgsave.cli
from bgsave import CheckpointManager, load_checkpoint

LOCAL_BUCKET = "bgsave-demo"
LOCAL_RUN_DIR = f"s3://{LOCAL_BUCKET}/runs/cartpole"
# Any value works against the local server; a region is needed by the client, and us-east-1 needs no
# location constraint when the bucket is created.
LOCAL_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, point the environment at it, create a bucket; yields the run dir."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # The environment, not storage_options, so that bgsave, the `bgsave` command and load_checkpoint
        # all find the server the way they would find real credentials.
        os.environ.update(LOCAL_ENV, AWS_ENDPOINT_URL=endpoint)
        fsspec.filesystem("s3").mkdir(LOCAL_BUCKET)
        print(f"no S3 endpoint or credentials configured: started a local S3 server (moto) at {endpoint}")
        print(f"created bucket {LOCAL_BUCKET!r} in it; it and the run vanish when this script exits\n")
        yield LOCAL_RUN_DIR
    finally:
        server.stop()


def run_name_of(run_dir: str) -> str:
    """The run's name: the last part of the URL (``s3://bucket/runs/x`` -> ``x``)."""
    return run_dir.rstrip("/").rsplit("/", 1)[-1]


def train(run_dir: str, *, epochs: int, save_every: int, stop_after: int | None = None) -> bool:
    """Train the run in ``run_dir`` up to ``epochs``, resuming it if it exists; False if preempted."""
    # bgsave: one manager per run; a bucket URL works like a local path. Leaving the `with` block waits
    # until every queued upload is committed (and closes every S3 file it opened).
    with CheckpointManager(run_dir, run_name_of(run_dir)) as mgr:
        # bgsave: load the latest checkpoint from the bucket, or save make_policy() there as epoch 0.
        start = mgr.start_run(make_policy)
        policy = start.agent
        optimizer = torch.optim.Adam(policy.parameters(), lr=LEARNING_RATE)
        agent_step, total_time = start.agent_step, 0.0
        if not start.resumed:
            score = evaluate(policy)
            # bgsave: start_run saved epoch 0 without a score; add it to that checkpoint's sidecar.
            mgr.update_metadata(0, score=score)
            print(f"new run in {mgr.checkpoint_dir}: saved the initial policy as epoch 0 (eval {score:.1f})")
        else:
            # bgsave: RunStart.info is the resumed checkpoint's sidecar.
            total_time = start.info.sidecar["total_time"]
            # bgsave: the optimizer state saved with this epoch (start_run resumes an epoch that has one).
            start.restore(optimizer)
            restored = "optimizer state restored" if start.trainer_state is not None else "fresh optimizer"
            print(f"resumed from epoch {start.epoch} in {mgr.checkpoint_dir} (agent_step {agent_step}, {restored})")
        if start.epoch >= epochs:
            print(f"nothing left to train: the run is at epoch {start.epoch} of {epochs}")

        preempted = False
        for epoch in range(start.epoch + 1, epochs + 1):
            began = time.perf_counter()
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
            avg_reward, steps = reinforce_update(policy, optimizer, generator)
            agent_step += steps
            total_time += time.perf_counter() - began
            metadata = {"agent_step": agent_step, "avg_reward": avg_reward, "total_time": total_time}
            # bgsave: every `save_every` epochs, copy policy and optimizer to CPU, queue the upload, return.
            saved = mgr.save_at_interval(policy, epoch, interval=save_every, metadata=metadata, optimizer=optimizer)
            line = f"epoch {epoch:3d}  agent_step {agent_step:7d}  avg_reward {avg_reward:6.1f}"
            if saved:
                # The upload is under way; evaluating the saved weights does not hold it up.
                score = evaluate(policy)
                # bgsave: a late score: rewrites this epoch's sidecar once its checkpoint is committed.
                mgr.update_metadata(epoch, score=score)
                line += f"  -> saved, then scored {score:6.1f}"
            print(line)
            if epoch == stop_after:
                print(f"-- preempted after epoch {epoch}: the job stops here --")
                preempted = True
                break

        # bgsave: wait until every queued upload and sidecar update is in the bucket.
        mgr.wait()
        print_timings(mgr)
    return not preempted


def report(run_dir: str) -> None:
    """List the run as ``bgsave ls`` does, then find, load and evaluate its best checkpoint."""
    print(f"\n$ bgsave ls {run_dir}")
    # bgsave: the command line, called in-process; it reads sidecars only and never unpickles.
    bgsave.cli.main(["ls", run_dir])
    # bgsave: a manager that only reads takes no writer lock; `with` closes it.
    with CheckpointManager(run_dir, run_name_of(run_dir)) as mgr:
        # bgsave: the newest committed checkpoint, and the one with the highest score (late scores included).
        latest = mgr.find_latest_checkpoint()
        best = mgr.find_best_checkpoint()
        infos = {info.path: info for info in mgr.checkpoints()}
    print(f"latest: {latest}")
    if best is None:
        print("no checkpoint has a score yet")
        return
    # bgsave: load it back straight from the bucket (this unpickles: only load run directories you trust).
    policy = load_checkpoint(best, map_location="cpu")
    info = infos[best]
    score, rescored = info.sidecar["score"], evaluate(policy)
    print(f"best: epoch {info.epoch}, score {score:.1f} ({best}); loaded back, it scores {rescored:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", help=f"bucket URL, s3://BUCKET/PREFIX (default: {LOCAL_RUN_DIR} on a local S3 server)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="train up to this epoch (default: 30)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs (default: 5)")
    parser.add_argument(
        "--stop-after", type=int, default=13, help="simulate preemption after this epoch, then resume; 0: never"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see train_rl.py: tiny ops, spinning threads
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    configured = [var for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID") if os.environ.get(var)]
    if args.run_dir is None and configured:
        # Never write demo data into a real account's bucket chosen by guesswork.
        parser.error(f"{' and '.join(configured)} set: pass --run-dir s3://BUCKET/PREFIX for a bucket you own")

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.run_dir is None:
            run_dir = stack.enter_context(local_s3_server())
        else:
            run_dir = args.run_dir
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
            print(f"run directory {run_dir}, through {endpoint}\n")
        options = {"epochs": args.epochs, "save_every": args.save_every}
        if not train(run_dir, stop_after=args.stop_after or None, **options):
            print("\n-- a new job starts with the same command and resumes the run from the bucket --")
            train(run_dir, **options)
        report(run_dir)
    print(f"\ndone in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
