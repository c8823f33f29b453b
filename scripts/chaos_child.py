"""The job that ``ckpt-chaos`` kills: a tiny deterministic training run that checkpoints with bgsave in the background.

``ckpt-chaos run`` (PyPI) runs ``train`` once fault-free, recording every file event under ``{out}``, then
kills a fresh copy at each event (``before``: the file never appears; ``torn``: a file written through
``open()`` is cut to half its size at close; ``unsynced``: every byte not yet fsynced is rolled back) and
runs ``train`` again on the same directory as the resume. The resume:

1. resumes with ``start_run`` (a dead writer's lock is taken over, its temp files removed);
2. verifies every committed checkpoint, the latest first: the loaded weights equal the ones recomputed
   from scratch for that epoch, bit for bit, and the sidecar holds the epoch, agent_step, score and run
   that were saved; ``bgsave.find_latest_checkpoint`` agrees with the manager; a trainer state it is
   given belongs to the resumed epoch; any failure exits non-zero, which ckpt-chaos counts as HARD_FAIL;
3. prints ``resumed from step N`` (ckpt-chaos's ``--step-regex``) and trains on to the last epoch,
   saving each one.

``digest`` prints the latest committed checkpoint's epoch and a hash of its weights (``--result-cmd``), so
a resume that finished with other weights than the fault-free run is a SILENT_DIVERGENCE.

The model is torch's own ``nn.Sequential`` (importable, so any process can unpickle it) trained with
plain SGD (stateless, so resuming from any epoch reproduces the fault-free weights exactly).
The command that produced ``benchmarks/results/chaos_*.json`` is in that file; in short::

    ckpt-chaos run --modes before,torn,unsynced --checkpoint-glob '{out}/checkpoints/model_*.yaml' \\
        --step-regex 'resumed from step (\\d+)' --result-cmd 'python scripts/chaos_child.py digest {out}' \\
        -- python scripts/chaos_child.py train {out} --epochs 3
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch
from torch import nn

from bgsave import CheckpointManager, find_latest_checkpoint, load_checkpoint

RUN_NAME = "chaos"
WIDTH = 16
STEPS_PER_EPOCH = 4
LR = 0.05


def make_model() -> nn.Sequential:
    """The epoch-0 model: the same weights in every process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(), nn.Linear(2 * WIDTH, WIDTH))


def make_optimizer(model: nn.Module) -> torch.optim.SGD:
    """Plain SGD: no state, so a resume from any epoch continues exactly as the uninterrupted run."""
    return torch.optim.SGD(model.parameters(), lr=LR)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> float:
    """One epoch on batches drawn from a generator seeded by the epoch; returns the last loss."""
    g = torch.Generator().manual_seed(1000 + epoch)
    loss = torch.zeros(())
    for _ in range(STEPS_PER_EPOCH):
        x = torch.randn(8, WIDTH, generator=g)
        loss = (model(x) - x.flip(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def metadata(epoch: int, loss: float) -> dict[str, object]:
    """What epoch's sidecar must hold (no wall-clock values: the sidecar bytes are the same every run)."""
    return {"agent_step": epoch * STEPS_PER_EPOCH, "score": round(-loss, 6)}


def expected_states(last_epoch: int) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, object]]]:
    """Weights and sidecar metadata of epochs 0..last_epoch, recomputed from scratch."""
    model = make_model()
    optimizer = make_optimizer(model)
    out = {0: (_state(model), {"agent_step": 0, "score": None})}
    for epoch in range(1, last_epoch + 1):
        loss = train_epoch(model, optimizer, epoch)
        out[epoch] = (_state(model), metadata(epoch, loss))
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digest(model: nn.Module) -> str:
    """A hash of the weights' bytes, in state_dict order."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def verify(mgr: CheckpointManager, resumed_epoch: int, trainer_state: dict[str, object] | None) -> int:
    """Check every committed checkpoint against the recomputed run; returns how many were checked."""
    infos = mgr.checkpoints()
    if not infos or infos[-1].epoch != resumed_epoch:
        raise AssertionError(f"resumed epoch {resumed_epoch} is not the latest committed one ({infos and infos[-1]})")
    if find_latest_checkpoint(mgr.checkpoint_dir) != infos[-1].path:
        raise AssertionError("bgsave.find_latest_checkpoint disagrees with the manager")
    expected = expected_states(resumed_epoch)
    for info in reversed(infos):
        weights, meta = expected[info.epoch]
        model = load_checkpoint(info.path)
        if not isinstance(model, nn.Sequential):
            raise AssertionError(f"{info.path}: loaded a {type(model).__name__}")
        got = model.state_dict()
        if got.keys() != weights.keys() or not all(torch.equal(got[k], weights[k]) for k in weights):
            raise AssertionError(f"{info.path}: weights differ from epoch {info.epoch} of the uninterrupted run")
        for key, value in {**meta, "epoch": info.epoch, "run": RUN_NAME}.items():
            if info.sidecar.get(key) != value:
                raise AssertionError(f"{info.path}: sidecar {key}={info.sidecar.get(key)!r}, expected {value!r}")
    if trainer_state is not None:
        if trainer_state.get("epoch") != resumed_epoch:
            raise AssertionError(f"trainer state of epoch {trainer_state.get('epoch')} given for epoch {resumed_epoch}")
        if trainer_state.get("agent_step") != resumed_epoch * STEPS_PER_EPOCH:
            raise AssertionError(f"trainer state agent_step {trainer_state.get('agent_step')}")
    return len(infos)


def cmd_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the same reduction order in every process
    with CheckpointManager(args.out, RUN_NAME, background=True) as mgr:
        start = mgr.start_run(make_model)
        model = start.agent
        if start.resumed:
            checked = verify(mgr, start.epoch, start.trainer_state)
            print(f"verified {checked} committed checkpoint(s), latest epoch {start.epoch}", flush=True)
        print(f"resumed from step {start.epoch if start.resumed else 0}", flush=True)
        optimizer = make_optimizer(model)
        for epoch in range(start.epoch + 1, args.epochs + 1):
            loss = train_epoch(model, optimizer, epoch)
            mgr.save_agent(model, epoch, metadata(epoch, loss))
            mgr.save_trainer_state(optimizer, epoch, epoch * STEPS_PER_EPOCH)
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    path = find_latest_checkpoint(f"{args.out}/checkpoints")
    if path is None:
        print("no committed checkpoint")
        return 1
    print(path.rsplit("/", 1)[-1], digest(load_checkpoint(path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="resume (verifying every committed checkpoint) and train to --epochs")
    train.add_argument("out", help="the run directory ({out})")
    train.add_argument("--epochs", type=int, default=3)
    train.set_defaults(run=cmd_train)
    dig = sub.add_parser("digest", help="the latest committed checkpoint's name and weight hash")
    dig.add_argument("out")
    dig.set_defaults(run=cmd_digest)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
