"""bgsave under an NCCL training group, on one GPU: the ``cpu:gloo,cuda:nccl`` setup a torchrun job uses.

One rank per process (one H200 holds one NCCL rank: NCCL refuses two ranks on one device), so
this checks what only a GPU shows: a DDP model on ``cuda:0`` trained on the NCCL backend while
bgsave snapshots it (pinned copies) and writes on rank 0; ``start_run`` resuming onto the GPU
(``map_location``); an FSDP2 agent on CUDA saved with ``sharding="full"`` and ``"dcp"`` (DCP's
``async_save`` needs the CPU backend, which ``cpu:gloo`` gives), and an FSDP1 agent (it needs an
accelerator) with ``"full"``. The multi-rank collectives (bgsave's
own gloo group) are tested on CPU in CI (tests/test_distributed.py); under torchrun on a node of
several GPUs run this with ``--nproc-per-node N``.

Usage::

    torchrun --standalone --nproc-per-node 1 scripts/nccl_check.py --out OUT.json
    python scripts/nccl_check.py --device cpu --out /tmp/x.json     # the same path on gloo, no GPU

Prints per-save stall figures and writes them to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bgsave import CheckpointManager


class Net(torch.nn.Module):
    """A plain MLP: three width x width layers (50 MB of float32 at the default width)."""

    def __init__(self, width: int = 2048) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)
        self.c = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    model(torch.randn(64, 2048, device=device)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _stalls(
    mgr: CheckpointManager, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> list[float]:
    out = []
    for epoch in range(1, 6):
        _step(model, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        mgr.save_at_interval(model, epoch, interval=1, optimizer=optimizer)
        out.append(time.perf_counter() - start)
    mgr.wait()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu for a dry run)")
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=120))
    device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    report: dict[str, object] = {"backend": backend, "world_size": dist.get_world_size(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        # DDP on NCCL: rank 0 snapshots and writes, the training group never sees bgsave's traffic.
        mgr = CheckpointManager(Path(tmp, "ddp"), "nccl-ddp", collective_timeout_s=120)
        start = mgr.start_run(Net)
        model = DistributedDataParallel(start.agent.to(device))
        optimizer = torch.optim.Adam(model.parameters())
        report["ddp_stall_s"] = _stalls(mgr, model, optimizer, device)
        mgr.close()
        again = CheckpointManager(Path(tmp, "ddp"), "nccl-ddp", collective_timeout_s=120)
        resumed = again.start_run(Net, map_location=device)
        report["ddp_resumed_epoch"] = resumed.epoch
        report["ddp_resumed_on"] = str(next(resumed.agent.parameters()).device)
        again.close()
        # FSDP2 on the device, both ways of saving it.
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for sharding in ("full", "dcp"):
            mgr = CheckpointManager(
                Path(tmp, sharding), f"nccl-{sharding}", sharding=sharding, collective_timeout_s=120
            )
            start = mgr.start_run(Net)
            model = start.agent.to(device)
            for block in (model.a, model.b, model.c):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.Adam(model.parameters())
            report[f"fsdp_{sharding}_stall_s"] = _stalls(mgr, model, optimizer, device)
            mgr.close()
        if device.type == "cuda":  # FSDP1 needs an accelerator: not testable in CI
            from torch.distributed.fsdp import FullyShardedDataParallel

            mgr = CheckpointManager(Path(tmp, "fsdp1"), "nccl-fsdp1", collective_timeout_s=120)
            start = mgr.start_run(Net)
            model = FullyShardedDataParallel(start.agent.to(device), use_orig_params=True)
            optimizer = torch.optim.Adam(model.parameters())
            report["fsdp1_full_stall_s"] = _stalls(mgr, model, optimizer, device)
            mgr.close()
            loaded = torch.load(Path(tmp, "fsdp1", "checkpoints", "model_0005.pt"), weights_only=False)
            report["fsdp1_file_class"] = type(loaded).__name__  # Net: the plain module, loadable anywhere
    for key, value in report.items():
        shown = f"median {statistics.median(value) * 1e3:.1f} ms of {len(value)}" if isinstance(value, list) else value
        print(f"{key}: {shown}")
    Path(args.out).write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
