"""The SQLite store: claims, interrupted runs, concurrent readers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import torch

from flatminima.experiments.store import Store

CONFIG = {"dataset": "mnist1d", "model": "cnn1d", "method": "sgd", "seed": 0, "label_noise": 0.0}
EPOCH = {
    "epoch": 1,
    "train_loss": 2.0,
    "test_loss": 2.1,
    "test_accuracy": 0.3,
    "learning_rate": 0.05,
    "train_time_s": 0.1,
    "passes": 10,
}
FINAL = {
    "train_time_s": 0.1,
    "passes": 10,
    "passes_per_step": 1,
    "final_test_accuracy": 0.3,
    "final_test_loss": 2.1,
    "final_train_accuracy_noisy": 0.4,
    "final_train_accuracy_clean": 0.5,
}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_database_is_in_wal_mode(db_path: Path) -> None:
    Store(db_path).close()
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_finished_run_is_not_claimed_again(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        assert run_id is not None
        store.record_epoch(run_id, EPOCH)
        path = store.save_weights("abc", {"w": torch.ones(2)})
        store.finish(run_id, FINAL, path)
        assert store.claim("abc", CONFIG, {}, 1) is None
        [run] = store.runs()
        assert run.status == "finished" and run.final == FINAL and run.attempts == 1
        assert torch.equal(torch.load(db_path.parent / run.weights_path)["w"], torch.ones(2))
        assert store.epochs(run_id) == [EPOCH]


def test_a_run_left_running_by_a_dead_process_is_redone_from_scratch(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.record_epoch(run_id, EPOCH)
    # Pretend a process that has exited owned it (a crash or a kill mid-run).
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute("UPDATE runs SET owner = ?", (f"{_host()}:{_dead_pid()}",))
    connection.close()
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) == run_id
        [run] = store.runs()
        assert run.attempts == 2 and run.status == "running"
        assert store.epochs(run_id) == []


def test_a_run_owned_by_a_live_process_is_left_alone(db_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with Store(db_path) as store:
            run_id = store.claim("abc", CONFIG, {}, 1)
            store.record_epoch(run_id, EPOCH)
        connection = sqlite3.connect(db_path)
        with connection:
            connection.execute("UPDATE runs SET owner = ?", (f"{_host()}:{sleeper.pid}",))
        connection.close()
        with Store(db_path) as store:
            assert store.claim("abc", CONFIG, {}, 1) is None
            assert len(store.epochs(run_id)) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_run_keeps_its_error_and_is_retried(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.fail(run_id, "RuntimeError: boom")
        [run] = store.runs()
        assert run.status == "failed" and run.error == "RuntimeError: boom"
        assert store.claim("abc", CONFIG, {}, 1) == run_id
        assert store.runs()[0].error is None


def test_non_finite_metrics_are_stored_as_null(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.record_epoch(run_id, {**EPOCH, "train_loss": float("nan")})
        assert store.epochs(run_id)[0]["train_loss"] is None


def test_readers_see_committed_rows_while_a_writer_is_open(db_path: Path) -> None:
    writer = Store(db_path)
    reader = Store(db_path)
    run_id = writer.claim("abc", CONFIG, {}, 1)
    for epoch in range(1, 4):
        writer.record_epoch(run_id, {**EPOCH, "epoch": epoch})
        assert [row["epoch"] for row in reader.epochs(run_id)] == list(range(1, epoch + 1))
    writer.close()
    reader.close()


def _host() -> str:
    import socket

    return socket.gethostname()
