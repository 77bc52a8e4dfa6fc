"""Fault injection: a real `flatminima compare` is killed with SIGKILL at random moments of its
training, several times, with one and with two worker processes, and resumed each time; the
database it ends with must hold exactly what an uninterrupted grid writes: the same runs, all
finished, the same epoch rows and metrics (times aside), and the same weights, byte for byte,
with no partial file left behind.

The moments are random but seeded (a failure reproduces): each kill waits until the grid has
recorded a random number of epochs, then a random fraction of a second more, so that kills land
before the first epoch, between epochs, while weights are saved and between runs.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from stored_grids import count_rows, stored_runs

from flatminima.experiments.config import make_run_config
from flatminima.experiments.runner import run_grid

TRAINING = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 2,
    "train_size": 1297,
    "batch_size": 64,
    "label_noise": 0.4,
}
METHODS = ("sgd", "sam")
SEEDS = (0, 1)
EPOCH_ROWS = len(METHODS) * len(SEEDS) * TRAINING["epochs"]
EPOCHS = "SELECT COUNT(*) FROM epochs"
RUNNING = "SELECT COUNT(*) FROM runs WHERE status = 'running'"


def _command(db_path: Path, jobs: int) -> list[str]:
    return [
        sys.executable, "-m", "flatminima.cli", "compare",
        "--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)),
        "--dataset", TRAINING["dataset"], "--model", TRAINING["model"],
        "--epochs", str(TRAINING["epochs"]), "--train-size", str(TRAINING["train_size"]),
        "--batch-size", str(TRAINING["batch_size"]),
        "--label-noise", str(TRAINING["label_noise"]),
        "--jobs", str(jobs), "--quiet", "--db", str(db_path),
    ]  # fmt: skip


def _kill_at_random_moments(db_path: Path, jobs: int, kills: int, rng: random.Random) -> int:
    """Start the grid ``kills`` times and SIGKILL it (the whole process group: parent and
    workers, as a killed session or a crashed machine would) at a random moment of each
    attempt; the number of kills that left a run part-way through (``running``)."""
    mid_run = 0
    for _ in range(kills):
        target = rng.randrange(0, EPOCH_ROWS)
        process = subprocess.Popen(
            _command(db_path, jobs),
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        try:
            while process.poll() is None and count_rows(db_path, EPOCHS) < target:
                assert time.monotonic() < deadline, "the grid made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        mid_run += count_rows(db_path, RUNNING) > 0
    return mid_run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    db_path = tmp_path_factory.mktemp("uninterrupted") / "grid.db"
    configs = [make_run_config(method=m, seed=s, **TRAINING) for s in SEEDS for m in METHODS]
    summary = run_grid(configs, db_path, progress=False)
    assert summary.finished == len(configs)
    return stored_runs(db_path)


def _check_resumed_grid(db_path: Path, jobs: int, expected: dict[str, Any]) -> None:
    final = subprocess.run(
        _command(db_path, jobs), env=os.environ.copy(), capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    resumed = stored_runs(db_path)
    assert sorted(resumed) == sorted(expected)
    for config_hash, run in expected.items():
        assert resumed[config_hash] == run, config_hash
    leftovers = [path.name for path in db_path.parent.rglob("*") if "partial" in path.name]
    assert leftovers == []
    # Nothing was trained twice into the same run: one row per configuration and epoch.
    connection = sqlite3.connect(db_path)
    try:
        counts = connection.execute("SELECT COUNT(*) FROM epochs GROUP BY run_id").fetchall()
    finally:
        connection.close()
    assert [count for (count,) in counts] == [TRAINING["epochs"]] * len(expected)


@pytest.mark.parametrize(("jobs", "kills"), [(1, 3), (2, 2)])
def test_a_grid_killed_at_random_moments_resumes_to_the_uninterrupted_database(
    tmp_path: Path, uninterrupted: dict[str, Any], jobs: int, kills: int
) -> None:
    db_path = tmp_path / "grid.db"
    mid_run = _kill_at_random_moments(db_path, jobs, kills, random.Random(jobs))
    assert mid_run >= 1, "no kill interrupted a run part-way through"
    _check_resumed_grid(db_path, jobs, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("seed", range(5))
def test_many_random_kills_still_resume_to_the_uninterrupted_database(
    tmp_path: Path, uninterrupted: dict[str, Any], jobs: int, seed: int
) -> None:
    db_path = tmp_path / "grid.db"
    _kill_at_random_moments(db_path, jobs, 6, random.Random(1000 * jobs + seed))
    _check_resumed_grid(db_path, jobs, uninterrupted)
