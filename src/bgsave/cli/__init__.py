"""The ``bgsave`` command: list, search, show and prune the checkpoints of a run directory; bench a target.

Works the same on local paths and bucket URLs (``s3://bucket/runs/exp1``), reading sidecars and
file listings only: nothing is ever unpickled here, so pointing it at an untrusted run directory
runs no code from it, and torch is imported by ``bench`` alone. Tables use ``rich`` when it is
installed (``pip install 'bgsave[cli]'``) and plain aligned text otherwise; ``--json`` gives
machine-readable output on every command.

This module is what can be typed and what comes back: the options (:func:`build_parser`) and the
exit codes (:class:`ExitCode`, the one table both the code and ``bgsave --help`` use). The commands
are :mod:`bgsave.cli.commands`, what they print :mod:`bgsave.cli.output`, the benchmark
:mod:`bgsave.cli.bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from enum import IntEnum
from types import FrameType
from typing import Any

from bgsave import __version__
from bgsave.cli import commands, output
from bgsave.errors import CheckpointNotFoundError, CheckpointReadError, InvalidArgumentError
from bgsave.policies import MODES

__all__ = (
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "ExitCode",
    "build_parser",
    "main",
)


class ExitCode(IntEnum):
    """What ``bgsave`` exits with, and what each code means (printed by ``bgsave --help``)."""

    meaning: str

    def __new__(cls, code: int, meaning: str) -> ExitCode:
        """A member: ``OK = 0, "success"``."""
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = 0, "success"
    NOT_FOUND = 1, "nothing found (latest / best: no matching committed checkpoint)"
    USAGE = 2, "usage error or bad input: unknown option, missing run directory or file, unknown URL protocol"
    STORAGE = 3, "storage or read error: listing, reading or deleting failed"
    INTERRUPTED = 130, "interrupted (Ctrl-C); bench removes its scratch run first"


EXIT_OK = ExitCode.OK
EXIT_NOT_FOUND = ExitCode.NOT_FOUND
EXIT_USAGE = ExitCode.USAGE
EXIT_STORAGE = ExitCode.STORAGE
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

_EXAMPLES = """\
examples:
  bgsave ls runs/exp1                       table of checkpoints (committed or not)
  bgsave ls s3://bucket/runs/exp1 --json    the same as a JSON array
  bgsave latest runs/exp1                   path of the newest committed checkpoint
  bgsave best runs/exp1 --metric avg_reward path of the best one by a sidecar metric
  bgsave best runs/exp1 --metric loss --mode min   lower is better
  bgsave show runs/exp1/checkpoints/model_0042.pt
  bgsave prune runs/exp1 --keep-last 3 --keep-best 2 --dry-run
  bgsave consolidate runs/exp1 --epoch 10   a sharded (DCP) checkpoint as one state-dict .pt
  bgsave ls s3://bucket/run --storage-option endpoint_url=http://127.0.0.1:9000
  bgsave bench /mnt/nfs/runs --sizes 10,100 save latency there (sync vs bgsave), in a scratch run

