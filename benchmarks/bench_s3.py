"""S3 benchmark: bgsave to a loopback S3 server against a plain s3fs upload of the same bytes, in one run.

Measures, for a ~100 MB float32 model (medians of --repeats):
  * plain s3fs: ``torch.save`` into memory, then one ``fs.pipe_file`` of those bytes (time of the upload)
  * bgsave s3://: ``save_agent`` stall (the call) and time to durable (``save_agent`` + ``wait()``)
  * bgsave local: the same stall to a local directory, for the "network is off the training thread" claim

The S3 server is moto's, started as a separate process on 127.0.0.1 so that its request handling does
not compete for this process's GIL. Loopback S3 runs at about 45-50 MiB/s here: the absolute times say
more about moto than about S3; the ratios are the result.

Usage:
    python benchmarks/bench_s3.py [--mb 100] [--repeats 5] [--out benchmarks/results/s3_DATE.json]

Prints a table and writes ``benchmarks/results/s3_<date>.json`` (``--json`` is the old name of ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from harness.report import RESULTS_DIR, machine, versions, write_report

from bgsave import CheckpointManager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process; yields the endpoint URL, with AWS_* set in os.environ."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_model(megabytes: int) -> torch.nn.Module:
    """Square Linear layers of 16 MiB each, adding up to about ``megabytes``."""
    side = 2048
    layers = max(1, round(megabytes * 2**20 / (side * side * 4)))
    return torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(layers)])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench(megabytes: int, repeats: int) -> dict[str, Any]:
    import s3fs

    model = make_model(megabytes)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    data = buffer.getvalue()
    size_mb = len(data) / 1e6
    print(f"model: {size_mb:.1f} MB serialized, {repeats} repeats")

    with moto_server() as endpoint:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        plain: list[float] = []
        s3_stall: list[float] = []
        s3_durable: list[float] = []
        local_stall: list[float] = []
        local_durable: list[float] = []
        with (
            tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as tmp,
            CheckpointManager("s3://bench/runs/bgsave", "bench") as s3_mgr,
            CheckpointManager(os.path.join(tmp, "run"), "bench") as local_mgr,
        ):
            # One manager per run, as in training: the first save (writer lock, housekeeping) is a warm-up.
            for mgr in (s3_mgr, local_mgr):
                mgr.save_agent(model, 0)
                mgr.wait()
            for i in range(1, repeats + 1):
                start = time.perf_counter()
                fs.pipe_file(f"bench/plain/model_{i:04d}.pt", data)
                plain.append(time.perf_counter() - start)
                for mgr, stall, durable in ((s3_mgr, s3_stall, s3_durable), (local_mgr, local_stall, local_durable)):
                    start = time.perf_counter()
                    mgr.save_agent(model, i)
                    stall.append(time.perf_counter() - start)
                    mgr.wait()
                    durable.append(time.perf_counter() - start)
                print(
                    f"  #{i}: plain s3fs {plain[-1]:.2f}s | bgsave s3 stall {s3_stall[-1] * 1e3:.0f} ms, "
                    f"durable {s3_durable[-1]:.2f}s | local stall {local_stall[-1] * 1e3:.0f} ms"
                )
    result = {
        "model_mb": size_mb,
        "repeats": repeats,
        "plain_s3fs_upload_s": median(plain),
        "bgsave_s3_stall_s": median(s3_stall),
        "bgsave_s3_durable_s": median(s3_durable),
        "bgsave_local_stall_s": median(local_stall),
        "bgsave_local_durable_s": median(local_durable),
    }
    result["s3_durable_over_plain"] = result["bgsave_s3_durable_s"] / result["plain_s3fs_upload_s"]
    result["s3_stall_over_local_stall"] = result["bgsave_s3_stall_s"] / result["bgsave_local_stall_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", "--json", type=Path, default=None, help="JSON path (benchmarks/results/s3_<date>.json)"
    )
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    torch.set_num_threads(1)
    result = bench(args.mb, args.repeats)
    print()
    print(f"| {'measure':38} | {'median':>10} |")
    print(f"|{'-' * 40}|{'-' * 12}|")
    for key in ("plain_s3fs_upload_s", "bgsave_s3_durable_s", "bgsave_s3_stall_s", "bgsave_local_stall_s"):
        print(f"| {key:38} | {result[key]:9.3f}s |")
    print(f"| {'s3 durable / plain upload':38} | {result['s3_durable_over_plain']:9.2f}x |")
    print(f"| {'s3 stall / local stall':38} | {result['s3_stall_over_local_stall']:9.2f}x |")
    out = args.out or RESULTS_DIR / f"s3_{started:%Y-%m-%d}.json"
    body = {
        "settings": {"mb": args.mb, "repeats": args.repeats, "torch_threads": 1},
        "server": "moto S3 server on 127.0.0.1 in a separate process",
        "machine": machine(Path(__file__).resolve().parent),
        "versions": versions(),
        "results": result,
    }
    write_report(out, "s3", started, body)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
