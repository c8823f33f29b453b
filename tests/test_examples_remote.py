"""The bucket and W&B examples, run as a user runs them: trained, preempted, resumed; what they leave where."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from _scripts import run_script
from bgsave import CheckpointManager
from wandb_records import artifact_records, finished_records

# Epochs 0, 2, 4 are saved; the preemption after epoch 3 loses epoch 3, which the resumed job trains again.
ARGS = ("--epochs", "4", "--save-every", "2", "--stop-after", "3")
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE")
BEST = re.compile(r"^best: epoch (\d+), score ([\d.]+) \((.+)\); loaded back, it scores ([\d.]+)$", re.M)
LATEST = re.compile(r"^latest: (\S+)$", re.M)


def run_example(script: str, *args: str, env: dict[str, str] | None = None, expect: int = 0) -> str:
    """Run ``examples/<script>`` from the repository root with a deadline; returns stdout (+ stderr on failure)."""
    proc = run_script(f"examples/{script}", *args, timeout=180, env=env, expect=expect)
    return proc.stdout if expect == 0 else proc.stdout + proc.stderr


def assert_preempted_and_resumed(out: str) -> None:
    assert "-- preempted after epoch 3" in out
    assert re.search(r"^resumed from epoch 2 .*optimizer state restored\)$", out, re.M) is not None
    assert len(re.findall(r"^epoch +3 ", out, re.M)) == 2


def test_bucket_example_starts_its_own_s3_server_without_credentials() -> None:
    """With no endpoint or credentials set, it trains in a local server's bucket, lists it and exits cleanly."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    out = run_example("bucket_run.py", *ARGS, env=env)
    assert re.search(r"started a local S3 server \(moto\) at http://127\.0\.0\.1:\d+$", out, re.M) is not None
    run_dir = "s3://bgsave-demo/runs/cartpole"
    assert f"new run in {run_dir}/checkpoints" in out
    assert_preempted_and_resumed(out)
    # The `bgsave ls` table: every saved epoch committed, each with its late score.
    rows = re.findall(r"^ *(\d+) +(\d+) +([\d.]+) +\S+ +\S+ +\S+ \S+ +\S+ +yes *$", out, re.M)
    assert [int(epoch) for epoch, _, _ in rows] == [0, 2, 4]
    latest = LATEST.search(out)
    assert latest is not None
    assert latest[1] == f"{run_dir}/checkpoints/model_0004.pt"
    best = BEST.search(out)
    assert best is not None
    top_epoch = max(rows, key=lambda row: float(row[2]))[0]
    assert (best[1], best[3]) == (top_epoch, f"{run_dir}/checkpoints/model_{int(top_epoch):04d}.pt")
    assert best[2] == best[4]


def test_bucket_example_trains_in_the_given_bucket(s3_run_dir: str) -> None:
    """With --run-dir and the endpoint in the environment, the bucket holds what it printed, lock released."""
    out = run_example("bucket_run.py", "--run-dir", s3_run_dir, *ARGS)
    assert "started a local S3 server" not in out
    assert_preempted_and_resumed(out)

    with CheckpointManager(s3_run_dir, "test") as mgr:
        infos = mgr.checkpoints()
        state = mgr.load_trainer_state()
        latest, best = mgr.find_latest_checkpoint(), mgr.find_best_checkpoint()
    assert [info.epoch for info in infos] == [0, 2, 4]
    # Every score arrived through update_metadata, after its save.
    scores = {info.epoch: info.sidecar["score"] for info in infos}
    assert all(isinstance(score, float) for score in scores.values())
    assert state is not None
    assert (state["epoch"], state["agent_step"]) == (4, infos[-1].sidecar["agent_step"])

    printed_latest, printed_best = LATEST.search(out), BEST.search(out)
    assert printed_latest is not None and printed_best is not None
    assert printed_latest[1] == latest
    assert printed_best[3] == best
    assert printed_best[2] == f"{scores[int(printed_best[1])]:.1f}" == printed_best[4]

    import s3fs

    fs = s3fs.S3FileSystem()
    names = {p.rsplit("/", 1)[-1] for p in fs.find(s3_run_dir.removeprefix("s3://"), withdirs=False)}
    expected = {f"model_{e:04d}.{ext}" for e in (0, 2, 4) for ext in ("pt", "yaml")} | {
        "trainer_0002.pt",
        "trainer_0004.pt",
    }
    assert names == expected  # no writer lock left behind: every manager was closed


