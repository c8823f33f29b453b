"""Sharding benchmark: what a save of an FSDP2 agent costs each rank, bgsave against DCP's own async_save.

For each world size (``--ranks``, default 2 and 4) and agent size (``--sizes`` in MB of float32
parameters, default 14 and 256: ``BenchModel`` s, whose Adam state is twice that), ranks are spawned on
this machine (``torch.multiprocessing``, gloo on 127.0.0.1, one torch thread each, a free port and a
deadline per run). Each rank shards the agent with FSDP2 (``fully_shard`` per layer, then the root, on
a CPU device mesh) and trains it with Adam on a fixed random batch of its own. Every round runs each
method once, in a balanced order (over four rounds each method follows every other one once); before
each save ``--steps`` training steps (timed apart, not counted) give it fresh state, and all ranks
leave a barrier together:

  full     bgsave ``sharding="full"``: ``save_at_interval(model, e, interval=1, optimizer=opt)``; every
           rank joins the gather of the full model and optimizer state dicts to rank 0 (CPU offload) in
           the call, rank 0 snapshots it and writes ``model_e.pt`` + ``trainer_e.pt`` in the background
  dcp      bgsave ``sharding="dcp"``: the same call; every rank stages its shards with DCP's
           ``async_save`` on bgsave's DCP gloo group, rank 0's worker commits the sidecar after the future
  direct   DCP used directly: wait for the previous future, then
           ``async_save({"model": get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, o)},
           process_group=g)`` on a gloo group made for it (what bgsave's "dcp" does, without bgsave)
  gather   a reference, not a save: the two full-state-dict gathers of "full" alone (no write)

  stall    (every rank) how long the save call blocked the caller
  durable  (every rank) from the call until ``mgr.wait()`` / ``future.result()`` returned, called at
           once after it (for "dcp" and "direct" the previous save is always durable by the next call)

Per method: each rank's median, and the median over saves of the slowest rank's figure (FSDP's next
collective waits for the slowest rank, so that is what training loses). Medians after one warm-up
round; the files of a save are deleted after it (rank 0, untimed), then ``--settle`` seconds.

Targets, as ratios of this run (slowest rank): dcp stall <= 1.2x direct's. Reported beside it: full's
stall against dcp's (the price of a whole-agent file), and the durable ratios.

Usage::

    python benchmarks/bench_sharding.py                      # 2 and 4 ranks, 14 and 256 MB, 3 rounds
    python benchmarks/bench_sharding.py --ranks 2 --sizes 1 --repeats 1 --settle 0

Prints a table and writes ``benchmarks/results/sharding_<date>.json`` (git SHA, machine, every sample)
after each run, so a run stopped by its deadline keeps what was measured (``"complete": false``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import resource
import shutil
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.measure import BenchModel, model_bytes, parse_sizes
from harness.report import MB, RESULTS_DIR, load, make_target, write_report

from bgsave import CheckpointManager

METHODS = ("full", "dcp", "direct", "gather")
# The order of the methods in a round: a Williams design (each method follows every other one once
# in four rounds), so that what the previous save left behind (freed memory to fault in again, the
# page cache) does not always fall on the same method.
ORDERS = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))
SAVES = ("full", "dcp", "direct")  # the methods that write (and so have a time to durable)
BATCH = 8
LR = 1e-5
DCP_TARGET = 1.2  # bgsave "dcp" stall / DCP async_save used directly, slowest rank


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}")
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- the ranks -----------------------------------------------------------------------------------
class Rank:
    """One rank: the FSDP2 agent, its optimizer, the three ways of saving it, and its samples."""

    def __init__(self, rank: int, world: int, size_mb: int, work: Path, timeout_s: float, settle: float) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.rank, self.work, self.settle = rank, work, settle
        self.full = CheckpointManager(work / "full", "bench", sharding="full", collective_timeout_s=timeout_s)
        self.dcp = CheckpointManager(work / "dcp", "bench", sharding="dcp", collective_timeout_s=timeout_s)

        def make_agent() -> BenchModel:
            torch.manual_seed(0)
            return BenchModel(size_mb)

        # A new run: rank 0's make_agent() is saved as epoch 0 and reaches every rank. The "dcp" run
        # starts from the same agent: rank 0 hands over its own (once: nothing keeps it after), the
        # others get it broadcast.
        started = self.full.start_run(make_agent)
        handed = [started.agent]
        started_dcp = self.dcp.start_run(handed.pop)
        handed.clear()
        model = started_dcp.agent
        self.agent_mb = model_bytes(model) / MB
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        started.restore(self.optimizer, model=model)  # a new run: nothing to restore
        started_dcp.restore(self.optimizer, model=model)
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(BATCH, model.config["width"], generator=g)
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))  # "direct"'s own
        self.future: Any = None
        (work / "direct").mkdir(exist_ok=True)

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            self.model(self.x).square().mean().backward()
            self.optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    # -- the methods: save (the stall), then make it durable --
    def save(self, method: str, epoch: int) -> None:
        if method == "full":
            self.full.save_at_interval(self.model, epoch, interval=1, optimizer=self.optimizer)
        elif method == "dcp":
            self.dcp.save_at_interval(self.model, epoch, interval=1, optimizer=self.optimizer)
        elif method == "direct":
            self.direct_save(epoch)
        else:
            self.gather()

    def direct_save(self, epoch: int) -> None:
        """DCP's async_save as bgsave's "dcp" calls it: the previous save first, one in flight."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        from torch.distributed.checkpoint.state_dict_saver import async_save

        if self.future is not None:
            self.future.result()
        state = {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }
        self.future = async_save(state, checkpoint_id=str(self.direct_path(epoch)), process_group=self.group)

    def gather(self) -> None:
        """The two gathers of sharding="full" (rank 0 keeps the CPU copies, the others get empty dicts)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        get_model_state_dict(self.model, options=options)
        get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def wait(self, method: str) -> None:
        if method == "full":
            self.full.wait()
        elif method == "dcp":
            self.dcp.wait()
        elif method == "direct":
            self.future.result()

    def direct_path(self, epoch: int) -> Path:
        return self.work / "direct" / f"step_{epoch:04d}"

    def clean(self, method: str, epoch: int) -> int:
        """Rank 0: delete what the save of ``epoch`` wrote (the sidecar first); its size in bytes."""
        if method == "direct":
            paths = [self.direct_path(epoch)]
        elif method in ("full", "dcp"):
            folder = Path((self.full if method == "full" else self.dcp).checkpoint_dir)
            paths = [folder / f"model_{epoch:04d}.yaml", *sorted(folder.glob(f"*_{epoch:04d}.*"))]
        else:
            return 0
        size = 0
        for path in dict.fromkeys(paths):
            if path.is_dir():
                size += tree_bytes(path)
                shutil.rmtree(path)
            elif path.exists():
                size += path.stat().st_size
                path.unlink()
        return size

    def close(self) -> None:
        if self.future is not None:
            self.future.result()
        self.dcp.close()
        self.full.close()
        dist.destroy_process_group(self.group)


def rank_main(rank: int, world: int, port: int, size_mb: int, args: dict[str, Any], work_dir: str) -> None:
    """One rank: rotating rounds of one save per method; its samples go to ``rank{rank}.json``."""
    torch.set_num_threads(1)
    work = Path(work_dir)
    timeout = timedelta(seconds=args["timeout_s"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    try:
        me = Rank(rank, world, size_mb, work, args["timeout_s"], args["settle"])
        first_steps = me.steps(2)  # Adam's state exists from the first step on
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        epoch = 0
        steps_s: list[float] = []
        for round_ in range(args["repeats"] + 1):  # round 0 warms up: first-use costs, groups, buffers
            order = [METHODS[i] for i in ORDERS[(round_ - 1) % len(ORDERS) if round_ else 0]]
            for method in order:
                epoch += 1
                # Fresh state for each save (not counted); the gathers alone do not need it.
                steps = me.steps(args["steps"]) if method in SAVES else []
                dist.barrier()
                start = time.perf_counter()
                me.save(method, epoch)
                stall = time.perf_counter() - start
                me.wait(method)
                durable = time.perf_counter() - start
                size = me.clean(method, epoch) if rank == 0 else 0
                if rank == 0 and args["settle"] > 0:
                    time.sleep(args["settle"])  # freed memory goes back to the host (VM page reporting)
                dist.barrier()
                sample: dict[str, Any] = {"round": round_, "epoch": epoch, "stall_s": stall, "steps_s": steps}
                if method in SAVES:
                    sample["durable_s"] = durable
                if rank == 0:
                    sample["bytes"] = size
                samples[method].append(sample)
                steps_s += steps
            if rank == 0:
                done = "  ".join(
                    f"{m} {samples[m][-1]['stall_s']:.3f}/{samples[m][-1].get('durable_s', 0):.2f}" for m in order
                )
                print(f"  round {round_} (stall/durable s, rank 0): {done}; step {median(steps_s):.2f} s", flush=True)
        me.close()
        out = {
            "rank": rank,
            "agent_mb": me.agent_mb,
            "local_params_mb": sum(p.to_local().numel() * p.element_size() for p in me.model.parameters()) / MB,
            "first_steps_s": first_steps,
            "samples": samples,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        (work / f"rank{rank}.json").write_text(json.dumps(out))
    except BaseException:
        (work / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, size_mb: int, args: argparse.Namespace, target: Path) -> list[dict[str, Any]]:
    """``world`` ranks for one agent size, with a deadline; every rank's samples, in rank order."""
    work = target / f"ranks{world}_{size_mb}"
    work.mkdir()
    settings = {k: getattr(args, k) for k in ("repeats", "steps", "settle", "timeout_s")}
    context = mp.spawn(rank_main, args=(world, free_port(), size_mb, settings, str(work)), nprocs=world, join=False)
    deadline = time.monotonic() + args.deadline_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks x {size_mb} MB ran past --deadline-s {args.deadline_s:g}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]


