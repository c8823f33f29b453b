"""The ``bgsave`` command: list, search, show and prune the checkpoints of a run directory; bench a target.

Works the same on local paths and bucket URLs (``s3://bucket/runs/exp1``), reading sidecars and
file listings only: nothing is ever unpickled here, so pointing it at an untrusted run directory
runs no code from it. Tables use ``rich`` when it is installed (``pip install 'bgsave[cli]'``) and
plain aligned text otherwise; ``--json`` gives machine-readable output on every command.

Exit codes (also in ``bgsave --help``): 0 success; 1 nothing found (``latest``/``best`` on a run
without a matching committed checkpoint); 2 usage error or bad input (unknown option, missing run
directory or file, unknown URL protocol, bad ``--storage-option``); 3 storage or read error
(listing or deleting failed, an unreadable sidecar in ``show``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bgsave import bench, index
from bgsave import sidecar as sidecar_schema
from bgsave.errors import InvalidArgumentError
from bgsave.manager import TRAINER_STATE
from bgsave.retention import RetentionPolicy, prune
from bgsave.storage import Storage

__all__ = ("EXIT_NOT_FOUND", "EXIT_OK", "EXIT_STORAGE", "EXIT_USAGE", "main")

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C in bench, after cleaning up

_PT = re.compile(r"^model_(\d{4,})\.pt$")
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "timeCreated")

_EPILOG = """\
examples:
  bgsave ls runs/exp1                       table of checkpoints (committed or not)
  bgsave ls s3://bucket/runs/exp1 --json    the same as a JSON array
  bgsave latest runs/exp1                   path of the newest committed checkpoint
  bgsave best runs/exp1 --metric avg_reward path of the best one by a sidecar metric
  bgsave best runs/exp1 --metric loss --min lower is better
  bgsave show runs/exp1/checkpoints/model_0042.pt
  bgsave prune runs/exp1 --keep-last 3 --keep-best 2 --dry-run
  bgsave ls s3://bucket/run --storage-option endpoint_url=http://127.0.0.1:9000
  bgsave bench /mnt/nfs/runs --sizes 10,100 save latency there (sync vs bgsave), in a scratch run

RUN_DIR is the directory given to CheckpointManager (its checkpoints/ folder is used) or the
checkpoints folder itself. Nothing is unpickled: listing an untrusted run directory runs no code.

exit codes:
  0  success
  1  nothing found (latest / best: no matching committed checkpoint)
  2  usage error or bad input: unknown option, missing run directory or file, unknown URL protocol
  3  storage or read error: listing, reading or deleting failed
"""


class _CommandError(Exception):
    """Stop a command with an exit code and a message for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _File:
    size: int
    mtime: float | None


@dataclass(frozen=True, slots=True)
class _Row:
    """One ``model_N.pt`` of the listing, committed or not."""

    epoch: int
    path: str
    size: int
    mtime: float | None
    info: index.CheckpointInfo | None  # None: uncommitted
    note: str = ""


# ---- entry point ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bgsave`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["latest", "runs/exp1"])  # doctest: +SKIP
        runs/exp1/checkpoints/model_0042.pt
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; return instead of exiting
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except _CommandError as exc:
        _error(str(exc))
        return exc.code
    except InvalidArgumentError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:  # `bgsave ls | head`: the reader went away, which is not our failure
        with suppress(OSError, ValueError):  # stop the final flush at exit from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # CheckpointError, OSError, and what backends raise besides (botocore, ...)
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_STORAGE


