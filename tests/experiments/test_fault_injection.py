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

from flatminima.experiments.config import make_run_config
from flatminima.experiments.runner import run_grid
from flatminima.experiments.store import EPOCH_COLUMNS, FINAL_COLUMNS

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
TIMED = {"train_time_s"}
"""Wall-clock columns: the only ones allowed to differ between two trainings of a run."""


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


def _count(db_path: Path, query: str) -> int:
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute(query).fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:  # not created yet, or its schema not yet written
        return -1


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
            while process.poll() is None and _count(db_path, EPOCHS) < target:
                assert time.monotonic() < deadline, "the grid made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        mid_run += _count(db_path, RUNNING) > 0
    return mid_run


def _contents(db_path: Path) -> dict[str, Any]:
    """Every run by configuration hash: its row (times and bookkeeping aside), its epochs
    (times aside) and its weights' bytes."""
    connection = sqlite3.connect(db_path)
    connection.row_factory = sqlite3.Row
    try:
        contents = {}
        for run in connection.execute("SELECT * FROM runs ORDER BY config_hash"):
            epochs = connection.execute(
                f"SELECT {', '.join(EPOCH_COLUMNS)} FROM epochs WHERE run_id = ? ORDER BY epoch",
                (run["id"],),
            ).fetchall()
            contents[run["config_hash"]] = {
                "status": run["status"],
                "config": run["config"],
                "error": run["error"],
                "data": run["data_fingerprint"] if "data_fingerprint" in run.keys() else None,
                "final": {c: run[c] for c in FINAL_COLUMNS if c not in TIMED},
                "epochs": [{c: row[c] for c in EPOCH_COLUMNS if c not in TIMED} for row in epochs],
                "weights": (db_path.parent / run["weights_path"]).read_bytes()
                if run["weights_path"]
                else None,
            }
        return contents
    finally:
        connection.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    db_path = tmp_path_factory.mktemp("uninterrupted") / "grid.db"
    configs = [make_run_config(method=m, seed=s, **TRAINING) for s in SEEDS for m in METHODS]
    summary = run_grid(configs, db_path, progress=False)
    assert summary.finished == len(configs)
    return _contents(db_path)


def _check_resumed_grid(db_path: Path, jobs: int, expected: dict[str, Any]) -> None:
    final = subprocess.run(
        _command(db_path, jobs), env=os.environ.copy(), capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    resumed = _contents(db_path)
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
