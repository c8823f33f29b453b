"""SIGKILL crash consistency: a child saving in a loop is killed at random moments; fresh processes check the latest.

The harness lives in ``crash_child.py`` (shared with ``scripts/crash_soak.py``, the long version). Each
kill's delay comes from a seeded RNG; the seed is printed (shown with a failure), kept as the report
property ``crash_seed`` and named in the final checks' messages; ``BGSAVE_CRASH_SEED`` reruns with it.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator

import pytest

import crash_child

LOCAL_KILLS = 20
S3_KILLS = 8


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The kill delays' seed: printed (a failure's captured stdout) and kept in the test report's user_properties.

    Not ``record_property``: with junit_family xunit2 (pytest's default) it warns, and warnings are errors
    here. The report's user_properties still reach --junitxml and any reporting plugin.
    """
    seed = int(os.environ.get("BGSAVE_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash seed {seed} (rerun with BGSAVE_CRASH_SEED={seed})")
    request.node.user_properties.append(("crash_seed", seed))
    return seed


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server in its own process, so it outlives the children the test kills."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with crash_child.moto_server() as endpoint:
        yield endpoint


def _check_final(records: list[crash_child.KillRecord], final: dict[str, object], seed: int) -> None:
    """The final check; each message names the seed, so even a one-line failure summary (-ra) shows it."""
    print(crash_child.summarize(records))
    rerun = f"(rerun with BGSAVE_CRASH_SEED={seed})"
    # About half the kills leave a temp file, an orphan .pt, an unfinished upload or a lost epoch: none
    # at all would mean the kills missed the writes this test is about.
    assert crash_child.interrupted_saves(records) > 0, f"no kill interrupted a save {rerun}"
    assert isinstance(final["epoch"], int), f"{final} {rerun}"
    assert final["epoch"] >= records[-1].epoch_after >= 1, f"final {final['epoch']}, last kill {records[-1]} {rerun}"
    assert isinstance(final["temps"], list), f"{final} {rerun}"
    assert len(final["temps"]) <= crash_child.MAX_TEMPS_LEFT, f"temp files left: {final['temps']} {rerun}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_sigkill_mid_save_local(tmp_path: os.PathLike[str], direct: bool, seed: int) -> None:
    """After each of 20 SIGKILLs mid-save on local disk, a fresh process loads the latest intact; <= 1 epoch lost.

    ``o-direct``: the children write their 3 MB checkpoints past the page cache, as large ones are.
    """
    run_dir = os.path.join(os.fspath(tmp_path), "run")
    env = {crash_child.DIRECT_MIN_ENV: str(2**20)} if direct else None
    records = crash_child.crash_loop(run_dir, kills=LOCAL_KILLS, seed=seed, max_delay=0.4, env=env)
    assert len(records) == LOCAL_KILLS, f"seed {seed}"
    _check_final(records, crash_child.verify_in_fresh_interpreter(run_dir), seed)


@pytest.mark.timeout(150)
def test_sigkill_mid_upload_s3(moto_endpoint: str, seed: int) -> None:
    """After each of 8 SIGKILLs mid-upload to S3, a fresh process loads the latest intact; <= 1 epoch lost."""
    bucket = f"crash-{uuid.uuid4().hex[:12]}"
    crash_child.make_bucket(moto_endpoint, bucket)
    run_dir = f"s3://{bucket}/runs/crash"
    env = crash_child.s3_env(moto_endpoint)
    records = crash_child.crash_loop(run_dir, kills=S3_KILLS, seed=seed, max_delay=1.0, env=env)
    assert len(records) == S3_KILLS, f"seed {seed}"
    _check_final(records, crash_child.verify_in_fresh_interpreter(run_dir, env), seed)
