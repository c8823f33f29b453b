"""Mirror and parallel parts: bgsave's uploads and loads against boto3's TransferManager, on loopback S3.

For each of --sizes (MiB of float32 weights, default 128 and 1024), rounds of every method in balanced
orders (each right after every other equally often over 2n rounds for an odd n of methods, n for an
even n: 18 for the 9 uploads), medians of --repeats, every sample on a fresh prefix (deleted
afterwards, untimed, then --settle seconds of rest):

  transfer_manager   boto3 ``upload_file`` of the committed ``model_0001.pt`` (TransferConfig: 8 MiB parts,
                     max_concurrency=10): the reference every upload is held to
  mirror_upload      a local run directory with ``mirror="s3://..."``: ``save_agent`` then ``wait()``; the time
                     is ``mirror_status()``'s ``upload_s`` for the epoch (``wall_s``: the call to the end of wait)
  mirror_upload_later  the same manager's next mirrored save, as in a training loop (epoch 1 first, untimed;
                     its storage has kept the part buffers of that upload)
  direct_s3          ``save_agent`` + ``wait()`` on an ``s3://`` run directory: time to durable (a fresh
                     manager's first save: the lock, the listings and a cold snapshot buffer included)
  direct_s3_later    the same manager's next save, as in a training loop (epoch 1 saved first, untimed)
  s3fs_put           ``fs.put_file`` of the same file: s3fs's own upload, one part at a time (reference)
Three rows take the mirror's time apart (no target; the first two upload transfer_manager's cold file):
  bgsave_upload_file       the mirror's upload of the weights alone: ``upload_file`` of bgsave's S3 storage
                           (its parallel parts), held to transfer_manager
  transfer_manager_commit  transfer_manager, then one ``put_object`` of the epoch's sidecar (its commit): what
                           a mirrored epoch sends, sent by TransferManager; mirror_upload is also held to it
  transfer_manager_fresh   TransferManager in the mirror's place: a local save (a fresh manager, no mirror), then
                           at once ``upload_file`` of the file it committed; mirror_upload is also held to it
Loads of one checkpoint uploaded beforehand (untimed), each into a fresh process-like reader:
  download_torch_load  boto3 ``download_file`` (same TransferConfig) to a temp file, then ``torch.load``
  load_checkpoint      ``bgsave.load_checkpoint("s3://.../model_0001.pt")``
  load_agent_s3        ``CheckpointManager("s3://run", name).load_agent()`` (construction included)
  load_agent_mirror    ``CheckpointManager(empty_dir, name, mirror=url).load_agent()`` (construction included)
Through a capped proxy (harness/capped_proxy.py: each connection held to --proxy-mbps MB/s each way, as a
WAN link per connection), for --proxy-sizes: the same uploads with 8 parts in flight against one
(``max_concurrency=8`` / ``1``; TransferManager 10 / 1 for reference), and how many connections moved
bytes at the same time (median over 100 ms slots; ``connections used``: those that carried >= 1 MiB).
Memory, for --memory-sizes, in separate untimed samples: the tracemalloc peak (Python allocations: the
parts' buffers; not torch's tensors) and the peak RSS above the start (which also holds the snapshot,
one copy of the model) during a TransferManager upload, a direct save, a mirrored save, and the same
local save without a mirror (what of the mirrored save's peak is not its upload's); against the
expectation max_concurrency x part size (``bgsave.storage.parts.PART_SIZE``).

Targets (the issue), ratios within this run: mirror upload <= 1.0x TransferManager; direct durable <= 1.1x
TransferManager; through the proxy, 8 parts >= 4x faster than one; load of the latest <= 1.0x
download + torch.load. Beside each, the paired ratio (the median of each round's own ratio) and its 90%
bootstrap interval: where that holds the limit, this run cannot tell the target met from missed. A part
of bgsave not built yet (no ``mirror`` / ``max_concurrency`` parameter) is skipped with a note, and its
targets are SKIP.

The S3 server is moto's, in its own process on 127.0.0.1 (as in the crash tests); it writes at about
45-50 MiB/s here, so absolute times say more about moto than S3: the ratios are the result. boto3 and
s3fs run with their defaults (both compute a CRC32 of every part). The server keeps the memory it frees
(:data:`SERVER_ENV`): moto joins a multipart upload's parts in fresh memory at its complete (some four
copies of the object), and this VM hands freed memory back to the host (free page reporting), which then
costs a host fault per page when touched again, so the complete of 128 MiB took 0.3-0.9 s as it came: half
of an upload, and most of its noise. Reusing its own memory it takes 0.11-0.18 s (trace_s3_save.py, the
first complete of a server excepted). That cost is the stand-in's, not S3's, and lay on every upload
alike; ``--server-returns-memory`` runs the server as the results up to 2026-12-04 did.

Usage:
    python benchmarks/bench_mirror.py [--sizes 128,1024] [--repeats 3] [--proxy-mbps 20] [--proxy-sizes 128]
        [--memory-sizes 128,1024] [--load-sizes 128,1024] [--unsigned-payload] [--settle 3] [--server-returns-memory]
        [--out benchmarks/results/mirror_DATE.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import inspect
import os
import random
import shutil
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.capped_proxy import CappedProxy, check_cap
from harness.measure import MB, BenchModel, PeakRSS, balanced_orders, model_bytes, own_rss
from harness.report import RESULTS_DIR, make_target, versions, write_report

import crash_child  # the moto-server-in-its-own-process helper the crash tests use
from bgsave import CheckpointManager, load_checkpoint
from bgsave.storage import open_storage

PARAMS = inspect.signature(CheckpointManager).parameters
HAS_MIRROR = "mirror" in PARAMS
HAS_CONCURRENCY = "max_concurrency" in PARAMS
DEFAULT_CONCURRENCY = PARAMS["max_concurrency"].default if HAS_CONCURRENCY else None
TM_PART = 8 * MB
TM_CONCURRENCY = 10
RUN = "bench"
PT = "checkpoints/model_0001.pt"
SIDECAR = "checkpoints/model_0001.yaml"
# glibc in the S3 server's process keeps what it frees: no chunk of its own mapping, no trimming, one arena.
SERVER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_ARENA_MAX": "1"}
# What else mirror_upload is held to (no target): TransferManager sending what a mirrored epoch sends, and where.
MIRROR_REFERENCES = ("transfer_manager_commit", "transfer_manager_fresh")
TARGETS = {  # name: (limit, "<=" or ">=")
    "mirror_upload / transfer_manager": (1.0, "<="),
    "direct_s3 / transfer_manager": (1.1, "<="),
    "one connection / parallel parts (proxy)": (4.0, ">="),
    "load_agent_mirror / download_torch_load": (1.0, "<="),
    "load_agent_s3 / download_torch_load": (1.0, "<="),
    "load_checkpoint / download_torch_load": (1.0, "<="),
}


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-returns-memory",
        action="store_true",
        help="run the S3 server with glibc's defaults, not SERVER_ENV (as the results up to 2026-12-04)",
    )


def server_env(args: argparse.Namespace) -> dict[str, str] | None:
    """The S3 server's extra environment (see the module docstring)."""
    return None if args.server_returns_memory else SERVER_ENV