def _error(message: str) -> None:
    print(f"bgsave: {message}", file=sys.stderr)


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:  # true / 3 / {"endpoint_url": "..."} become JSON values; anything else stays a string
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    from bgsave import __version__

    parser = argparse.ArgumentParser(
        prog="bgsave",
        description="List, search, show and prune the checkpoints of a bgsave run directory (local or bucket).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bgsave {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=_storage_option,
        help="fsspec option for a bucket URL (repeatable); VALUE is parsed as JSON when it can be",
    )
    metric = argparse.ArgumentParser(add_help=False)
    metric.add_argument("--metric", default="score", help="sidecar key to rank by (default: score)")
    metric.add_argument("--min", action="store_true", help="lower is better (default: higher is better)")

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_dir_help = "run directory: local path or URL (s3://bucket/runs/exp1)"

    ls = sub.add_parser("ls", parents=[common], help="table of checkpoints, committed or not")
    ls.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    ls.set_defaults(run=_cmd_ls)

    latest = sub.add_parser("latest", parents=[common], help="path of the newest committed checkpoint")
    latest.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    latest.set_defaults(run=_cmd_latest)

    best = sub.add_parser("best", parents=[common, metric], help="path of the best committed checkpoint")
    best.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    best.set_defaults(run=_cmd_best)

    show = sub.add_parser("show", parents=[common], help="sidecar and file facts of one checkpoint")
    show.add_argument("path", metavar="PATH", help="a model_N.pt (or its .yaml): local path or URL")
    show.set_defaults(run=_cmd_show)

    pr = sub.add_parser(
        "prune",
        parents=[common, metric],
        help="delete old checkpoints, keeping the newest and the best",
        description="Delete committed checkpoints outside the newest N and the best K (the newest is always kept). "
        "Each sidecar is deleted before its .pt; .pt files without a sidecar are never touched.",
    )
    pr.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    pr.add_argument("--keep-last", metavar="N", type=_count(1), required=True, help="keep the N newest (>= 1)")
    pr.add_argument("--keep-best", metavar="K", type=_count(0), default=0, help="also keep the K best (default 0)")
    pr.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    pr.set_defaults(run=_cmd_prune)

    bn = sub.add_parser(
        "bench",
        parents=[common],
        help="measure save latency on a target (sync vs bgsave), to choose where runs live",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bn.add_argument("run_dir", metavar="RUN_DIR_URL", help="an existing local directory or a URL (s3://bucket/runs)")
    bn.add_argument("--sizes", metavar="MB,...", type=_sizes, default=(10, 100), help="model sizes (default 10,100)")
    bn.add_argument("--repeats", metavar="N", type=_count(1), default=3, help="timed rounds per size (default 3)")
    bn.add_argument("--max-pending", metavar="N", type=_count(0), default=1, help="CheckpointManager's (default 1)")
    bn.set_defaults(run=_cmd_bench)
    return parser


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return bench.parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# ---- reading a run directory --------------------------------------------------------------------
def _storage(url: str, args: argparse.Namespace) -> Storage:
    storage = Storage(url, dict(args.storage_option))
    storage.fs.invalidate_cache()  # a command wants what is there now, not a cached listing
    return storage


def _open_run(args: argparse.Namespace) -> tuple[Storage, str, dict[str, _File]]:
    """The storage, the checkpoint directory and its file facts, for RUN_DIR or RUN_DIR/checkpoints."""
    storage = _storage(args.run_dir, args)
    directory = storage.join("checkpoints")
    files = _list_files(storage, directory)
    if files:
        return storage, directory, files
    if storage.is_file(storage.root):
        raise _CommandError(EXIT_USAGE, f"{args.run_dir} is a file, not a run directory (one checkpoint: bgsave show)")
    files = _list_files(storage, storage.root)
    if any(_PT.match(name) or name.endswith(".yaml") for name in files):  # RUN_DIR is the checkpoints folder
        return storage, storage.root, files
    if not files and not storage.fs.exists(storage.root):
        raise _CommandError(EXIT_USAGE, f"run directory {args.run_dir} does not exist")
    return storage, directory, {}


def _list_files(storage: Storage, directory: str) -> dict[str, _File]:
    """Files directly in ``directory`` with size and modification time; {} when it is missing."""
    try:
        entries = storage.fs.ls(directory, detail=True, refresh=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        entry["name"].rstrip("/").rsplit("/", 1)[-1]: _File(int(entry.get("size") or 0), _mtime(entry))
        for entry in entries
        if entry.get("type") == "file"
    }


def _mtime(entry: Mapping[str, Any]) -> float | None:
    """The modification time in a listing entry, whichever key the backend uses, as a POSIX timestamp."""
    for key in _MTIME_KEYS:
        value = entry.get(key)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rows(storage: Storage, directory: str, files: Mapping[str, _File]) -> list[_Row]:
    """Every ``model_N.pt`` in ``directory``: the committed ones with their sidecar, in epoch order."""
    infos = {info.epoch: info for info in index.list_checkpoints(storage, directory)}
    pts = {
        int(m.group(1))
        for name in files
        if (m := _PT.match(name)) is not None and name == index.checkpoint_name(int(m.group(1)), "pt")
    }
    rows = []
    for epoch in sorted(pts | set(infos)):
        info = infos.get(epoch)
        name = index.checkpoint_name(epoch, "pt")
        facts = files.get(name)
        note = ""
        if info is None and index.checkpoint_name(epoch, "yaml") in files:
            note = "sidecar unreadable, so not committed"
        rows.append(
            _Row(
                epoch=epoch,
                path=info.path if info else storage.display(Storage.join_dir(directory, name)),
                size=facts.size if facts else info.size if info else 0,
                mtime=facts.mtime if facts else None,
                info=info,
                note=note,
            )
        )
    return rows


def _committed(rows: Sequence[_Row]) -> list[index.CheckpointInfo]:
    return [row.info for row in rows if row.info is not None]


# ---- commands -----------------------------------------------------------------------------------
def _cmd_ls(args: argparse.Namespace) -> int:
    storage, directory, files = _open_run(args)
    rows = _rows(storage, directory, files)
    if args.json:
        _print_json([_record(row) for row in rows])
        return EXIT_OK
    now = time.time()
    table = [
        [
            str(row.epoch),
            _fmt(row.info.sidecar.get("agent_step")) if row.info else "-",
            _fmt(row.info.sidecar.get("score")) if row.info else "-",
            _fmt(row.info.sidecar.get("avg_reward")) if row.info else "-",
            _fmt_duration(row.info.sidecar.get("total_time")) if row.info else "-",
            _fmt_size(row.size),
            _fmt_age(row.mtime, now),
            "yes" if row.info else "no*" if row.note else "no",
        ]
        for row in rows
    ]
    headers = ["epoch", "agent_step", "score", "avg_reward", "total_time", "size", "age", "committed"]
    notes = [f"* epoch {row.epoch}: {row.note}" for row in rows if row.note]
    if not rows:
        notes.append("no checkpoints")
    trainer = files.get(TRAINER_STATE)
    if trainer is not None:
        notes.append(
            f"trainer state: {TRAINER_STATE}, {_fmt_size(trainer.size)}, {_fmt_age(trainer.mtime, now)} old "
            "(epoch not shown: listing never unpickles)"
        )
    _print_table(storage.display(directory), headers, table, notes, right=range(7))
    return EXIT_OK


def _cmd_latest(args: argparse.Namespace) -> int:
    storage, directory, files = _open_run(args)
    rows = [row for row in _rows(storage, directory, files) if row.info is not None]
    if not rows:
        raise _CommandError(EXIT_NOT_FOUND, f"no committed checkpoint in {storage.display(directory)}")
    _print_found(rows[-1], args)
    return EXIT_OK


def _cmd_best(args: argparse.Namespace) -> int:
    storage, directory, files = _open_run(args)
    rows = _rows(storage, directory, files)
    found = index.best(_committed(rows), args.metric, mode="min" if args.min else "max")
    if found is None:
        raise _CommandError(
            EXIT_NOT_FOUND,
            f"no committed checkpoint in {storage.display(directory)} has a finite {args.metric!r}",
        )
    _print_found(next(row for row in rows if row.info is found), args)
    return EXIT_OK


def _print_found(row: _Row, args: argparse.Namespace) -> None:
    if args.json:
        _print_json(_record(row))
    else:
        print(row.path)


def _cmd_show(args: argparse.Namespace) -> int:
    storage = _storage(args.path, args)
    pt = storage.root[: -len(".yaml")] + ".pt" if storage.root.endswith(".yaml") else storage.root
    if not pt.endswith(".pt"):
        raise _CommandError(EXIT_USAGE, f"{args.path} is not a checkpoint: expected a model_N.pt or model_N.yaml")
    yml = pt[: -len(".pt")] + ".yaml"
    facts = _file_info(storage, pt)
    data: bytes | Exception | None = storage.read_many([yml])[yml]
    if isinstance(data, FileNotFoundError):
        data = None
    if facts is None and data is None:
        raise _CommandError(EXIT_USAGE, f"{storage.display(pt)} does not exist (nor its sidecar)")
    if isinstance(data, Exception):
        raise _CommandError(EXIT_STORAGE, f"cannot read {storage.display(yml)}: {type(data).__name__}: {data}")
    m = _PT.match(pt.rsplit("/", 1)[-1])
    sidecar: dict[str, Any] = {"epoch": int(m.group(1))} if m else {}
    if data is not None:
        try:
            sidecar = sidecar_schema.loads(data, source=storage.display(yml))
        except ValueError as exc:
            raise _CommandError(EXIT_STORAGE, str(exc)) from exc
    problem = _uncommitted_because(pt, facts, data is not None, sidecar)
    size, mtime = (facts.size, facts.mtime) if facts else (0, None)
    if args.json:
        _print_json(_json_record(sidecar, storage.display(pt), size, not problem, mtime))
        return EXIT_OK
    lines = [
        ["path", storage.display(pt)],
        ["committed", f"no ({problem})" if problem else "yes"],
        ["size", _fmt_size(size) if facts else "-"],
        ["age", _fmt_age(mtime, time.time())],
        ["sidecar", storage.display(yml) if data is not None else "-"],
    ]
    lines += [[str(key), _fmt(value)] for key, value in sidecar.items() if data is not None]
    _print_table(storage.display(pt), ["key", "value"], lines, [], right=())
    return EXIT_OK


def _uncommitted_because(pt: str, facts: _File | None, has_sidecar: bool, sidecar: Mapping[str, Any]) -> str:
    """Why the checkpoint at ``pt`` is not committed, by the index's rules; "" when it is."""
    if not has_sidecar:
        return "no sidecar"
    if facts is None:
        return "the .pt is missing"
    name = pt.rsplit("/", 1)[-1]
    m = _PT.match(name)
    if m is None or name != index.checkpoint_name(int(m.group(1)), "pt"):
        return "not a model_N.pt name"
    if int(m.group(1)) != sidecar["epoch"]:
        return f"sidecar says epoch {sidecar['epoch']}, file name says {int(m.group(1))}"
    return ""


def _file_info(storage: Storage, path: str) -> _File | None:
    try:
        entry = storage.fs.info(path)
    except FileNotFoundError:
        return None
    if entry.get("type") != "file":
        return None
    return _File(int(entry.get("size") or 0), _mtime(entry))


def _cmd_prune(args: argparse.Namespace) -> int:
    policy = RetentionPolicy(
        keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode="min" if args.min else "max"
    )
    storage, directory, files = _open_run(args)
    rows = _rows(storage, directory, files)
    infos = _committed(rows)
    deleted = {info.epoch for info in prune(storage, directory, infos, policy, dry_run=args.dry_run)}
    uncommitted = [row for row in rows if row.info is None]
    if args.json:
        _print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [_record(row) for row in rows if row.info and row.epoch in deleted],
                "kept": [_record(row) for row in rows if row.info and row.epoch not in deleted],
            }
        )
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for row in rows:
        if row.info is not None and row.epoch in deleted:
            score = row.info.sidecar.get(args.metric)
            print(f"{verb} epoch {row.epoch} ({args.metric} {_fmt(score)}): {row.path}")
    kept = [str(info.epoch) for info in infos if info.epoch not in deleted]
    print(f"{verb} {len(deleted)} checkpoint(s); kept epochs: {', '.join(kept) or 'none'}")
    if uncommitted:
        print(f"left {len(uncommitted)} uncommitted .pt file(s) alone (a save in progress or a crash's leftover)")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        with bench.progress(bench.steps(args.sizes, args.repeats, args.max_pending)) as step:
            report = bench.run(
                args.run_dir,
                sizes=args.sizes,
                repeats=args.repeats,
                max_pending=args.max_pending,
                storage_options=dict(args.storage_option),
                on_step=step,
            )
    except KeyboardInterrupt:
        raise _CommandError(EXIT_INTERRUPTED, "interrupted") from None
    if args.json:
        _print_json(report.to_json())
        return EXIT_OK
    headers, rows, notes = bench.table(report)
    _print_table(f"bgsave bench: {report.target}", headers, rows, notes, right=(0, 2, 3, 4, 5, 6))
    return EXIT_OK


