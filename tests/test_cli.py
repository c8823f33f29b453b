"""The ``bgsave`` command, through its entry point, on run directories the real manager wrote.

Most tests call ``bgsave.cli.main([...])`` in-process and parse ``--json`` output from capsys; a few
run ``python -m bgsave`` in a subprocess (which inherits the loopback S3 endpoint from the
environment). Run directories are local disk and S3 on the moto server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from bgsave import CheckpointManager
from bgsave.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_STORAGE, EXIT_USAGE, main

pytestmark = pytest.mark.timeout(90)

SCORES = [None, 0.5, 0.9, float("nan"), 0.2]
REWARDS = [1.0, -3.0, 2.0, 5.0, 0.0]


def make_run(run_dir: str) -> str:
    """Epochs 0-4 committed (scores above), a trainer state, and an uncommitted epoch 5; returns the checkpoint dir."""
    agent = torch.nn.Linear(4, 2)
    with CheckpointManager(run_dir, "cli-test", background=False) as mgr:
        for epoch, (score, reward) in enumerate(zip(SCORES, REWARDS, strict=True)):
            meta = {"agent_step": epoch * 100, "score": score, "avg_reward": reward, "total_time": 60.0 * epoch}
            mgr.save_agent(agent, epoch, {**meta, "note": "plain"})
        mgr.save_trainer_state(torch.optim.SGD(agent.parameters(), lr=0.1), 4, 400)
        checkpoint_dir = mgr.checkpoint_dir
    write(f"{checkpoint_dir}/model_0005.pt", b"a save in progress")
    return checkpoint_dir


def write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, data)


def names_in(url: str) -> set[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest) -> str:
    """A run directory from :func:`make_run`, on local disk and on S3."""
    url: str = request.getfixturevalue("local_run_dir" if request.param == "local" else "s3_run_dir")
    make_run(url)
    return url


# ---- listing and search -------------------------------------------------------------------------
def test_ls_json_has_every_checkpoint_with_sidecar_and_file_facts(
    run_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls --json: one object per .pt, sidecar keys plus path/size/committed; the uncommitted one marked."""
    rows = run_json(capsys, "ls", run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["committed"] for r in rows] == [True] * 5 + [False]
    fs, _ = fsspec.core.url_to_fs(run_dir)
    for row, score, reward in zip(rows, SCORES, REWARDS, strict=False):
        assert row["path"].endswith(f"/checkpoints/model_{row['epoch']:04d}.pt")
        assert row["path"].startswith("s3://") == run_dir.startswith("s3://")
        assert row["size"] == fs.size(row["path"]) > 0
        assert row["score"] == (None if score is None or score != score else score)  # NaN becomes null
        assert row["avg_reward"] == reward
        assert row["agent_step"] == row["epoch"] * 100
        assert row["run"] == "cli-test"
        assert row["note"] == "plain"
        assert row["mtime"] is not None
        assert row["trainer_state"] is (row["epoch"] == 4)
    assert rows[5] == {
        "epoch": 5,
        "path": rows[5]["path"],
        "size": len(b"a save in progress"),
        "committed": False,
        "mtime": rows[5]["mtime"],
        "trainer_state": False,
    }