def part_size() -> tuple[int, str]:
    try:
        from bgsave.storage import parts

        return int(parts.PART_SIZE), "bgsave.storage.parts.PART_SIZE"
    except (ImportError, AttributeError):
        return 8 * MB, "assumed 8 MiB (bgsave.storage.parts.PART_SIZE not found)"


def concurrency(n: int | None) -> dict[str, Any]:
    return {"max_concurrency": n} if HAS_CONCURRENCY and n is not None else {}


def endpoint_options(endpoint: str | None) -> dict[str, Any] | None:
    return None if endpoint is None else {"client_kwargs": {"endpoint_url": endpoint}}


# ---- S3 -------------------------------------------------------------------------------------------
class S3:
    """boto3 clients (one per TransferConfig concurrency) and s3fs on one endpoint; buckets and clean-up."""

    def __init__(self, endpoint: str) -> None:
        import boto3
        import botocore.config
        import s3fs
        from boto3.s3.transfer import TransferConfig

        self.endpoint = endpoint
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, config=botocore.config.Config(max_pool_connections=TM_CONCURRENCY)
        )
        self.transfer = {
            n: TransferConfig(multipart_threshold=TM_PART, multipart_chunksize=TM_PART, max_concurrency=n)
            for n in (1, TM_CONCURRENCY)
        }
        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)

    def make_bucket(self, bucket: str) -> None:
        self.client.create_bucket(Bucket=bucket)
        self.client.head_bucket(Bucket=bucket)  # and the connection pool is warm

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