# ---- the figures ---------------------------------------------------------------------------------
def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the timed rounds: each rank's, and the slowest rank's per save; the ratios and targets."""
    methods: dict[str, Any] = {}
    for method in METHODS:
        timed = [[s for s in r["samples"][method] if s["round"] > 0] for r in ranks]
        row: dict[str, Any] = {}
        for key in ("stall_s", "durable_s") if method in SAVES else ("stall_s",):
            per_save = list(zip(*[[s[key] for s in samples] for samples in timed], strict=True))
            row[key] = {
                "slowest": median([max(save) for save in per_save]),
                "per_rank": [median(list(v)) for v in zip(*per_save, strict=True)],
                "samples": [list(v) for v in zip(*per_save, strict=True)],
            }
        if method in SAVES:
            row["bytes"] = median([s["bytes"] for s in timed[0]])
        row["first_stall_s"] = [r["samples"][method][0]["stall_s"] for r in ranks]
        methods[method] = row

    def ratio(a: str, b: str, key: str, which: str = "slowest") -> float:
        if which == "rank0":
            return float(methods[a][key]["per_rank"][0] / methods[b][key]["per_rank"][0])
        return float(methods[a][key][which] / methods[b][key][which])

    steps = [t for r in ranks for m in METHODS for s in r["samples"][m] if s["round"] > 0 for t in s["steps_s"]]
    out: dict[str, Any] = {
        "agent_mb": ranks[0]["agent_mb"],
        "local_params_mb": [r["local_params_mb"] for r in ranks],
        "step_s": median(steps),
        "peak_rss_mb": [r["peak_rss_bytes"] / MB for r in ranks],
        "methods": methods,
        "ratios": {
            "dcp_vs_direct_stall": ratio("dcp", "direct", "stall_s"),
            "dcp_vs_direct_stall_rank0": ratio("dcp", "direct", "stall_s", "rank0"),
            "dcp_vs_direct_durable": ratio("dcp", "direct", "durable_s"),
            "full_vs_dcp_stall": ratio("full", "dcp", "stall_s"),
            "full_vs_dcp_stall_rank0": ratio("full", "dcp", "stall_s", "rank0"),
            "full_vs_dcp_durable": ratio("full", "dcp", "durable_s"),
            "full_vs_gather_stall": ratio("full", "gather", "stall_s"),
        },
        "raw": ranks,
    }
    value = out["ratios"]["dcp_vs_direct_stall"]
    out["targets"] = {"dcp_vs_direct_stall": {"value": value, "target": DCP_TARGET, "met": value <= DCP_TARGET}}
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    ms = 1e3

    def stall(row: dict[str, Any], m: str) -> str:
        s = row["methods"][m]["stall_s"]
        return f"{s['slowest'] * ms:8.1f} ({s['per_rank'][0] * ms:.1f})"

    def durable(row: dict[str, Any], m: str) -> str:
        return f"{row['methods'][m]['durable_s']['slowest']:7.3f}"

    print(
        "\nstall: ms, slowest rank (rank 0's in brackets); durable: s, slowest rank; medians\n"
        f"{'ranks':>5} {'agent':>7} | {'stall: full':>17} {'dcp':>15} {'direct':>15} {'gather':>15} | "
        f"{'dcp/direct':>10} {'full/dcp':>8} | {'durable: full':>13} {'dcp':>7} {'direct':>7} | "
        f"{'dcp/direct':>10} {'full/dcp':>8} | {'step':>6}"
    )
    for key, row in results.items():
        world, size = key.split("x")
        if "error" in row:
            print(f"{world:>5} {size + ' MB':>7} | did not complete: {row['error']}")
            continue
        r = row["ratios"]
        print(
            f"{world:>5} {size + ' MB':>7} | {stall(row, 'full'):>17} {stall(row, 'dcp'):>15} "
            f"{stall(row, 'direct'):>15} {stall(row, 'gather'):>15} | {r['dcp_vs_direct_stall']:9.2f}x "
            f"{r['full_vs_dcp_stall']:7.2f}x | {durable(row, 'full'):>13} {durable(row, 'dcp'):>7} "
            f"{durable(row, 'direct'):>7} | {r['dcp_vs_direct_durable']:9.2f}x {r['full_vs_dcp_durable']:7.2f}x"
            f" | {row['step_s']:5.2f}s"
        )
    for key, row in results.items():
        for name, check in row.get("targets", {}).items():
            verdict = "met" if check["met"] else "NOT met"
            print(f"target {key} {name}: {check['value']:.3g} <= {check['target']:g}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=parse_ints, default=[2, 4], help="world sizes (2,4)")
    parser.add_argument("--sizes", type=parse_sizes, default=[14, 256], help="agent sizes in MB (14,256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up round (3)")
    parser.add_argument("--steps", type=int, default=1, help="training steps before each save (1)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds to wait after deleting a save (0.5)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="the ranks' collective timeout (300)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="wall limit of one spawned run (420)")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (results/sharding_<date>.json)")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    started = dt.datetime.now(dt.timezone.utc)
    # One save of the largest agent on disk at a time: weights + Adam state (x3), twice over for headroom.
    target, info = make_target(args.dir, "bench-sharding-", 6 * max(args.sizes))
    out = args.out or RESULTS_DIR / f"sharding_{started:%Y-%m-%d}.json"
    settings = {
        k: getattr(args, k) for k in ("ranks", "sizes", "repeats", "steps", "settle", "timeout_s", "deadline_s")
    }
    results: dict[str, dict[str, Any]] = {}

    def write(complete: bool) -> None:
        body = {
            "machine": info,
            "load_at_end": load(),
            "settings": settings,
            "batch": BATCH,
            "complete": complete,
            "results": results,
        }
        write_report(out, "sharding", started, body)

    try:
        for world in args.ranks:
            for size in args.sizes:
                key = f"{world}x{size}"
                print(f"{world} ranks, {size} MB ...", flush=True)
                begin = time.monotonic()
                try:
                    results[key] = summarize(spawn(world, size, args, target))
                except Exception as exc:  # a run that failed (memory, deadline) is recorded, the others go on
                    results[key] = {"error": f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"}
                    print(f"  failed: {results[key]['error']}", flush=True)
                results[key]["wall_s"] = time.monotonic() - begin
                write(complete=False)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    print_table(results)
    write(complete=all("error" not in r for r in results.values()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