RUN_DIR is the directory given to CheckpointManager (its checkpoints/ folder is used) or the
checkpoints folder itself. Nothing is unpickled: listing an untrusted run directory runs no code.
"""


def _epilog() -> str:
    codes = "".join(f"  {code.value:>3}  {code.meaning}\n" for code in ExitCode)
    return f"{_EXAMPLES}\nexit codes:\n{codes}"


# ---- entry point ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bgsave`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["latest", "runs/exp1"])  # doctest: +SKIP
        runs/exp1/checkpoints/model_0042.pt
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; return instead of exiting
        return exc.code if isinstance(exc.code, int) else int(ExitCode.USAGE)
    return int(_run(args.run, args))


def _run(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> ExitCode:
    """Call the command; what it raises becomes an exit code and a message on stderr."""
    # Ctrl-C inside torch.save's C++ writer reaches us as a RuntimeError, the KeyboardInterrupt lost:
    # note the signal, so that whatever it turned into still exits as interrupted.
    interrupted: list[int] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if installed else None
    try:
        command(args)
    except CheckpointNotFoundError as exc:
        code, message = ExitCode.NOT_FOUND, str(exc)
    except InvalidArgumentError as exc:
        code, message = ExitCode.USAGE, str(exc)
    except CheckpointReadError as exc:  # the message names the file
        code, message = ExitCode.STORAGE, str(exc)
    except KeyboardInterrupt:
        code, message = ExitCode.INTERRUPTED, "interrupted"
    except BrokenPipeError:  # `bgsave ls | head`: the reader went away, which is not our failure
        with suppress(OSError, ValueError):  # stop the final flush at exit from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:  # CheckpointError, OSError, and what backends raise besides (botocore, ...)
        code, message = ExitCode.STORAGE, f"{type(exc).__name__}: {exc}"
        if interrupted:
            code, message = ExitCode.INTERRUPTED, "interrupted"
    else:
        return ExitCode.OK
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    output.message(message)
    return code


# ---- options ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description may be made only when help is shown (bench's imports torch)."""

    def __init__(self, *args: Any, describe: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._describe = describe

    def format_help(self) -> str:
        if self._describe is not None:
            self.description = self._describe()
        return super().format_help()


class _DeprecatedMin(argparse.Action):
    """``--min``, the old spelling of ``--mode min``: still works, with a note on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        output.message("--min is deprecated, use --mode min (it will be removed in a later release)")
        namespace.mode = "min"


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


def _sizes(text: str) -> tuple[int, ...]:
    """``"10,100"`` -> ``(10, 100)``: positive ints (MB), duplicates dropped."""
    try:
        sizes = [int(item) for item in text.split(",")]
    except ValueError:
        sizes = [0]
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive ints (MB) separated by commas, got {text!r}")
    return tuple(dict.fromkeys(sizes))


def _bench_description() -> str:
    from bgsave.cli import bench

    return bench.__doc__ or ""


def build_parser() -> argparse.ArgumentParser:
    """The ``bgsave`` argument parser; each command's namespace has ``run``, the function to call."""
    parser = argparse.ArgumentParser(
        prog="bgsave",
        description="List, search, show and prune the checkpoints of a bgsave run directory (local or bucket).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bgsave {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=_storage_option,
        help="fsspec option for a bucket URL (repeatable); VALUE is parsed as JSON when it can be",
    )
    metric = _Parser(add_help=False)
    metric.add_argument("--metric", default="score", help="sidecar key to rank by (default: score)")
    # The default lives on the parser, not the options: argparse only sees "--min --mode max" as a
    # conflict when neither option's value is its own default.
    metric.set_defaults(mode="max")
    mode = metric.add_mutually_exclusive_group()
    mode.add_argument(
        "--mode",
        choices=MODES,
        default=argparse.SUPPRESS,
        help="max: higher is better (the default); min: lower is better",
    )
    mode.add_argument(
        "--min", action=_DeprecatedMin, dest="mode", default=argparse.SUPPRESS, help="deprecated: use --mode min"
    )

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    run_dir_help = "run directory: local path or URL (s3://bucket/runs/exp1)"

    ls = sub.add_parser("ls", parents=[common], help="table of checkpoints, committed or not")
    ls.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    ls.add_argument("--mirror", metavar="URL", help="also list the run's mirror (CheckpointManager(mirror=URL))")
    ls.set_defaults(run=commands.ls)

    latest = sub.add_parser("latest", parents=[common], help="path of the newest committed checkpoint")
    latest.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    latest.set_defaults(run=commands.latest)

    best = sub.add_parser("best", parents=[common, metric], help="path of the best committed checkpoint")
    best.add_argument("run_dir", metavar="RUN_DIR", help=run_dir_help)
    best.set_defaults(run=commands.best)

    show = sub.add_parser("show", parents=[common], help="sidecar and file facts of one checkpoint")
    show.add_argument("path", metavar="PATH", help="a model_N.pt (or its .yaml): local path or URL")
    show.set_defaults(run=commands.show)

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
    pr.set_defaults(run=commands.prune)

    co = sub.add_parser(
        "consolidate",
        parents=[common],
        help="turn a sharded (DCP) checkpoint into one plain state-dict .pt",
        description="Write the state dict of epoch N's model_N.dcp directory (sharding='dcp') as one torch.save "
        "file that loads without a process group (torch.distributed.checkpoint's dcp_to_torch_save).",
    )
    co.add_argument("run_dir", metavar="RUN_DIR", help="run directory (local)")
    co.add_argument("--epoch", metavar="N", type=_count(0), required=True, help="the epoch to consolidate")
    co.add_argument("--out", metavar="PATH", help="where to write (default: checkpoints/model_N.state_dict.pt)")
    co.set_defaults(run=commands.consolidate)

    bn = sub.add_parser(
        "bench",
        parents=[common],
        help="measure save latency on a target (sync vs bgsave), to choose where runs live",
        describe=_bench_description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bn.add_argument("run_dir", metavar="RUN_DIR_URL", help="an existing local directory or a URL (s3://bucket/runs)")
    bn.add_argument("--sizes", metavar="MB,...", type=_sizes, default=(10, 100), help="model sizes (default 10,100)")
    bn.add_argument("--repeats", metavar="N", type=_count(1), default=3, help="timed rounds per size (default 3)")
    bn.add_argument("--max-pending", metavar="N", type=_count(0), default=1, help="CheckpointManager's (default 1)")
    bn.set_defaults(run=commands.bench)
    return parser
