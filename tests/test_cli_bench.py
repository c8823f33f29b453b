"""``bgsave bench``: real saves on local disk, ``memory://`` and S3 on the loopback moto server.

Every test benchmarks tiny models (1-2 MB, one timed round) in a run directory that already holds a
user's checkpoints, and checks what a user would: the numbers, that the scratch run is gone, that
their files are byte for byte the same, and the exit codes. The terminal tests run ``python -m bgsave``
with stderr on a real pseudo-terminal.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from bgsave import CheckpointManager, find_latest_checkpoint
from bgsave.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_STORAGE, EXIT_USAGE, bench, main

pytestmark = pytest.mark.timeout(120)

METHODS = ["sync", "bgsave", "burst"]
TINY = ["--sizes", "1", "--repeats", "1"]


def make_user_run(run_dir: str) -> None:
    """The user's own run: two committed checkpoints and a trainer state."""
    agent = torch.nn.Linear(8, 2)
    with CheckpointManager(run_dir, "users-run", background=False) as mgr:
        mgr.save_agent(agent, 1, {"agent_step": 10, "score": 0.5})
        mgr.save_agent(agent, 2, {"agent_step": 20, "score": 0.7})
        mgr.save_trainer_state(torch.optim.SGD(agent.parameters(), lr=0.1), 2, 20)


