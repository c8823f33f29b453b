"""Security (issue 6, section 7): what an untrusted run directory or a careless name can and cannot make bgsave do.

* Sidecars are parsed with ``yaml.safe_load`` only: a python-tagged sidecar is skipped with a WARNING
  and runs nothing.
* Listing and search never unpickle: a ``.pt`` whose unpickling would run code is listed, searched and
  chosen as latest or best without running it (the CLI has its own test in ``test_cli.py``). A positive
  control shows each payload is live: ``load_agent`` does run it, as the README says.
* ``run_name`` and ``epoch`` cannot place a file outside ``{run_dir}/checkpoints``.
* Credentials given in ``storage_options`` or in the environment never reach bgsave's log records, its
  error messages (with their causes and tracebacks), or any object it writes, against a real S3 server
  on loopback (moto) with distinctive canary values.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch

from _models import Agent
from bgsave import (
    CheckpointManager,
    CheckpointWriteError,
    find_latest_checkpoint,
    load_checkpoint,
)
from bgsave.cli import main as cli_main

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parent.parent / "README.md"


# ---- payloads ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def python_tagged_sidecars(marker: Path) -> dict[str, str]:
    """YAML that a full loader would turn into code execution; safe_load refuses every one."""
    return {
        "object-apply": f"!!python/object/apply:os.system ['touch {marker}']\n",
        "object-apply-in-mapping": f"epoch: 3\nscore: !!python/object/apply:os.system ['touch {marker}']\n",
        "object-new": f"epoch: 3\nx: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
        "name": "epoch: 3\nx: !!python/name:os.system\n",
        "module": "epoch: 3\nx: !!python/module:os\n",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


def commit(run_dir: str, epoch: int, score: float, agent: Any = None) -> None:
    """A real committed checkpoint written by bgsave."""
    with CheckpointManager(run_dir, "sec") as mgr:
        mgr.save_agent(Agent(width=4) if agent is None else agent, epoch, {"score": score})


def plant(run_dir: str, epoch: int, payload: Payload, sidecar: str | None) -> None:
    """A hostile checkpoint: a .pt that runs code when unpickled, with the given sidecar text (or none)."""
    checkpoints = Path(run_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save({"agent": payload}, checkpoints / f"model_{epoch:04d}.pt")
    if sidecar is not None:
        (checkpoints / f"model_{epoch:04d}.yaml").write_text(sidecar)


def searches(run_dir: str) -> dict[str, Callable[[], Any]]:
    """Every listing and search entry point that must never unpickle."""
    checkpoints = f"{run_dir}/checkpoints"

    def via_manager(method: str, *args: Any) -> Callable[[], Any]:
        def call() -> Any:
            with CheckpointManager(run_dir, "reader") as mgr:
                return getattr(mgr, method)(*args)

        return call

    return {
        "checkpoints": via_manager("checkpoints"),
        "find_latest_checkpoint": via_manager("find_latest_checkpoint"),
        "find_best_checkpoint": via_manager("find_best_checkpoint"),
        "find_best_checkpoint-avg_reward": via_manager("find_best_checkpoint", "avg_reward"),
        "find_checkpoints_by_score": via_manager("find_checkpoints_by_score", 0.0),
        "bgsave.find_latest_checkpoint": lambda: find_latest_checkpoint(checkpoints),
    }


# ---- sidecars: safe_load only ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(python_tagged_sidecars(Path("m"))))
def test_a_python_tagged_sidecar_is_skipped_with_a_warning_and_runs_nothing(
    run_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A sidecar with python/* YAML tags: skipped with a WARNING naming it, nothing executed, search goes on."""
    marker = tmp_path / "pwned"
    commit(run_dir, 1, 0.1)
    commit(run_dir, 2, 0.2)
    plant(run_dir, 3, Payload(tmp_path / "pwned-pt"), python_tagged_sidecars(marker)[kind])
    caplog.set_level(logging.WARNING, logger="bgsave")
    for name, search in searches(run_dir).items():
        caplog.clear()
        result = search()
        if name == "checkpoints":
            assert [info.epoch for info in result] == [1, 2]
        elif name == "find_checkpoints_by_score":
            assert [os.path.basename(p) for p in result] == ["model_0001.pt", "model_0002.pt"]
        elif name == "find_best_checkpoint-avg_reward":
            assert result is None
        else:
            assert os.path.basename(result) == "model_0002.pt", name
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("bgsave")]
        assert any("model_0003.yaml" in r.getMessage() for r in warnings), (name, caplog.text)
    with CheckpointManager(run_dir, "reader") as mgr:
        assert isinstance(mgr.load_agent(), Agent)  # the latest committed: epoch 2, not the hostile 3
    assert not marker.exists()
    assert not (tmp_path / "pwned-pt").exists()


