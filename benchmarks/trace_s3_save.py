"""Where a save to a bucket spends its time: every S3 request of one save, against TransferManager.

``bench_mirror.py`` gives the ratios; this says what makes them. Per round, boto3's TransferManager
uploads the committed file (the reference, as in ``bench_mirror.py``), then three saves are traced,
each S3 request timed from the ``save_agent`` call (s3fs's ``_call_s3`` is wrapped, so bgsave's own
lanes are traced too, and its sync ``call_s3``, which the lock's small PUT goes through):

  direct   a fresh manager on ``s3://`` (no ``start_run``): its first save, to durable (``wait()``)
  later    the same manager's next save, as in a training loop
  mirror   a local run directory with ``mirror="s3://..."``: the epoch's upload (``upload_s``)

TransferManager's own requests are traced too (botocore's ``before-call`` / ``after-call`` events),
so its phases stand beside bgsave's. Each is split into phases: ``stall`` (in ``save_agent``),
``to_first_part`` (call to the first ``upload_part``), ``parts`` (first part sent to last part
acknowledged), ``to_complete`` (then to ``complete_multipart_upload``: the old sidecar and trainer
state uncommitted), ``complete`` and ``to_durable`` (the sidecar). The requests of the last round
are printed one per line. The S3 server runs as in ``bench_mirror.py`` (keeping the memory it frees, unless
``--server-returns-memory``): its ``complete`` is then 0.11-0.18 s at 128 MiB, not 0.3-0.9 s.

Usage:
    python benchmarks/trace_s3_save.py [--size-mb 128] [--rounds 3] [--server-returns-memory]
        [--out benchmarks/results/trace_s3_DATE.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fsspec.asyn
import s3fs.core

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_mirror import S3, Size, add_server_argument, server_env
from harness.report import RESULTS_DIR, make_target, write_report

import crash_child

NAMES = ("transfer_manager", "direct", "later", "mirror")
Request = tuple[str, int | None, float, float]  # method, part number, start, end (s since the save call)
_requests: list[Request] = []
_origin = [0.0]
_call_s3 = s3fs.core.S3FileSystem._call_s3
_sync_call_s3 = s3fs.core.S3FileSystem.call_s3  # what S3File (the lock's small PUT) calls


async def _traced(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    began = time.perf_counter()
    try:
        return await _call_s3(self, method, *args, **kwargs)
    finally:
        now = time.perf_counter()
        _requests.append((method, kwargs.get("PartNumber"), began - _origin[0], now - _origin[0]))


def phases(total: float, stall: float, requests: list[Request]) -> dict[str, float | None]:
    """The phases of one save (see the module docstring), in seconds."""
    parts = [r for r in requests if r[0] == "upload_part"]
    complete = [r for r in requests if r[0] == "complete_multipart_upload"]
    if not parts or not complete:
        return {"total": total, "stall": stall}
    first, last, done = min(r[2] for r in parts), max(r[3] for r in parts), complete[-1]
    return {
        "total": total,
        "stall": stall,
        "to_first_part": first,
        "parts": last - first,
        "to_complete": done[2] - last,
        "complete": done[3] - done[2],
        "to_durable": total - done[3],
    }


class Traces:
    """The traced saves of one size, and TransferManager's traced upload (see the module docstring)."""

    def __init__(self, size: Size) -> None:
        self.size = size
        events = size.s3.client.meta.events
        events.register("provide-client-params.s3", self._params)
        events.register("before-call.s3", self._before)
        events.register("after-call.s3", self._after)

    @staticmethod
    def _params(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["trace_part"] = params.get("PartNumber")

    @staticmethod
    def _before(model: Any, context: dict[str, Any], **_: Any) -> None:
        context["trace_began"] = time.perf_counter()

    @staticmethod
    def _after(model: Any, context: dict[str, Any], **_: Any) -> None:
        began, now = context.get("trace_began", _origin[0]), time.perf_counter()
        number = context.get("trace_part")
        _requests.append((_snake(model.name), number, began - _origin[0], now - _origin[0]))

    def transfer_manager(self, prefix: str) -> tuple[float, float, list[Request]]:
        _mark()
        total = self.size.transfer_manager(prefix)["s"]
        return total, 0.0, [r for r in _requests if r[2] >= 0]

    def direct(self, prefix: str, later: bool) -> tuple[float, float, list[Request]]:
        sample = self.size.direct_s3(prefix, later=later, mark=_mark)
        total = sample["s"]  # the manager's close, after it, is not the save's
        return total, sample["stall_s"], [r for r in _requests if 0 <= r[2] <= total]

    def mirror(self, prefix: str) -> tuple[float, float, list[Request]]:
        sample = self.size.mirror_upload(prefix, mark=_mark)
        # upload_s counts from the upload's start: the phases are shifted to it. After wait() (wall_s):
        # mirror_status()'s listings, not the upload's.
        start = min(r[2] for r in _requests if r[0] in ("delete_object", "create_multipart_upload"))
        requests = [(m, n, a - start, b - start) for m, n, a, b in _requests if start <= a <= sample["wall_s"]]
        return sample["s"], sample["stall_s"], requests


def _mark() -> None:
    """The clock starts: the requests traced from now on are the save's."""
    _requests.clear()
    _origin[0] = time.perf_counter()


def _snake(name: str) -> str:
    """botocore's operation name as s3fs's method name: ``UploadPart`` -> ``upload_part``."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def show(name: str, requests: list[Request]) -> None:
    print(f"  {name}:")
    for method, number, began, ended in requests:
        part = f" {number}" if number is not None else ""
        print(f"    {began:7.3f} -> {ended:7.3f} s  ({ended - began:.3f})  {method}{part}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=128, help="MiB of weights (128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch parent (benchmarks/out)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/results/trace_s3_<date>.json)")
    add_server_argument(parser)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    scratch, _ = make_target(args.dir, "trace-s3-", args.size_mb)
    out = args.out or RESULTS_DIR / f"trace_s3_{started:%Y-%m-%d}.json"
    rounds: list[dict[str, Any]] = []
    s3fs.core.S3FileSystem._call_s3 = _traced  # type: ignore[method-assign]
    s3fs.core.S3FileSystem.call_s3 = fsspec.asyn.sync_wrapper(_traced)  # type: ignore[method-assign]
    try:
        with crash_child.moto_server(env=server_env(args)) as moto:
            os.environ.update(crash_child.s3_env(moto))
            size = Size(args.size_mb, S3(moto), scratch, f"trace-{args.size_mb}")
            traces = Traces(size)
            for round_ in range(args.rounds):
                row: dict[str, Any] = {}
                last: dict[str, list[Request]] = {}
                for name, run in (
                    ("transfer_manager", traces.transfer_manager),
                    ("direct", lambda p: traces.direct(p, later=False)),
                    ("later", lambda p: traces.direct(p, later=True)),
                    ("mirror", traces.mirror),
                ):
                    prefix = f"{name}/{round_}"
                    total, stall, requests = run(prefix)
                    size.clean(prefix)
                    gc.collect()
                    row[name] = phases(total, stall, requests)
                    last[name] = requests
                rounds.append(row)
                shown = ", ".join(f"{k} {row[k]['total']:.2f} s" for k in NAMES)
                print(f"round {round_ + 1}/{args.rounds}: {shown}")
            print(
                f"\nthe requests of round {args.rounds}, seconds from the save_agent call (mirror: the upload's start):"
            )
            for name, requests in last.items():
                show(name, requests)
    finally:
        s3fs.core.S3FileSystem._call_s3 = _call_s3  # type: ignore[method-assign]
        s3fs.core.S3FileSystem.call_s3 = _sync_call_s3  # type: ignore[method-assign]
        shutil.rmtree(scratch, ignore_errors=True)

    medians = {name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in NAMES}
    tm = medians["transfer_manager"]["total"]
    print(f"\nmedians of {args.rounds} round(s), seconds:")
    keys = list(medians["direct"])
    print("  " + " ".join(f"{k:>13}" for k in ["", *keys]))
    for name, values in medians.items():
        print("  " + f"{name:>13} " + " ".join(f"{values.get(k, float('nan')):13.3f}" for k in keys))
    write_report(
        out,
        "trace_s3",
        started,
        {
            "settings": vars(args) | {"dir": str(args.dir), "out": str(out)},
            "transfer_manager_s": tm,
            "medians": medians,
            "rounds": rounds,
        },
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
