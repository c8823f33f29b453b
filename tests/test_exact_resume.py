"""kill -9 anywhere, resume, same result: the RL example SIGKILLed at random moments ends bitwise as if left alone.

The harness lives in ``resume_harness.py`` (shared with ``scripts/resume_soak.py``, the long version). The
kill delays come from a seeded RNG; the seed is printed (shown with a failure), kept as the report
property ``resume_seed`` and named in every failure message; ``BGSAVE_RESUME_SEED`` reruns with it.

Most of a job's time is its start (importing torch, and torch._dynamo with the first optimizer: about 4 s
of one core), so the scenarios run side by side from one module fixture, each in its own thread driving
its own processes, and each test waits for its own: on two cores the module takes about as long as its
longest scenario instead of their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import resume_harness
from resume_harness import Command, Job, Result

KILLS = 5
# Every epoch is saved, so a kill can land before, during or after a save. 12 epochs train in about 2 s:
# a delay of up to 0.6 s after a job's start line covers the epochs, the background writes and the run's
# end, and the kills fit in one or two rounds (half the kills come just after a save instead: the harness).
EPOCHS = 12
MAX_DELAY = 0.6
KEEP_LAST = {"keep-all": 0, "keep-last-2": 2}


@dataclass(frozen=True)
class Scenarios:
    """The module's runs, started together: the uninterrupted one, a kill loop per retention, the epoch-0 pair."""

    seed: int
    reference: Future[str]
    loops: dict[str, Future[Result]]
    from_epoch_0: Future[tuple[Job, Job]]


def _stop_at_0_then_train(tmp: Path) -> tuple[Job, Job]:
    """``--epochs 0`` (a new run saved as epoch 0, nothing trained), then the full command on the same run."""
    run_dir = str(tmp / "run")
    first = Job(Command(0).args(run_dir), None, tmp / "first.stderr")
    first.finish(300)
    second = Job(Command(EPOCHS).args(run_dir), None, tmp / "second.stderr")
    second.finish(300)
    return first, second


def _run_dirs(tmp: Path) -> Callable[[int], str]:
    """A new run directory per round of a kill loop."""
    return lambda n: str(tmp / f"run{n}")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenarios]:
    """Every run of this module, started at once; waits for all of them at the end (no job outlives it)."""
    seed = resume_harness.seed_from_env()
    print(f"resume seed {seed} (rerun with {resume_harness.SEED_ENV}={seed})")
    with ThreadPoolExecutor(max_workers=2 + len(KEEP_LAST), thread_name_prefix="resume") as pool:
        # Retention does not change the weights: one uninterrupted run, keeping everything, serves all.
        ref_dir = tmp_path_factory.mktemp("reference")
        reference = pool.submit(
            resume_harness.run_reference, Command(EPOCHS).args(str(ref_dir / "run")), ref_dir / "stderr"
        )
        loops = {}
        for name, keep_last in KEEP_LAST.items():
            tmp = tmp_path_factory.mktemp(name)
            (tmp / "stderr").mkdir()
            loops[name] = pool.submit(
                resume_harness.kill_loop,
                Command(EPOCHS, save_every=1, keep_last=keep_last),
                _run_dirs(tmp),
                kills=KILLS,
                seed=seed,
                max_delay=MAX_DELAY,
                reference=reference.result,
                stderr_dir=tmp / "stderr",
            )
        from_epoch_0 = pool.submit(_stop_at_0_then_train, tmp_path_factory.mktemp("epoch0"))
        yield Scenarios(seed, reference, loops, from_epoch_0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("retention", list(KEEP_LAST))
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(
    scenarios: Scenarios, retention: str, request: pytest.FixtureRequest
) -> None:
    """Five SIGKILLs, each followed by a resume of the newest epoch with its own trainer state; same final digest."""
    request.node.user_properties.append(("resume_seed", scenarios.seed))
    rerun = f"(rerun with {resume_harness.SEED_ENV}={scenarios.seed})"
    print(f"resume seed {scenarios.seed} {rerun}")
    # kill_loop raises on the first resume that is not of the newest committed epoch with that epoch's own
    # trainer state, and on the first round whose final digest differs from the reference.
    result = scenarios.loops[retention].result()
    summary = result.summary()
    print(summary)
    assert summary["kills"] == KILLS, rerun
    assert summary["all_digests_equal"], f"{summary['final_digests']} != {summary['reference_digest']} {rerun}"
    resumed = [r for r in result.records if r.resumed_epoch is not None]
    assert resumed, f"no kill left a committed checkpoint to resume {rerun}"
    assert all(r.trainer_state_epoch == r.resumed_epoch == r.newest_committed for r in resumed), rerun


@pytest.mark.timeout(300)
def test_run_resumed_from_epoch_0_continues_the_same_random_stream(scenarios: Scenarios) -> None:
    """Stopped at epoch 0 (RNG states only, no optimizer state yet), then trained on: the uninterrupted weights."""
    first, second = scenarios.from_epoch_0.result()
    assert any(line.startswith("new run in ") for line in first.lines), first.lines
    assert "resumed from epoch 0 (agent_step 0, RNG state of epoch 0 restored)" in second.lines, second.lines
    assert second.digest == scenarios.reference.result()