def test_update_metadata_on_a_python_tagged_sidecar_runs_nothing(run_dir: str, tmp_path: Path) -> None:
    """update_metadata reads the current sidecar with safe_load too: a hostile one fails the update, runs nothing."""
    marker = tmp_path / "pwned"
    commit(run_dir, 1, 0.1)
    sidecar = Path(run_dir) / "checkpoints" / "model_0001.yaml"
    sidecar.write_text(f"epoch: 1\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    mgr = CheckpointManager(run_dir, "sec")
    try:
        mgr.update_metadata(1, score=0.9)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.wait()
        assert "model_0001.yaml" in str(info.value)
    finally:
        mgr.close()
    assert not marker.exists()
    assert "python/object/apply" in sidecar.read_text()  # left as it was, not rewritten


def test_a_yaml_alias_bomb_sidecar_does_not_blow_up_the_cli(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny sidecar of nested aliases (6 levels, 10 each) gives a small `bgsave ls --json`, not megabytes."""
    commit(run_dir, 1, 0.1)
    commit(run_dir, 2, 0.2)
    lines = ["epoch: 2", "l0: &l0 [" + ", ".join(["x"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    (Path(run_dir) / "checkpoints" / "model_0002.yaml").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = cli_main(["ls", run_dir, "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert len(out) < 64 * 1024, f"{len(out)} bytes of output from a {sum(map(len, lines))}-byte sidecar"


# ---- listing and search never unpickle ----------------------------------------------------------------


def test_search_never_unpickles_a_malicious_checkpoint(run_dir: str, tmp_path: Path) -> None:
    """A committed .pt (valid sidecar, best score, newest) whose unpickling runs code: every listing and
    search call returns it without running it; only an explicit load does, as documented."""
    commit(run_dir, 1, 0.1)
    marker = tmp_path / "pwned"
    plant(run_dir, 2, Payload(marker), "epoch: 2\nagent_step: 0\nscore: 0.99\navg_reward: 1.0\nrun: evil\n")
    plant(run_dir, 3, Payload(marker), None)  # uncommitted: a .pt without its sidecar
    for name in ("trainer_state.pt", "trainer_0002.pt"):  # an older bgsave's trainer state, and today's
        torch.save({"optimizer_state": Payload(marker)}, Path(run_dir) / "checkpoints" / name)

    for name, search in searches(run_dir).items():
        result = search()
        assert not marker.exists(), f"{name} unpickled a checkpoint"
        if name == "checkpoints":
            assert [info.epoch for info in result] == [1, 2]
        elif name == "find_checkpoints_by_score":
            assert [os.path.basename(p) for p in result] == ["model_0001.pt", "model_0002.pt"]
        elif name == "find_best_checkpoint-avg_reward":
            assert os.path.basename(result) == "model_0002.pt"
        else:
            assert os.path.basename(result) == "model_0002.pt", name

    # The positive control: the payload is live, and loading is what runs it (README: load_agent unpickles).
    with CheckpointManager(run_dir, "reader") as mgr:
        mgr.load_agent(1)
        assert not marker.exists()
        mgr.load_agent()
    assert marker.exists()
    marker.unlink()
    load_checkpoint(f"{run_dir}/checkpoints/model_0002.pt")
    assert marker.exists()


def test_a_reading_manager_never_unpickles_the_trainer_state_until_asked(run_dir: str, tmp_path: Path) -> None:
    """checkpoints() and the find_* calls leave trainer_0001.pt alone; load_trainer_state is the explicit load."""
    commit(run_dir, 1, 0.1)
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state": Payload(marker), "epoch": 1}, Path(run_dir) / "checkpoints" / "trainer_0001.pt")
    with CheckpointManager(run_dir, "reader") as mgr:
        mgr.checkpoints()
        mgr.find_latest_checkpoint()
        mgr.find_best_checkpoint()
        assert not marker.exists()
        mgr.load_trainer_state()
    assert marker.exists()


# ---- names cannot escape {run_dir}/checkpoints ----------------------------------------------------------
# (run names that are paths are refused: rows run_name-* of test_bad_input_table.py)


def files_under(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize(
    "run_name",
    ["~", "$HOME", "%2e%2e%2fx", "C:x", "a:b", "name with spaces", "évil-ünïcode", ".hidden", "-rf", "a.b.c", "*"],
)
def test_odd_but_legal_run_names_write_only_inside_checkpoints(tmp_path: Path, run_name: str) -> None:
    """Accepted run names (shell-ish, URL-encoded, unicode) are data, never path parts: only checkpoints/ is written."""
    run = tmp_path / "run"
    with CheckpointManager(str(run), run_name) as mgr:
        mgr.save_agent(Agent(width=4), 3, {"score": 0.5, "../../outside": 1, "run": run_name})
        mgr.save_trainer_state(torch.optim.SGD(Agent(width=4).parameters(), lr=0.1), 3, 0)
        mgr.update_metadata(3, **{"../../also": 2})
    assert files_under(tmp_path) == {
        "run/checkpoints/model_0003.pt",
        "run/checkpoints/model_0003.yaml",
        "run/checkpoints/trainer_0003.pt",
    }
    assert CheckpointManager(str(run), run_name).checkpoints()[0].sidecar["run"] == run_name


@pytest.mark.parametrize("epoch", [0, 7, 9999, 10_000, 123_456_789, 10**30])
def test_any_valid_epoch_writes_inside_checkpoints(tmp_path: Path, epoch: int) -> None:
    """Any non-negative epoch, however large, names a file directly in checkpoints/ and nowhere else."""
    run = tmp_path / "run"
    with CheckpointManager(str(run), "epochs") as mgr:
        path = mgr.save_agent(Agent(width=4), epoch)
    assert os.path.dirname(path) == str(run / "checkpoints")
    assert files_under(tmp_path) == {f"run/checkpoints/model_{epoch:04d}.pt", f"run/checkpoints/model_{epoch:04d}.yaml"}


def test_a_symlink_planted_at_the_temp_name_is_not_followed(run_dir: str, tmp_path: Path) -> None:
    """A symlink planted at the temp name (.model_0003.pt.bgsave-tmp -> elsewhere) is never written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    with CheckpointManager(run_dir, "sec") as mgr:
        mgr.save_agent(Agent(width=4), 2)
        mgr.wait()
        os.symlink(victim, Path(run_dir) / "checkpoints" / ".model_0003.pt.bgsave-tmp")
        mgr.save_agent(Agent(width=4), 3)
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(Path(run_dir) / "checkpoints" / "model_0003.pt")


# ---- credentials never leak -------------------------------------------------------------------------

KEY = "AKIACANARYKEYID00042"
SECRET = "canary/Secret+Access=Key-9f8e7d"
ENV_KEY = "AKIAENVCANARYKEYID77"
ENV_SECRET = "env/Canary+Secret=Value-1a2b3c"
ENV_TOKEN = "envCanarySessionToken//AAAA+BBBB=="
CANARIES = (KEY, SECRET, ENV_KEY, ENV_SECRET, ENV_TOKEN)


def fast_failing(options: dict[str, Any]) -> dict[str, Any]:
    """storage_options that give up at once (no botocore retries)."""
    return {**options, "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """s3fs against the loopback moto server, instance cache cleared, its own retries off."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3fs
    s3fs.S3FileSystem.clear_instance_cache()


def leaks(text: str) -> list[str]:
    """Which canaries appear in text, as they are or URL-encoded, or a distinctive tail of a secret."""
    parts = {*CANARIES, *(quote(c, safe="") for c in CANARIES), *(re.split(r"[/]", s)[-1] for s in CANARIES)}
    return sorted(p for p in parts if p in text)


def everything_said(exc: BaseException) -> str:
    """An exception's message, its causes' and contexts' messages and reprs, and the formatted traceback."""
    out: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out += [str(e), repr(e), *map(str, e.args)]
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    out += traceback.format_exception(exc)
    return "\n".join(out)


def bucket_contents(s3fs_module: Any, options: dict[str, Any], bucket: str) -> dict[str, bytes]:
    fs = s3fs_module.S3FileSystem(**options, skip_instance_cache=True)
    return {path: fs.cat_file(path) for path in fs.find(bucket)}


def bgsave_log(caplog: pytest.LogCaptureFixture) -> str:
    """Every record bgsave logged, with arguments and any exception text (third-party loggers left out)."""
    records = [r for r in caplog.records if r.name.startswith("bgsave")]
    assert records, "bgsave logged nothing at DEBUG: the check would prove nothing"
    formatter = logging.Formatter()
    return "\n".join(formatter.format(r) for r in records)


@pytest.mark.parametrize("where", ["storage_options", "environment"])
def test_credentials_never_reach_logs_errors_or_files(
    s3: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Canary credentials (in storage_options, or AWS_* variables): a good run and a failing one (a missing bucket)
    leave them out of bgsave's DEBUG log, every error message and traceback, the sidecars and the lock."""
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    if where == "storage_options":
        options.update(key=KEY, secret=SECRET)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
        monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    options = fast_failing(options)
    caplog.set_level(logging.DEBUG, logger="bgsave")
    bucket = f"sec-{uuid.uuid4().hex[:12]}"
    s3.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)

    # A run that works: save, update, trainer state, list, load, and the lock held meanwhile.
    agent = Agent(width=4)
    run = f"s3://{bucket}/runs/x"
    with CheckpointManager(run, "creds", storage_options=options) as mgr:
        mgr.save_agent(agent, 1, {"score": 0.5})
        mgr.save_trainer_state(torch.optim.SGD(agent.parameters(), lr=0.1), 1, 0)
        mgr.wait()
        objects = bucket_contents(s3, options, bucket)  # the lock is held now: check it too
        assert any(p.endswith(".bgsave-writer.lock") for p in objects)
        mgr.update_metadata(1, score=0.7)
        assert [info.epoch for info in mgr.checkpoints()] == [1]
        assert isinstance(mgr.load_agent(), Agent)
    objects.update(bucket_contents(s3, options, bucket))
    assert any(p.endswith("model_0001.yaml") for p in objects)
    for path, data in objects.items():
        assert not leaks(data.decode("latin-1")), path
    assert not leaks(repr(CheckpointManager(run, "creds", storage_options=options).checkpoints()))

    # Runs that fail: a bucket that does not exist, for writing (the lock) and for reading.
    missing = f"s3://nosuch-{uuid.uuid4().hex[:12]}/runs/x"
    errors: list[BaseException] = []
    mgr = CheckpointManager(missing, "creds", storage_options=options)
    try:
        with pytest.raises(CheckpointWriteError) as info:
            mgr.save_agent(agent, 1)
            mgr.wait()
        errors.append(info.value)
    finally:
        mgr.close()
    with pytest.raises(Exception) as read_error:  # whatever it is, it must not carry credentials
        load_checkpoint(f"{missing}/checkpoints/model_0001.pt", storage_options=options)
    errors.append(read_error.value)
    for error in errors:
        said = everything_said(error)
        assert "nosuch-" in said  # the message names the URL...
        assert not leaks(said), said  # ...and nothing secret
    assert not leaks(bgsave_log(caplog))


def test_cli_storage_options_never_echo_credentials(
    s3: Any, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bgsave ls` with --storage-option key=/secret= on a missing bucket: the error names the URL, not the secret."""
    code = cli_main(
        [
            "ls",
            f"s3://nosuch-{uuid.uuid4().hex[:12]}/runs/x",
            "--storage-option",
            f"key={KEY}",
            "--storage-option",
            f"secret={SECRET}",
            "--storage-option",
            f'client_kwargs={{"endpoint_url": "{s3_endpoint}"}}',
        ]
    )
    out, err = capsys.readouterr()
    assert code != 0
    assert "nosuch-" in err
    assert not leaks(out + err)


# ---- the README says it ----------------------------------------------------------------------------------


def test_readme_says_plainly_that_loading_unpickles() -> None:
    """The README's Security section: load_agent/load_checkpoint unpickle (run code); trust; listing never unpickles."""
    text = README.read_text()
    match = re.search(r"^## Security\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "README has no '## Security' section"
    section = " ".join(match.group(1).split())
    for phrase in ("load_agent", "load_checkpoint", "weights_only=False", "unpickles", "runs code", "trust"):
        assert phrase in section, phrase
    assert "safe_load" in section
    assert "never unpickle" in section
    assert "outside `{run_dir}/checkpoints`" in section


def test_docstrings_of_the_loading_calls_warn_too() -> None:
    """help(load_agent) and help(load_checkpoint) warn that loading runs code from the file."""
    for doc in (CheckpointManager.load_agent.__doc__, load_checkpoint.__doc__):
        assert doc is not None
        assert re.search(r"unpickle|arbitrary code|runs code", doc), doc
        assert "trust" in doc


def test_the_payload_runs_only_when_unpickled(tmp_path: Path) -> None:
    """Sanity: the payload class writes its marker only when unpickled (so a missing marker means nothing ran)."""
    marker = tmp_path / "m"
    path = tmp_path / "p.pt"
    torch.save(Payload(marker), path)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()
