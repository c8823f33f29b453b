"""Where a benchmark ran and what it found: the machine's facts, the scratch directory, the results file.

Every results file is written by :func:`write_report`, which puts first what makes a figure
traceable: the scenario, when it started, the exact command line, the git commit of the code measured
(``git_sha``, with ``git_dirty`` when the working tree had uncommitted changes) and the machine
(CPU, memory, kernel, torch, the target's filesystem, how busy the machine was). Where the checkout
has no ``.git`` (a copy on a lent GPU machine), set ``BENCH_GIT_SHA`` to the commit measured.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
# benchmarks/out/ is git-ignored and lies on the repository's disk (not /tmp, which may be tmpfs).
DEFAULT_PARENT = REPO / "benchmarks" / "out"
MB = 2**20
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


# ---- the machine ----------------------------------------------------------------------------------
def mount_of(path: Path) -> dict[str, str]:
    """The /proc/mounts entry (device, type, options) of the filesystem holding ``path``."""
    best: dict[str, str] = {}
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mountpoint, fstype, options = line.split()[:4]
                if (resolved == mountpoint or resolved.startswith(mountpoint.rstrip("/") + "/")) and len(
                    mountpoint
                ) >= len(best.get("mountpoint", "")):
                    best = {"device": device, "mountpoint": mountpoint, "fstype": fstype, "options": options}
    except OSError:
        pass
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine(target: Path) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "target_dir": str(target),
        "target_filesystem": mount_of(target),
        "tmp_filesystem": mount_of(Path(tempfile.gettempdir())).get("fstype"),
        "transparent_hugepages": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "dirty_ratio": read_text("/proc/sys/vm/dirty_ratio"),
        "dirty_background_ratio": read_text("/proc/sys/vm/dirty_background_ratio"),
        **load(),
    }


def load() -> dict[str, Any]:
    """How busy the (shared) machine is: load average and CPU / IO pressure, where the kernel reports them."""
    return {
        "load_average": os.getloadavg(),
        "cpu_pressure": read_text("/proc/pressure/cpu"),
        "io_pressure": read_text("/proc/pressure/io"),
        # Free page reporting (VMs): freed guest memory handed back to the host, in KiB so far.
        "page_reporting_order": read_text("/sys/module/page_reporting/parameters/page_reporting_order"),
        "page_reported_kib": read_text("/sys/module/page_reporting/parameters/reported_kib"),
    }


def git() -> dict[str, Any]:
    """The commit measured (``git_sha``) and whether tracked files differed from it (``git_dirty``).

    ``BENCH_GIT_SHA`` in the environment wins (a checkout without ``.git``); None when neither is known.
    """

    def run(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    override = os.environ.get("BENCH_GIT_SHA")
    if override:
        return {"git_sha": override, "git_dirty": None}
    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def versions() -> dict[str, str | None]:
    """Installed versions of bgsave, torch and the benchmark's own extra (None: not installed)."""
    out: dict[str, str | None] = {}
    for package in ("bgsave", "torch", "lightning", "matplotlib", "psutil"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# ---- the results file -----------------------------------------------------------------------------
def write_report(
    out: Path, benchmark: str, started: dt.datetime, body: dict[str, Any], command: str | None = None
) -> dict[str, Any]:
    """Write a results file: scenario, start, command line (``sys.argv`` by default), git SHA, then ``body``.

    ``body`` normally holds ``machine`` (from :func:`make_target` or :func:`machine`); where it does not,
    the machine is described here, with the temp directory as the target.
    """
    report = {
        "benchmark": benchmark,
        "started_utc": started.isoformat(timespec="seconds"),
        "command": command or " ".join(["python", *sys.argv]),
        **git(),
        **body,
    }
    report.setdefault("machine", machine(Path(tempfile.gettempdir())))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- the scratch directory ------------------------------------------------------------------------
def make_target(parent: Path | None, prefix: str, largest_mb: int) -> tuple[Path, dict[str, Any]]:
    """A fresh directory under ``parent`` (default ``benchmarks/out``) for checkpoints; the machine's description.

    Refuses (SystemExit) when the disk lacks room for the largest size; warns when the directory
    lies on a memory filesystem, where fsync costs nothing.
    """
    parent = parent if parent is not None else DEFAULT_PARENT
    parent.mkdir(parents=True, exist_ok=True)
    need = 2.5 * largest_mb * MB
    free = shutil.disk_usage(parent).free
    if free < need:
        raise SystemExit(f"{parent} has {free / 1e9:.1f} GB free; the largest size needs about {need / 1e9:.1f} GB")
    target = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    info = machine(target)
    fs = info["target_filesystem"]
    if fs.get("fstype") in MEMORY_FILESYSTEMS:
        print(f"warning: {target} is on {fs['fstype']}: fsync costs nothing there, figures mean little")
    print(
        f"{info['cpu_model']}, {info['logical_cpus']} CPUs, torch {info['torch']} ({info['torch_threads']} threads), "
        f"target {target} on {fs.get('fstype', '?')} ({fs.get('device', '?')})"
    )
    return target, info