# ---- output -------------------------------------------------------------------------------------
def _record(row: _Row) -> dict[str, Any]:
    """One row of the listing as JSON (uncommitted rows have only the epoch from the file name)."""
    sidecar = row.info.sidecar if row.info else {"epoch": row.epoch}
    return _json_record(sidecar, row.path, row.size, row.info is not None, row.mtime)


def _json_record(
    sidecar: Mapping[str, Any], path: str, size: int, committed: bool, mtime: float | None
) -> dict[str, Any]:
    """The sidecar's keys, then path, size, committed and mtime (ISO 8601, UTC); file facts win a clash."""
    out = {str(key): _json_value(value) for key, value in sidecar.items()}
    out["path"] = path
    out["size"] = size
    out["committed"] = committed
    out["mtime"] = datetime.fromtimestamp(mtime, tz=timezone.utc).isoformat() if mtime is not None else None
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity; such a metric is never "best" anyway
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # YAML dates and the like, from sidecars bgsave did not write


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False))


def _print_table(
    title: str, headers: list[str], rows: list[list[str]], notes: list[str], *, right: Sequence[int]
) -> None:
    """Print with rich when it is installed, else as plain aligned text; every cell is sanitised first."""
    title = _clean(title)
    rows = [[_clean(cell) for cell in row] for row in rows]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        print(title)
        for cells in [headers, *rows]:
            print(line(cells))
        for note in notes:
            print(note)
        return
    table = Table(
        title=Text(title),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left", overflow="fold")
    for cells in rows:
        table.add_row(*(Text(cell) for cell in cells))  # Text: a sidecar's "[bold]" is data, not markup
    console = Console(highlight=False)
    console.print(table)
    for note in notes:
        console.print(Text(note), soft_wrap=True)


def _clean(text: str) -> str:
    """``text`` with control characters escaped, so a sidecar cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _fmt_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _fmt_duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return _fmt(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt_age(mtime: float | None, now: float) -> str:
    if mtime is None:
        return "-"
    age = max(0.0, now - mtime)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= span:
            return f"{int(age // span)}{unit}"
    return f"{int(age)}s"