def test_bucket_example_refuses_to_guess_a_bucket_when_credentials_are_set(s3_endpoint: str) -> None:
    """Credentials in the environment and no --run-dir: a usage error naming them, nothing started."""
    out = run_example("bucket_run.py", *ARGS, expect=2)
    assert "AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID set: pass --run-dir" in out
    assert "started a local S3 server" not in out


def test_wandb_example_records_every_checkpoint_as_an_artifact_offline(wandb_dirs: str, tmp_path: Path) -> None:
    """Offline: both jobs log to one W&B run; each saved epoch is one model artifact of the committed file."""
    run_dir = tmp_path / "cartpole"
    out = run_example("wandb_run.py", "--run-dir", str(run_dir), *ARGS)
    assert "W&B mode 'offline', from WANDB_MODE" in out
    assert "-- preempted after epoch 3" in out
    assert "resumed from epoch 2" in out

    artifacts = artifact_records(wandb_dirs)
    by_epoch = {json.loads(a.metadata)["epoch"]: a for a in artifacts}
    assert sorted(by_epoch) == [0, 2, 4]  # epoch 2 once: the resumed job does not log it again
    assert len(artifacts) == 3
    assert {a.name for a in artifacts} == {"cartpole"}
    assert {a.type for a in artifacts} == {"model"}
    with CheckpointManager(run_dir, "cartpole") as mgr:
        sidecars = {info.epoch: info.sidecar for info in mgr.checkpoints()}
    for epoch, artifact in by_epoch.items():
        assert set(artifact.aliases) == {"latest", f"epoch_{epoch:04d}"}
        [entry] = artifact.manifest.contents
        assert entry.local_path == os.fspath(run_dir / "checkpoints" / f"model_{epoch:04d}.pt")
        assert os.path.isfile(entry.local_path)  # `wandb sync` reads it from there
    for epoch in (2, 4):
        metadata = json.loads(by_epoch[epoch].metadata)
        assert metadata["score"] == sidecars[epoch]["score"]
        assert metadata["wandb_run_id"] == sidecars[epoch]["wandb_run_id"]

    # The resumed job continued the same W&B run (its id kept in the sidecars), in a second run file.
    run_ids = {r.run.run_id for r in finished_records(wandb_dirs) if r.WhichOneof("record_type") == "run"}
    assert run_ids == {sidecars[0]["wandb_run_id"]}
    recorded = re.findall(r"recorded offline in (\S+)$", out, re.M)
    assert len(recorded) == 2
    assert all(Path(path).is_file() and Path(path).is_relative_to(wandb_dirs) for path in recorded)


def test_mirror_example_resumes_a_new_node_from_the_bucket(s3_endpoint: str) -> None:
    """Node 1 trains on local disk mirrored to a bucket and is lost; node 2 resumes its last epoch from the bucket."""
    bucket = f"mirror-example-{os.getpid()}"
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True).mkdir(bucket)
    mirror = f"s3://{bucket}/runs/cartpole"
    out = run_example("mirror_run.py", "--mirror", mirror, "--epochs", "4", "--save-every", "2")
    assert "mirror status (epoch:state): 0:mirrored, 2:mirrored, 4:mirrored" in out
    assert re.search(rf"node2/run: resumed epoch 4 from {re.escape(mirror)}/checkpoints/model_0004\.pt$", out, re.M)
    assert "0:mirrored, 2:mirrored, 4:mirrored, 6:mirrored, 8:mirrored" in out
    with CheckpointManager(mirror, "cartpole") as mgr:  # the bucket is a run directory of its own
        assert [info.epoch for info in mgr.checkpoints()] == [0, 2, 4, 6, 8]