# ---- the methods ----------------------------------------------------------------------------------
class Size:
    """One model size: the model, its committed file, the bucket, and every way of moving it."""

    def __init__(self, size_mb: int, s3: S3, scratch: Path, bucket: str) -> None:
        self.size_mb = size_mb
        self.s3 = s3
        self.scratch = scratch
        self.bucket = bucket
        self.model = BenchModel(size_mb)
        s3.make_bucket(bucket)
        source = scratch / f"source-{size_mb}"
        with CheckpointManager(source, RUN) as mgr:  # the committed file the uploads start from
            mgr.save_agent(self.model, 1)
        self.file = source / PT
        self.file_bytes = self.file.stat().st_size
        self.sidecar = (source / SIDECAR).read_bytes()

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def clean(self, prefix: str) -> None:
        self.s3.delete_prefix(self.bucket, prefix + "/")
        shutil.rmtree(self.scratch / prefix.replace("/", "-"), ignore_errors=True)

    def drop_cached_file(self) -> None:
        """Drop the committed file's pages: bgsave writes checkpoints past the page cache, so the mirror
        reads a fresh one from disk, and the uploads of this file compared with it must too."""
        if hasattr(os, "posix_fadvise"):
            fd = os.open(self.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    # uploads: each returns a sample, {"s": the time compared, ...}
    def transfer_manager(
        self, prefix: str, s3: S3 | None = None, n: int = TM_CONCURRENCY, file: Path | None = None
    ) -> dict[str, Any]:
        s3 = s3 or self.s3
        if file is None:  # the committed file of long ago; a file just committed is past the page cache already
            self.drop_cached_file()
        start = time.perf_counter()
        s3.client.upload_file(str(file or self.file), self.bucket, f"{prefix}/{PT}", Config=s3.transfer[n])
        return {"s": time.perf_counter() - start}

    def transfer_manager_fresh(self, prefix: str) -> dict[str, Any]:
        local = self.scratch / prefix.replace("/", "-")
        with CheckpointManager(local, RUN) as mgr:
            mgr.save_agent(self.model, 1)
            mgr.wait()
            return self.transfer_manager(prefix, file=local / PT)

    def transfer_manager_commit(self, prefix: str) -> dict[str, Any]:
        upload = self.transfer_manager(prefix)["s"]
        start = time.perf_counter()
        self.s3.client.put_object(Bucket=self.bucket, Key=f"{prefix}/{SIDECAR}", Body=self.sidecar)
        return {"s": upload + time.perf_counter() - start, "sidecar_s": time.perf_counter() - start}

    def bgsave_upload_file(self, prefix: str) -> dict[str, Any]:
        storage = open_storage(self.url(prefix), argument="mirror")  # s3fs's cached filesystem: the mirror's
        self.drop_cached_file()
        start = time.perf_counter()
        storage.upload_file(str(self.file), storage.join(PT))
        return {"s": time.perf_counter() - start}

    def s3fs_put(self, prefix: str) -> dict[str, Any]:
        self.drop_cached_file()
        start = time.perf_counter()
        self.s3.fs.put_file(str(self.file), f"{self.bucket}/{prefix}/{PT}")
        return {"s": time.perf_counter() - start}

    def timed_save(self, mgr: CheckpointManager, later: bool, mark: Callable[[], None]) -> tuple[int, float, float]:
        """One timed save by ``mgr``: its epoch, its stall, and the time to the end of its ``wait()``.

        ``later``: epoch 2, after an untimed epoch 1. ``mark``: called right before it (trace_s3_save.py's).
        """
        if later:
            mgr.save_agent(self.model, 1)
            mgr.wait()
        epoch = 2 if later else 1
        mark()
        start = time.perf_counter()
        mgr.save_agent(self.model, epoch)
        stall = time.perf_counter() - start
        mgr.wait()
        return epoch, stall, time.perf_counter() - start

    def direct_s3(
        self,
        prefix: str,
        endpoint: str | None = None,
        n: int | None = None,
        later: bool = False,
        mark: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        with CheckpointManager(
            self.url(prefix), RUN, storage_options=endpoint_options(endpoint), **concurrency(n)
        ) as mgr:
            _, stall, durable = self.timed_save(mgr, later, mark)
        return {"s": durable, "stall_s": stall}

    def mirror_upload(
        self,
        prefix: str,
        endpoint: str | None = None,
        n: int | None = None,
        later: bool = False,
        mark: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        local = self.scratch / prefix.replace("/", "-")
        kwargs = {"mirror": self.url(prefix), "mirror_storage_options": endpoint_options(endpoint), **concurrency(n)}
        with CheckpointManager(local, RUN, **kwargs) as mgr:
            epoch, stall, wall = self.timed_save(mgr, later, mark)
            (status,) = [s for s in mgr.mirror_status() if s.epoch == epoch]
        if status.state != "mirrored" or status.upload_s is None:
            raise RuntimeError(
                f"epoch {epoch} is {status.state!r} (upload_s={status.upload_s!r}, error={status.error!r})"
            )
        return {"s": float(status.upload_s), "wall_s": wall, "stall_s": stall}

    def local_save(self, prefix: str) -> dict[str, Any]:
        with CheckpointManager(self.scratch / prefix.replace("/", "-"), RUN) as mgr:
            start = time.perf_counter()
            mgr.save_agent(self.model, 1)
            mgr.wait()
        return {"s": time.perf_counter() - start}

    # loads: of what load_setup() uploaded
    def load_setup(self) -> None:
        with CheckpointManager(self.url("load-run"), RUN) as mgr:
            mgr.save_agent(self.model, 1)
        if HAS_MIRROR:
            with CheckpointManager(self.scratch / "load-mirror-source", RUN, mirror=self.url("load-mirror")) as mgr:
                mgr.save_agent(self.model, 1)
            shutil.rmtree(self.scratch / "load-mirror-source")

    def _check(self, agent: Any) -> None:
        first = next(iter(self.model.parameters()))
        if not torch.equal(next(iter(agent.parameters())), first):
            raise RuntimeError("the loaded agent's weights differ from the saved ones")

    def download_torch_load(self, _: str) -> dict[str, Any]:
        path = self.scratch / "download.pt"
        start = time.perf_counter()
        self.s3.client.download_file(self.bucket, f"load-run/{PT}", str(path), Config=self.s3.transfer[TM_CONCURRENCY])
        downloaded = time.perf_counter() - start
        agent = torch.load(path, weights_only=False)
        elapsed = time.perf_counter() - start
        path.unlink()
        self._check(agent)
        return {"s": elapsed, "download_s": downloaded}

    def load_checkpoint(self, _: str) -> dict[str, Any]:
        start = time.perf_counter()
        agent = load_checkpoint(f"{self.url('load-run')}/{PT}")
        elapsed = time.perf_counter() - start
        self._check(agent)
        return {"s": elapsed}

    def _load_agent(self, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
        start = time.perf_counter()
        mgr = CheckpointManager(run_dir, RUN, **kwargs)
        opened = time.perf_counter() - start
        try:
            agent = mgr.load_agent()
            elapsed = time.perf_counter() - start
        finally:
            mgr.close()
        self._check(agent)
        return {"s": elapsed, "open_s": opened}

    def load_agent_s3(self, _: str) -> dict[str, Any]:
        return self._load_agent(self.url("load-run"))

    def load_agent_mirror(self, prefix: str) -> dict[str, Any]:
        local = self.scratch / prefix.replace("/", "-")
        return self._load_agent(local, mirror=self.url("load-mirror"))


# ---- rounds ---------------------------------------------------------------------------------------
Method = Callable[[str], dict[str, Any]]


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": samples}
    times = [s["s"] for s in samples if "s" in s]
    errors = [s["error"] for s in samples if "error" in s]
    if times:
        out.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
        for key in sorted({k for s in samples for k in s} - {"s", "round", "after", "error", "proxy"}):
            values = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
            if values:
                out[f"{key}_median"] = statistics.median(values)
    if errors:
        out["errors"] = errors
    return out


def run_rounds(
    size: Size,
    methods: dict[str, Method],
    args: argparse.Namespace,
    tag: str,
    proxy: CappedProxy | None = None,
) -> dict[str, dict[str, Any]]:
    """Each method once per round, in balanced orders; a fresh prefix per sample, cleaned after.

    The orders are :func:`~harness.measure.balanced_orders`: over every ``2n`` rounds (``n`` rounds for an
    even ``n`` of methods) each method comes right after every other equally often. Each sample records
    the method that ran before it (``after``): what one leaves behind lands on all the others alike.
    Rotating one order, as this did up to 2026-12-06, kept each method's predecessor fixed.

    After each clean-up the run waits ``--settle`` seconds (harness/measure.py's ``run_rounds`` says why):
    every sample frees memory (moto drops the object; a manager its snapshot and parts), and a sample
    that starts while the VM is handing that memory back to the host is slowed by whatever ran before it.
    """
    repeats = args.repeats
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    names = list(methods)
    orders = balanced_orders(len(names))
    previous: str | None = None
    for round_ in range(repeats):
        for name in [names[i] for i in orders[round_ % len(orders)]]:
            prefix = f"{tag}-{name}/{round_}"
            before = proxy.stats() if proxy is not None else None
            sample: dict[str, Any] = {"round": round_, "after": previous}
            try:
                sample.update(methods[name](prefix))
            except Exception as exc:  # a part still being built: recorded, the run goes on
                sample["error"] = f"{type(exc).__name__}: {exc}"
            previous = name
            if proxy is not None and before is not None:
                sample["proxy"] = proxy.stats().since(before)
            size.clean(prefix)
            gc.collect()
            if args.settle > 0:
                time.sleep(args.settle)
            raw[name].append(sample)
            shown = f"{sample['s']:.2f} s" if "s" in sample else sample["error"]
            used = f" ({sample['proxy']['parallel_median']} connections at once)" if "proxy" in sample else ""
            print(f"  {size.size_mb} MiB round {round_ + 1}/{repeats} {tag} {name}: {shown}{used}", flush=True)
    return {name: summarize(samples) for name, samples in raw.items()}


@contextmanager
def memory_sample() -> Iterator[dict[str, int]]:
    gc.collect()
    out: dict[str, int] = {}
    start_rss = own_rss()
    peak = PeakRSS()
    tracemalloc.start()
    try:
        with peak.measure():
            yield out
    finally:
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.update(tracemalloc_peak_bytes=traced, rss_peak_extra_bytes=max(0, peak.peak - start_rss))


# ---- the run --------------------------------------------------------------------------------------
def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    if not num or not den or "median_s" not in num or "median_s" not in den:
        return None
    return float(num["median_s"] / den["median_s"])


def round_ratios(num: dict[str, Any] | None, den: dict[str, Any] | None) -> list[float]:
    """num / den within each round both have a sample of."""
    if not num or not den:
        return []
    den_s = {s["round"]: s["s"] for s in den["samples"] if "s" in s}
    return [s["s"] / den_s[s["round"]] for s in num["samples"] if "s" in s and s["round"] in den_s]


def paired(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    """The median over rounds of num / den within each round: less swayed by the machine drifting between rounds."""
    ratios = round_ratios(num, den)
    return float(statistics.median(ratios)) if ratios else None


def paired_interval(num: dict[str, Any] | None, den: dict[str, Any] | None) -> list[float] | None:
    """A 90% bootstrap interval of :func:`paired` (2,000 resamples of the rounds, fixed seed): how far noise moves it.

    An interval that holds the limit says this run cannot tell the target met from missed.
    """
    ratios = round_ratios(num, den)
    if len(ratios) < 5:
        return None
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return [float(medians[100]), float(medians[1899])]


def target(
    name: str,
    value: float | None,
    where: str,
    note: str = "",
    paired_value: float | None = None,
    interval: list[float] | None = None,
) -> dict[str, Any]:
    """Judged on the ratio of medians; the paired ratio and its interval are shown beside it."""
    limit, op = TARGETS[name]
    met = value is not None and (value <= limit if op == "<=" else value >= limit)
    status = "SKIP" if value is None else "PASS" if met else "MISS"
    return {
        "target": name,
        "where": where,
        "value": value,
        "paired": paired_value,
        "paired_90pct": interval,
        "limit": limit,
        "op": op,
        "status": status,
        "note": note,
    }


def bench_size(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    uploads: dict[str, Method] = {"transfer_manager": size.transfer_manager}
    if HAS_MIRROR:
        uploads["mirror_upload"] = size.mirror_upload
        uploads["mirror_upload_later"] = lambda prefix: size.mirror_upload(prefix, later=True)
    uploads["direct_s3"] = size.direct_s3
    uploads["direct_s3_later"] = lambda prefix: size.direct_s3(prefix, later=True)
    uploads["s3fs_put"] = size.s3fs_put
    uploads["bgsave_upload_file"] = size.bgsave_upload_file
    uploads["transfer_manager_commit"] = size.transfer_manager_commit
    uploads["transfer_manager_fresh"] = size.transfer_manager_fresh
    methods = run_rounds(size, uploads, args, "upload")

    load_results: dict[str, dict[str, Any]] = {}
    if size.size_mb in args.load_sizes:
        size.load_setup()
        loads: dict[str, Method] = {"download_torch_load": size.download_torch_load}
        if HAS_MIRROR:
            loads["load_agent_mirror"] = size.load_agent_mirror
        loads["load_agent_s3"] = size.load_agent_s3
        loads["load_checkpoint"] = size.load_checkpoint
        load_results = run_rounds(size, loads, args, "load")
        size.clean("load-run")
        size.clean("load-mirror")

    tm = methods["transfer_manager"]
    base = load_results.get("download_torch_load")
    out: dict[str, Any] = {
        "size_mb": size.size_mb,
        "weights_bytes": model_bytes(size.model),
        "file_bytes": size.file_bytes,
        "uploads": methods,
        "loads": load_results,
        "ratios": {
            "mirror_upload / transfer_manager": ratio(methods.get("mirror_upload"), tm),
            "mirror_upload_later / transfer_manager": ratio(methods.get("mirror_upload_later"), tm),
            "direct_s3 / transfer_manager": ratio(methods["direct_s3"], tm),
            "direct_s3_later / transfer_manager": ratio(methods["direct_s3_later"], tm),
            "s3fs_put / transfer_manager": ratio(methods["s3fs_put"], tm),
            "bgsave_upload_file / transfer_manager": ratio(methods["bgsave_upload_file"], tm),
            **{
                f"mirror_upload / {ref}": ratio(methods.get("mirror_upload"), methods[ref]) for ref in MIRROR_REFERENCES
            },
            "load_agent_mirror / download_torch_load": ratio(load_results.get("load_agent_mirror"), base),
            "load_agent_s3 / download_torch_load": ratio(load_results.get("load_agent_s3"), base),
            "load_checkpoint / download_torch_load": ratio(load_results.get("load_checkpoint"), base),
        },
    }
    pairs = [(name, methods[name], tm, "transfer_manager") for name in methods]
    if "mirror_upload" in methods:
        pairs += [("mirror_upload", methods["mirror_upload"], methods[ref], ref) for ref in MIRROR_REFERENCES]
    pairs += [(name, load_results[name], base, "download_torch_load") for name in load_results]
    pairs = [pair for pair in pairs if pair[0] != pair[3]]  # not the reference against itself
    out["paired_ratios"] = {f"{name} / {ref}": paired(num, den) for name, num, den, ref in pairs}
    out["paired_90pct"] = {f"{name} / {ref}": paired_interval(num, den) for name, num, den, ref in pairs}
    mirror = methods.get("mirror_upload")
    if mirror and "wall_s_median" in mirror:
        out["ratios"]["mirror wall (save to wait) / transfer_manager"] = mirror["wall_s_median"] / tm["median_s"]
    if size.size_mb in args.memory_sizes:
        out["memory"] = bench_memory(size)
    return out


def bench_memory(size: Size) -> dict[str, Any]:
    parts, source = part_size()
    n = DEFAULT_CONCURRENCY or 1
    out: dict[str, Any] = {
        "part_size_bytes": parts,
        "part_size_source": source,
        "max_concurrency": DEFAULT_CONCURRENCY,
        "expected_extra_bytes": n * parts,
        "transfer_manager_expected_bytes": TM_CONCURRENCY * TM_PART,
        "measured": "tracemalloc peak (Python allocations, all threads) and peak RSS above the start; "
        "local_save: the same save without a mirror (its share of mirror_upload's peak)",
        "samples": {},
    }
    work: dict[str, Method] = {"transfer_manager": size.transfer_manager, "direct_s3": size.direct_s3}
    if HAS_MIRROR:  # and the local save alone: what of the mirrored save's peak is not its upload's
        work["local_save"] = size.local_save
        work["mirror_upload"] = size.mirror_upload
    for name, method in work.items():
        prefix = f"memory-{name}/0"
        try:
            with memory_sample() as sample:
                method(prefix)
        except Exception as exc:
            sample = {"error": f"{type(exc).__name__}: {exc}"}
        size.clean(prefix)
        out["samples"][name] = sample
        print(f"  {size.size_mb} MiB memory {name}: {sample}", flush=True)
    return out


def bench_proxy(size: Size, moto: str, args: argparse.Namespace) -> dict[str, Any]:
    host, port = urlsplit(moto).hostname, urlsplit(moto).port
    assert host is not None and port is not None
    with CappedProxy((host, port), args.proxy_mbps * 1e6) as proxy:
        via = S3(proxy.url)
        via.client.head_bucket(Bucket=size.bucket)
        methods: dict[str, Method] = {
            f"transfer_manager_c{TM_CONCURRENCY}": lambda p: size.transfer_manager(p, via, TM_CONCURRENCY),
            "transfer_manager_c1": lambda p: size.transfer_manager(p, via, 1),
        }
        if HAS_CONCURRENCY:
            methods["direct_s3_c8"] = lambda p: size.direct_s3(p, proxy.url, 8)
            methods["direct_s3_c1"] = lambda p: size.direct_s3(p, proxy.url, 1)
            if HAS_MIRROR:
                methods["mirror_upload_c8"] = lambda p: size.mirror_upload(p, proxy.url, 8)
                methods["mirror_upload_c1"] = lambda p: size.mirror_upload(p, proxy.url, 1)
        results = run_rounds(size, methods, args, "proxy", proxy)
    ratios = {
        "transfer_manager: c1 / c10": ratio(
            results["transfer_manager_c1"], results[f"transfer_manager_c{TM_CONCURRENCY}"]
        ),
        "direct_s3: c1 / c8": ratio(results.get("direct_s3_c1"), results.get("direct_s3_c8")),
        "mirror_upload: c1 / c8": ratio(results.get("mirror_upload_c1"), results.get("mirror_upload_c8")),
    }
    return {"size_mb": size.size_mb, "cap_mb_per_s": args.proxy_mbps, "methods": results, "ratios": ratios}


def unsigned_payload_config(scratch: Path) -> Path:
    """An AWS config file that turns SHA256 payload signing off for boto3's and s3fs's clients alike.

    Over plain HTTP (moto on loopback) botocore signs every part's SHA256; over HTTPS, with a CRC32
    on the request, it does not. This measures the uploads as they run against a real bucket.
    """
    path = scratch / "aws-config-unsigned"
    path.write_text("[default]\ns3 =\n    payload_signing_enabled = false\n")
    return path


def sizes_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes_arg, default=[128, 1024], help="MiB of weights (128,1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proxy-mbps", type=float, default=20, help="cap of each proxied connection, MB/s each way")
    parser.add_argument("--proxy-sizes", type=sizes_arg, default=[128], help="sizes also run through the proxy")
    parser.add_argument("--proxy-check-mb", type=float, default=20, help="MB moved to check the proxy's cap")
    parser.add_argument("--memory-sizes", type=sizes_arg, default=None, help="sizes whose memory is sampled (all)")
    parser.add_argument("--load-sizes", type=sizes_arg, default=None, help="sizes whose loads are timed (all)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after each sample's clean-up (3)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch parent (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/mirror_<date>.json)")
    parser.add_argument(
        "--unsigned-payload",
        action="store_true",
        help="every client skips SHA256 payload signing, as botocore does over HTTPS (an AWS config file)",
    )
    add_server_argument(parser)
    args = parser.parse_args()
    args.memory_sizes = args.sizes if args.memory_sizes is None else args.memory_sizes
    args.load_sizes = args.sizes if args.load_sizes is None else args.load_sizes
    started = dt.datetime.now(dt.timezone.utc)
    skipped: list[str] = []
    if not HAS_MIRROR:
        skipped.append("mirror: CheckpointManager has no 'mirror' parameter yet (mirror_upload, load_agent_mirror)")
    if not HAS_CONCURRENCY:
        skipped.append("max_concurrency: CheckpointManager has no 'max_concurrency' parameter yet (bgsave's c8/c1)")
    for note in skipped:
        print(f"skip: {note}")
    sizes = sorted(set(args.sizes) | set(args.proxy_sizes))
    scratch, info = make_target(args.dir, "bench-mirror-", max(sizes))

    print(f"proxy check: {args.proxy_check_mb:g} MB each way through one connection capped at {args.proxy_mbps:g} MB/s")
    calibration = check_cap(args.proxy_mbps * 1e6, int(args.proxy_check_mb * 1e6))
    print(
        f"  up {calibration['up_bytes_per_s'] / 1e6:.1f} MB/s, down {calibration['down_bytes_per_s'] / 1e6:.1f} MB/s"
        f" (direct {calibration['direct_up_bytes_per_s'] / 1e6:.0f} MB/s)"
    )
    out = args.out or RESULTS_DIR / f"mirror_{started:%Y-%m-%d}.json"
    results: dict[str, Any] = {}
    proxied: dict[str, Any] = {}

    def report(complete: bool) -> dict[str, Any]:
        """The results file so far (rewritten after every size, so a run cut short keeps what it measured)."""
        body = describe(args, info, calibration, skipped, results, proxied)
        body["complete"] = complete
        write_report(out, "mirror", started, body)
        return body

    try:
        with crash_child.moto_server(env=server_env(args)) as moto:
            os.environ.update(crash_child.s3_env(moto))
            if args.unsigned_payload:
                os.environ["AWS_CONFIG_FILE"] = str(unsigned_payload_config(scratch))
            s3 = S3(moto)
            for size_mb in sizes:
                size = Size(size_mb, s3, scratch, f"mirror-{size_mb}")
                print(f"{size_mb} MiB: {size.file_bytes / 1e6:.1f} MB file, {args.repeats} rounds")
                if size_mb in args.sizes:
                    results[str(size_mb)] = bench_size(size, args)
                if size_mb in args.proxy_sizes:
                    proxied[str(size_mb)] = bench_proxy(size, moto, args)
                del size
                gc.collect()
                report(complete=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    body = report(complete=True)
    print_tables(results, proxied, body["targets"], calibration)
    print(f"\nwrote {out}")
    if body["errors"]:
        print(f"{len(body['errors'])} sample(s) failed:", *body["errors"], sep="\n  ")
        return 1
    return 0


def describe(
    args: argparse.Namespace,
    info: dict[str, Any],
    calibration: dict[str, Any],
    skipped: list[str],
    results: dict[str, Any],
    proxied: dict[str, Any],
) -> dict[str, Any]:
    """The results file's body: settings, features, machine, versions, every sample, the targets, the errors."""
    targets = []
    for key, row in results.items():
        for name in TARGETS:
            if name in row["ratios"]:
                paired_value, interval = row["paired_ratios"].get(name), row.get("paired_90pct", {}).get(name)
                targets.append(target(name, row["ratios"][name], f"{key} MiB", "", paired_value, interval))
    for key, row in proxied.items():
        bgsave_ratio, which = row["ratios"]["mirror_upload: c1 / c8"], "mirror_upload"
        if bgsave_ratio is None:
            bgsave_ratio, which = row["ratios"]["direct_s3: c1 / c8"], "direct_s3"
        targets.append(target("one connection / parallel parts (proxy)", bgsave_ratio, f"{key} MiB", which))
    package_versions: dict[str, str | None] = dict(versions())
    for package in ("boto3", "botocore", "s3fs", "moto"):
        try:
            package_versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            package_versions[package] = None
    parts, source = part_size()
    errors = [
        f"{key} {group} {name}: {error}"
        for key, row in {**results, **{f"proxy {k}": v for k, v in proxied.items()}}.items()
        for group in ("uploads", "loads", "methods")
        for name, method in row.get(group, {}).items()
        for error in method.get("errors", [])
    ]
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "features": {
            "mirror": HAS_MIRROR,
            "max_concurrency": HAS_CONCURRENCY,
            "default_max_concurrency": DEFAULT_CONCURRENCY,
            "part_size_bytes": parts,
            "part_size_source": source,
        },
        "skipped": skipped,
        "server": "moto S3 server on 127.0.0.1 in a separate process; proxy: harness/capped_proxy.py in this process",
        "server_env": server_env(args),
        "transfer_config": {"multipart_chunksize": TM_PART, "multipart_threshold": TM_PART, "max_concurrency": 10},
        "machine": info,
        "versions": package_versions,
        "proxy_check": calibration,
        "results": results,
        "proxy": proxied,
        "targets": targets,
        "errors": errors,
    }


# ---- tables ---------------------------------------------------------------------------------------
def cell(method: dict[str, Any] | None) -> str:
    if not method:
        return "skipped"
    if "median_s" not in method:
        return "failed"
    return f"{method['median_s']:.2f} s ({method['min_s']:.2f}-{method['max_s']:.2f})"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_tables(
    results: dict[str, Any], proxied: dict[str, Any], targets: list[dict[str, Any]], calibration: dict[str, Any]
) -> None:
    for key, row in results.items():
        tm = row["uploads"]["transfer_manager"]
        print(f"\n{key} MiB ({row['file_bytes'] / 1e6:.1f} MB file): uploads, median (min-max)")
        print(f"| {'upload':23} | {'time':24} | {'vs TransferManager':>18} | {'paired':>7} |")
        print(f"|{'-' * 25}|{'-' * 26}|{'-' * 20}|{'-' * 9}|")
        for name in row["uploads"]:
            method = row["uploads"][name]
            pair = times(paired(method, tm)) if name != "transfer_manager" else "-"
            print(f"| {name:23} | {cell(method):24} | {times(ratio(method, tm)):>18} | {pair:>7} |")
        mirror = row["uploads"].get("mirror_upload")
        for reference in MIRROR_REFERENCES:
            if mirror and (other := row["uploads"].get(reference)):
                pair = times(paired(mirror, other))
                print(f"  mirror_upload / {reference}: {times(ratio(mirror, other))}, paired {pair}")
        if mirror and "wall_s_median" in mirror:
            print(f"  mirror save_agent to wait(): {mirror['wall_s_median']:.2f} s (median)")
        base = row["loads"].get("download_torch_load")
        print(f"| {'load':20} | {'time':24} | {'vs download+load':>18} | {'paired':>7} |")
        print(f"|{'-' * 22}|{'-' * 26}|{'-' * 20}|{'-' * 9}|")
        for name in ("download_torch_load", "load_agent_mirror", "load_agent_s3", "load_checkpoint"):
            method = row["loads"].get(name)
            pair = times(paired(method, base)) if name != "download_torch_load" else "-"
            print(f"| {name:20} | {cell(method):24} | {times(ratio(method, base)):>18} | {pair:>7} |")
        memory = row.get("memory")
        if memory:
            expected = memory["expected_extra_bytes"] / MB
            print(
                f"memory: expected max_concurrency x part = {memory['max_concurrency']} x "
                f"{memory['part_size_bytes'] / MB:g} MiB = {expected:g} MiB ({memory['part_size_source']})"
            )
            for name, sample in memory["samples"].items():
                if "error" in sample:
                    print(f"  {name}: failed ({sample['error']})")
                else:
                    print(
                        f"  {name}: tracemalloc peak {sample['tracemalloc_peak_bytes'] / MB:.1f} MiB, "
                        f"peak RSS +{sample['rss_peak_extra_bytes'] / MB:.0f} MiB"
                    )
    for key, row in proxied.items():
        print(
            f"\n{key} MiB through the proxy ({row['cap_mb_per_s']:g} MB/s per connection; checked: one connection "
            f"moved {calibration['up_bytes_per_s'] / 1e6:.1f} MB/s up, "
            f"{calibration['down_bytes_per_s'] / 1e6:.1f} down)"
        )
        print(f"| {'upload':22} | {'time':24} | {'connections at once':>19} | {'connections used':>16} |")
        print(f"|{'-' * 24}|{'-' * 26}|{'-' * 21}|{'-' * 18}|")
        for name, method in row["methods"].items():
            seen = [s["proxy"] for s in method["samples"] if "proxy" in s]
            at_once, used = "-", "-"
            if seen:
                at_once = f"{max(p['parallel_median'] for p in seen)} (max {max(p['parallel_max'] for p in seen)})"
                used = str(max(p["connections_used"] for p in seen))
            print(f"| {name:22} | {cell(method):24} | {at_once:>19} | {used:>16} |")
        for name, value in row["ratios"].items():
            print(f"  {name}: {times(value)}")
    print(f"\n| {'target':42} | {'where':8} | {'value':>7} | {'paired (90%)':>20} | {'limit':>7} | status |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 9}|{'-' * 22}|{'-' * 9}|--------|")
    for t in targets:
        limit, pair, interval = f"{t['op']} {t['limit']:g}x", times(t.get("paired")), t.get("paired_90pct")
        if interval:
            pair += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        value, status = times(t["value"]), t["status"]
        print(f"| {t['target']:42} | {t['where']:8} | {value:>7} | {pair:>20} | {limit:>7} | {status:6} |")


if __name__ == "__main__":
    sys.exit(main())