def test_latest_and_best(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """latest prints the newest committed path; best ranks by --metric, --mode min flips the order."""
    checkpoints = f"{run_dir}/checkpoints"
    for argv, epoch in [
        (["latest", run_dir], 4),
        (["best", run_dir], 2),
        (["best", run_dir, "--mode", "min"], 4),
        (["best", run_dir, "--mode", "max"], 2),
        (["best", run_dir, "--metric", "avg_reward"], 3),
        (["best", run_dir, "--metric", "avg_reward", "--mode", "min"], 1),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert (code, err) == (EXIT_OK, "")
        assert out.strip().endswith(f"model_{epoch:04d}.pt"), argv
        found = run_json(capsys, *argv)
        assert (found["epoch"], found["committed"], found["path"]) == (epoch, True, out.strip())
    assert run_json(capsys, "latest", checkpoints)["epoch"] == 4  # the checkpoints folder itself works too


def test_ls_table_plain_without_rich(
    local_run_dir: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without rich the table is plain aligned text with the issue's columns and the trainer state."""
    make_run(local_run_dir)
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich...` now raises ImportError
    code, out, _ = run_cli(capsys, "ls", local_run_dir)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[1].split() == ["epoch", "agent_step", "score", "avg_reward", "total_time", "size", "age", "committed"]
    assert lines[2].split()[:5] == ["0", "0", "-", "1", "0.0s"]
    assert lines[4].split()[:5] == ["2", "200", "0.9", "2", "2m00s"]
    assert lines[5].split()[2] == "nan"
    assert lines[7].split()[:5] == ["5", "-", "-", "-", "-"]
    assert lines[7].split()[-1] == "no"
    assert "trainer states: 1 of 5 committed epochs; a resume continues from epoch 4" in out
    size_end = lines[1].index("size") + len("size")
    assert all(line[:size_end].endswith(("KiB", " B")) for line in lines[2:8])  # right-aligned under "size"


def test_ls_table_with_rich(local_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """With rich installed the table has the same columns and rows."""
    pytest.importorskip("rich")
    make_run(local_run_dir)
    code, out, _ = run_cli(capsys, "ls", local_run_dir)
    assert code == EXIT_OK
    assert "avg_reward" in out
    assert "total_time" in out
    assert sum(" yes" in line for line in out.splitlines()) == 5
    assert "trainer states: 1 of 5" in out


def test_show_one_checkpoint(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """show PATH (the .pt or its .yaml) gives the sidecar and file facts; an uncommitted .pt says so."""
    shown = run_json(capsys, "show", f"{run_dir}/checkpoints/model_0002.pt")
    assert shown == run_json(capsys, "show", f"{run_dir}/checkpoints/model_0002.yaml")
    listed = run_json(capsys, "ls", run_dir)[2]
    assert shown == listed
    pending = run_json(capsys, "show", f"{run_dir}/checkpoints/model_0005.pt")
    assert (pending["epoch"], pending["committed"], "score" in pending) == (5, False, False)
    code, out, _ = run_cli(capsys, "show", f"{run_dir}/checkpoints/model_0002.pt")
    assert code == EXIT_OK
    assert "agent_step" in out
    assert "200" in out


def test_empty_run_lists_nothing_and_searches_exit_1(local_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing run without committed checkpoints: ls is an empty array, latest/best exit 1 with a message."""
    os.makedirs(os.path.join(local_run_dir, "checkpoints"))
    write(os.path.join(local_run_dir, "checkpoints", "model_0003.pt"), b"uncommitted")
    assert [r["committed"] for r in run_json(capsys, "ls", local_run_dir)] == [False]
    for argv in (["latest", local_run_dir], ["best", local_run_dir], ["latest", local_run_dir, "--json"]):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out) == (EXIT_NOT_FOUND, "")
        assert err.startswith("bgsave: no committed checkpoint in ")


def test_best_without_a_finite_metric_exits_1(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """best by a metric no sidecar holds finite values for finds nothing."""
    code, out, err = run_cli(capsys, "best", run_dir, "--metric", "loss")
    assert (code, out) == (EXIT_NOT_FOUND, "")
    assert "finite 'loss'" in err


def test_missing_bucket_prefix_exits_2(s3_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bucket URL with nothing under it is a missing run directory, not an empty one."""
    code, _, err = run_cli(capsys, "latest", f"{s3_run_dir}/never-written")
    assert code == EXIT_USAGE
    assert "does not exist" in err


def test_storage_error_exits_3(
    local_run_dir: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that fails (the OS's directory listing wrapped to refuse) exits 3 naming the error."""
    make_run(local_run_dir)
    real_scandir = os.scandir

    def refusing_scandir(path: Any = ".") -> Any:
        if os.fspath(path).endswith("checkpoints"):
            raise PermissionError(f"permission denied: {path}")
        return real_scandir(path)

    # At the OS boundary: fsspec's local ls and bgsave's own listing both scan through it.
    monkeypatch.setattr(os, "scandir", refusing_scandir)
    code, out, err = run_cli(capsys, "ls", local_run_dir)
    assert (code, out) == (EXIT_STORAGE, "")
    assert "PermissionError" in err


def test_show_unreadable_sidecar_exits_3(
    local_run_dir: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """show of a checkpoint whose sidecar is not YAML: exit 3 naming the sidecar; ls marks it uncommitted."""
    checkpoints = make_run(local_run_dir)
    write(f"{checkpoints}/model_0001.yaml", b"epoch: [unclosed")
    code, _, err = run_cli(capsys, "show", f"{checkpoints}/model_0001.pt")
    assert code == EXIT_STORAGE
    assert err.startswith(f"bgsave: {checkpoints}/model_0001.yaml: not a readable YAML sidecar")
    assert caplog.records == []  # said once, as the error, not also as a skipped checkpoint
    assert [r["committed"] for r in run_json(capsys, "ls", local_run_dir)][1] is False
    caplog.clear()
    code, out, _ = run_cli(capsys, "ls", local_run_dir)
    assert code == EXIT_OK
    assert ["model_0001.yaml" in r.getMessage() for r in caplog.records] == [True]  # the YAML error in full
    assert f"* epoch 1: sidecar unreadable: {checkpoints}/model_0001.yaml: not a readable YAML sidecar" in out
    assert sum(line.rstrip().endswith("no*") for line in out.splitlines()) == 1


# ---- prune --------------------------------------------------------------------------------------
def test_prune_dry_run_then_prune(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run reports and changes nothing; the real prune deletes exactly that; uncommitted files stay."""
    checkpoints = f"{run_dir}/checkpoints"
    before = names_in(checkpoints)
    argv = ["prune", run_dir, "--keep-last", "1", "--keep-best", "1"]
    planned = run_json(capsys, *argv, "--dry-run")
    assert planned["dry_run"] is True
    assert [r["epoch"] for r in planned["deleted"]] == [0, 1, 3]
    assert [r["epoch"] for r in planned["kept"]] == [2, 4]
    assert names_in(checkpoints) == before

    code, out, _ = run_cli(capsys, *argv)
    assert code == EXIT_OK
    assert "deleted 3 checkpoint(s); kept epochs: 2, 4" in out
    assert "1 uncommitted" in out
    after = names_in(checkpoints)
    assert after == before - {f"model_{e:04d}.{s}" for e in (0, 1, 3) for s in ("pt", "yaml")}
    assert {"model_0005.pt", "trainer_0004.pt"} <= after
    assert [r["epoch"] for r in run_json(capsys, "ls", run_dir) if r["committed"]] == [2, 4]


def test_prune_min_mode_by_metric(local_run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--metric and --mode min choose which checkpoints count as best."""
    make_run(local_run_dir)
    argv = ["prune", local_run_dir, "--keep-last", "1", "--keep-best", "3", "--metric", "avg_reward"]
    result = run_json(capsys, *argv, "--mode", "min", "--dry-run")
    assert [r["epoch"] for r in result["kept"]] == [0, 1, 4]
    assert [r["epoch"] for r in run_json(capsys, *argv, "--dry-run")["kept"]] == [0, 2, 3, 4]
    result = run_json(capsys, *argv, "--mode", "min")
    assert [r["epoch"] for r in result["kept"]] == [0, 1, 4]
    assert [r["epoch"] for r in run_json(capsys, "ls", local_run_dir) if r["committed"]] == [0, 1, 4]


@pytest.mark.parametrize("command", ["best", "prune"])
def test_min_flag_is_a_deprecated_alias_of_mode_min(
    command: str, local_run_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old --min still means --mode min, with a deprecation note on stderr; --help says it is deprecated."""
    make_run(local_run_dir)
    extra = ["--keep-last", "1", "--keep-best", "1", "--dry-run"] if command == "prune" else []
    argv = [command, local_run_dir, *extra, "--metric", "avg_reward", "--json"]
    code, old, err = run_cli(capsys, *argv, "--min")
    assert code == EXIT_OK
    assert err == "bgsave: --min is deprecated, use --mode min (it will be removed in a later release)\n"
    code, new, err = run_cli(capsys, *argv, "--mode", "min")
    assert (code, err) == (EXIT_OK, "")
    assert json.loads(old) == json.loads(new)

    code, out, err = run_cli(capsys, *argv, "--min", "--mode", "max")
    assert (code, out) == (EXIT_USAGE, "")
    assert "not allowed with argument" in err
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == EXIT_OK
    assert "--mode {max,min}" in out
    assert "deprecated: use --mode min" in out


# ---- through the console entry point, in a fresh process ---------------------------------------
def bgsave(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bgsave", *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_python_m_bgsave_on_s3_and_local(s3_run_dir: str, local_run_dir: str) -> None:
    """`python -m bgsave` lists a bucket run (endpoint from the environment) and finds a local latest."""
    make_run(s3_run_dir)
    done = bgsave("ls", s3_run_dir, "--json")
    assert done.returncode == EXIT_OK, done.stderr
    assert [r["committed"] for r in json.loads(done.stdout)] == [True] * 5 + [False]

    make_run(local_run_dir)
    done = bgsave("latest", local_run_dir)
    assert (done.returncode, done.stdout.strip()) == (EXIT_OK, f"{local_run_dir}/checkpoints/model_0004.pt")


def test_help_shows_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """--help documents every command, examples and the exit codes; it exits 0."""
    code, out, _ = run_cli(capsys, "--help")
    assert code == EXIT_OK
    for text in ("ls", "latest", "best", "show", "prune", "examples:", "exit codes:", "bgsave prune runs/exp1"):
        assert text in out
    for line in ("0  success", "1  nothing found", "2  usage error", "3  storage or read error"):
        assert line in out


# ---- untrusted run directories ------------------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_listing_a_malicious_run_never_unpickles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pickles that would run code (.pt committed or not, trainer state) and a python-tagged YAML sidecar:
    ls, latest, best, show and prune --dry-run run none of it."""
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "pwned"
    for name in ("model_0001.pt", "model_0002.pt", "model_0003.pt", "trainer_0001.pt", "trainer_state.pt"):
        torch.save({"agent": Payload(str(marker))}, checkpoints / name)
    (checkpoints / "model_0001.yaml").write_text("epoch: 1\nscore: 0.9\nrun: evil\n")
    (checkpoints / "model_0003.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")

    # The payload is live: unpickling a copy fires it (at a different marker).
    canary = tmp_path / "canary"
    torch.save({"agent": Payload(str(canary))}, tmp_path / "canary.pt")
    torch.load(tmp_path / "canary.pt", weights_only=False)
    assert canary.exists()

    done = bgsave("ls", str(run_dir))
    assert done.returncode == EXIT_OK, done.stderr
    assert "model_0003.yaml" in done.stderr  # the python-tagged sidecar is reported unreadable
    for argv in (
        ["ls", str(run_dir), "--json"],
        ["latest", str(run_dir)],
        ["best", str(run_dir)],
        ["show", str(checkpoints / "model_0001.pt")],
        ["show", str(checkpoints / "model_0002.pt")],
        ["show", str(checkpoints / "trainer_state.pt")],
        ["show", str(checkpoints / "trainer_0001.pt")],
        ["prune", str(run_dir), "--keep-last", "1", "--dry-run"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == EXIT_OK, (argv, err)
    assert [r["committed"] for r in run_json(capsys, "ls", str(run_dir))] == [True, False, False]
    assert not marker.exists()