def contents(url: str) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under ``url``, as the backend lists it now."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    found: dict[str, Any] = fs.find(path, withdirs=True, detail=True)
    return {name: fs.cat_file(name) if info["type"] == "file" else None for name, info in found.items()}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_results(results: list[dict[str, Any]], sizes: list[int], saves: int) -> None:
    """One row per size and method, in that order, each with positive finite numbers."""
    assert [(r["size_mb"], r["method"]) for r in results] == [(s, m) for s in sizes for m in METHODS]
    for r in results:
        assert r["saves"] == (3 if r["method"] == "burst" else saves)
        assert 0.9e6 * r["size_mb"] < r["bytes"] < 1.1e6 * r["size_mb"]
        numbers = [r["stall_s"], r["durable_s"], r["mb_per_s"]]
        numbers += [] if r["method"] == "burst" else [r["first_stall_s"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers), r
        assert r["first_stall_s"] is None or r["method"] != "burst"
        assert r["stall_s"] <= r["durable_s"]


# ---- results ------------------------------------------------------------------------------------
def test_json_on_each_backend_leaves_the_users_run_as_it_was(
    any_run_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: sizes x methods with positive finite numbers; afterwards the run directory is byte for byte
    what it was (no scratch run, no lock), on local disk, memory:// and S3."""
    make_user_run(any_run_dir)
    before = contents(any_run_dir)
    code, out, err = run_cli(capsys, "bench", any_run_dir, *TINY, "--json")
    assert (code, err) == (EXIT_OK, "")
    report = json.loads(out)
    assert (report["repeats"], report["max_pending"]) == (1, 1)
    assert report["target"].rstrip("/").endswith(any_run_dir.split("://", 1)[-1].rstrip("/"))
    check_results(report["results"], [1], 1)
    assert contents(any_run_dir) == before
    assert str(find_latest_checkpoint(f"{any_run_dir}/checkpoints")).endswith("model_0002.pt")


def test_table_plain_and_with_rich(
    local_run_dir: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table has a row per size and method with numbers and units, with rich and without it."""
    make_user_run(local_run_dir)
    code, out, _ = run_cli(capsys, "bench", local_run_dir, "--sizes", "2,1,2", "--repeats", "1")
    assert code == EXIT_OK
    for size in ("1 MB", "2 MB"):
        assert [m for m in METHODS if any(size in line and f" {m} " in line for line in out.splitlines())] == METHODS
    assert "burst: 3 saves back to back" in out

    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich...` now raises ImportError
    code, out, _ = run_cli(capsys, "bench", local_run_dir, "--sizes", "1", "--repeats", "2", "--max-pending", "0")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == f"bgsave bench: {local_run_dir}"
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[1:5]]
    assert cells[0] == ["size", "method", "saves", "first stall", "stall", "durable", "MB/s"]
    assert [row[:3] for row in cells[1:]] == [["1 MB", method, "2"] for method in METHODS]
    for row in cells[1:]:
        times = [seconds(cell) for cell in row[3:6] if cell != "-"]
        assert len(times) == (2 if row[1] == "burst" else 3)
        assert all(t > 0 for t in times)
        assert float(row[6]) > 0
    assert "burst: 2 saves back to back (--max-pending 0)" in out


def seconds(cell: str) -> float:
    """``"12.5 ms"`` or ``"1.20 s"`` in seconds."""
    value, unit = cell.split()
    return float(value) * {"ms": 1e-3, "s": 1.0}[unit]


def test_the_users_writer_lock_is_not_taken(local_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Benchmarking a run directory while its trainer holds the writer lock: both carry on undisturbed."""
    agent = torch.nn.Linear(8, 2)
    with CheckpointManager(local_run_dir, "live-run") as mgr:
        mgr.save_agent(agent, 1)
        mgr.wait()
        lock = Path(local_run_dir, ".bgsave-writer.lock").read_bytes()
        code, _, err = run_cli(capsys, "bench", local_run_dir, *TINY, "--json")
        assert (code, err) == (EXIT_OK, "")
        assert Path(local_run_dir, ".bgsave-writer.lock").read_bytes() == lock
        mgr.save_agent(agent, 2)
    assert [info.epoch for info in CheckpointManager(local_run_dir, "live-run").checkpoints()] == [1, 2]


# ---- errors and interruptions -------------------------------------------------------------------
@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_scratch_run_removed_on_error_or_ctrl_c(run_dir: str, failure: type[BaseException]) -> None:
    """An exception or Ctrl-C while a background save is in flight: it propagates, the scratch run is gone."""
    make_user_run(run_dir)
    before = contents(run_dir)
    seen: list[str] = []

    def step(text: str) -> None:
        seen.append(text)
        if "burst" in text:  # the first burst save has just been queued: a write is in flight
            raise failure("stop")

    with pytest.raises(failure):
        bench.run(run_dir, sizes=[1], repeats=1, on_step=step)
    assert seen[-1] == "1 MB burst 1/3"
    assert contents(run_dir) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "0"], "argument --sizes: sizes must be positive ints"),
        (["--sizes", "10,x"], "argument --sizes"),
        (["--sizes", ""], "argument --sizes"),
        (["--sizes", "1.5"], "argument --sizes"),
        (["--sizes", "100000000"], "--sizes: 100000000 MB needs about"),
        (["--repeats", "0"], "argument --repeats: must be an int >= 1"),
        (["--max-pending", "-1"], "argument --max-pending: must be an int >= 0"),
        (["--storage-option", "endpoint_url"], "argument --storage-option: expected KEY=VALUE"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    argv: list[str], message: str, local_run_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad options exit 2 with a message naming the option; nothing is written."""
    make_user_run(local_run_dir)
    before = contents(local_run_dir)
    code, out, err = run_cli(capsys, "bench", local_run_dir, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert message in err
    assert contents(local_run_dir) == before


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{tmp}/missing", "RUN_DIR_URL {tmp}/missing is not an existing directory"),
        ("{tmp}/file.txt", "RUN_DIR_URL {tmp}/file.txt is not an existing directory"),
        ("nope://bucket/run", "protocol"),
    ],
)
def test_bad_target_exits_2(target: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local target must be an existing directory (nothing is created for it); unknown protocols are refused."""
    (tmp_path / "file.txt").write_text("not a directory")
    code, out, err = run_cli(capsys, "bench", target.replace("{tmp}", str(tmp_path)), *TINY)
    assert (code, out) == (EXIT_USAGE, "")
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_missing_bucket_and_unreachable_endpoint_exit_3(
    s3_endpoint: str, refused_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bucket that does not exist, and an endpoint nobody listens on: exit 3 naming the URL; no bucket made."""
    bucket = f"bgsave-missing-{uuid.uuid4().hex[:8]}"
    code, out, err = run_cli(capsys, "bench", f"s3://{bucket}/runs", *TINY)
    assert (code, out) == (EXIT_STORAGE, "")
    assert f"s3://{bucket}/runs" in err
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}")
    fs.invalidate_cache()
    assert not fs.exists(bucket)

    endpoint = json.dumps({"endpoint_url": f"http://127.0.0.1:{refused_port}"})
    retries = json.dumps({"retries": {"total_max_attempts": 1}})
    argv = ["--storage-option", f"client_kwargs={endpoint}", "--storage-option", f"config_kwargs={retries}"]
    code, out, err = run_cli(capsys, "bench", "s3://bucket/runs", *TINY, *argv)
    assert (code, out) == (EXIT_STORAGE, "")
    assert "bgsave: OSError: checking s3://bucket/runs failed" in err


def test_access_denied_mid_run_exits_3_and_leaves_nothing(
    s3_run_dir: str, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoint uploads refused with 403 after the scratch run was started: exit 3, and the bucket holds
    exactly the user's objects again (no scratch keys, no unfinished multipart uploads)."""
    from faulty_s3 import FaultyS3

    make_user_run(s3_run_dir)
    before = contents(s3_run_dir)
    with FaultyS3() as faulty:
        for op in ("PutObject", "CreateMultipartUpload"):
            faulty.fail(op, "403", key="/checkpoints/model_")
        code, out, err = run_cli(
            capsys,
            "bench",
            s3_run_dir,
            *TINY,
            "--storage-option",
            "client_kwargs=" + json.dumps({"endpoint_url": faulty.endpoint}),
        )
        assert faulty.count("PutObject", faulted=False, key=".bgsave-bench-") > 0  # the scratch run was started
        assert faulty.count(faulted=True) > 0
    assert (code, out) == (EXIT_STORAGE, "")
    assert "AccessDenied" in err or "PermissionError" in err
    assert contents(s3_run_dir) == before
    fs, _ = fsspec.core.url_to_fs(s3_run_dir)
    assert fs.list_multipart_uploads(s3_run_dir.removeprefix("s3://").split("/")[0]) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_permission_denied_local_exits_3(local_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory the user may not write to: exit 3, nothing created."""
    make_user_run(local_run_dir)
    before = contents(local_run_dir)
    os.chmod(local_run_dir, 0o555)
    try:
        code, _, err = run_cli(capsys, "bench", local_run_dir, *TINY)
    finally:
        os.chmod(local_run_dir, 0o755)
    assert code == EXIT_STORAGE
    assert "PermissionError" in err
    assert contents(local_run_dir) == before


# ---- on a terminal ------------------------------------------------------------------------------
def on_a_terminal(argv: list[str], *, rich: bool, interrupt_at: str | None = None) -> tuple[int, str, str]:
    """Run ``python -m bgsave`` with stderr on a pseudo-terminal; send SIGINT once it printed ``interrupt_at``."""
    block_rich = "" if rich else "sys.modules['rich'] = None; "
    code = f"import sys; {block_rich}from bgsave.cli import main; sys.exit(main({argv!r}))"
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    terminal = bytearray()
    seen = threading.Event()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            terminal.extend(chunk)
            if interrupt_at is not None and interrupt_at.encode() in terminal and not seen.is_set():
                seen.set()
                proc.send_signal(signal.SIGINT)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=90)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, terminal.decode(errors="replace")


def test_progress_bar_on_a_terminal(local_run_dir: str) -> None:
    """With rich and stderr on a terminal, a progress bar is drawn there; the table still goes to stdout."""
    make_user_run(local_run_dir)
    code, out, terminal = on_a_terminal(["bench", local_run_dir, *TINY], rich=True)
    assert code == EXIT_OK, terminal
    assert "bgsave bench" in terminal
    assert " bgsave " in out
    assert "\x1b" not in out


def test_ctrl_c_on_a_terminal_exits_130_and_cleans_up(local_run_dir: str) -> None:
    """Without rich, progress is one rewritten line; Ctrl-C mid-run exits 130 and removes the scratch run."""
    make_user_run(local_run_dir)
    before = contents(local_run_dir)
    argv = ["bench", local_run_dir, "--sizes", "1,200", "--repeats", "3"]
    code, out, terminal = on_a_terminal(argv, rich=False, interrupt_at="1 MB bgsave 0/3")
    assert "bgsave bench: 1/" in terminal
    assert (code, out) == (EXIT_INTERRUPTED, ""), terminal
    assert "bgsave: interrupted" in terminal
    assert contents(local_run_dir) == before
