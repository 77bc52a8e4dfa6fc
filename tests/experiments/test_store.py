"""The SQLite store: claims, interrupted runs, concurrent readers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from flatminima.experiments.store import SCHEMA_VERSION, Store, StoreError

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
        assert run.status == "finished" and run.attempts == 1
        assert run.final == {**FINAL, "diverged_at_epoch": None}
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


def _set_owner_elsewhere(db_path: Path, heartbeat_hours_ago: float) -> None:
    """Pretend a process on another machine sharing the file owns the run."""
    heartbeat = datetime.now(timezone.utc) - timedelta(hours=heartbeat_hours_ago)
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute(
            "UPDATE runs SET owner = 'some-other-host:12345', heartbeat_at = ?",
            (heartbeat.isoformat(timespec="seconds"),),
        )
    connection.close()


def test_a_run_on_another_host_is_left_alone_while_its_heartbeat_is_fresh(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.record_epoch(run_id, EPOCH)
    _set_owner_elsewhere(db_path, heartbeat_hours_ago=0.5)
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) is None
        assert len(store.epochs(run_id)) == 1
        # A shorter patience than the heartbeat's age takes it over.
        assert store.claim("abc", CONFIG, {}, 1, stale_after_s=600) == run_id
        [run] = store.runs()
        assert run.attempts == 2 and store.epochs(run_id) == []


def test_a_run_on_another_host_with_a_stale_heartbeat_is_taken_over(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
    _set_owner_elsewhere(db_path, heartbeat_hours_ago=3)
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) == run_id
        with pytest.raises(ValueError, match="stale_after_s"):
            store.claim("abc", CONFIG, {}, 1, stale_after_s=0)


def test_every_epoch_refreshes_the_heartbeat(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
    _set_owner_elsewhere(db_path, heartbeat_hours_ago=3)
    with Store(db_path) as store:
        store.record_epoch(run_id, EPOCH)  # as the owner would: its heartbeat is now
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute("UPDATE runs SET owner = 'some-other-host:12345'")
    connection.close()
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) is None


def test_opening_an_up_to_date_database_writes_nothing(db_path: Path) -> None:
    # A report opened while a grid's worker holds the write lock must not wait for it (the
    # old store rewrote its schema on every open and failed with "database is locked").
    Store(db_path).close()
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "INSERT INTO runs (config_hash, config, dataset, model, method, seed, "
        "label_noise, status, attempts, created_at, started_at) VALUES "
        "('x', '{}', 'd', 'm', 'sgd', 0, 0, 'running', 1, 'now', 'now')"
    )
    opened: list[int] = []

    def read() -> None:
        with Store(db_path, create=False) as store:
            opened.append(len(store.runs()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    writer.execute("ROLLBACK")
    writer.close()
    assert opened == [0], "the reader blocked on the writer's lock"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.mkdir(), "is a directory"),
        (lambda path: path.write_text("not a database at all, just some text " * 40), "not a"),
        (
            lambda path: (
                sqlite3.connect(path).execute("CREATE TABLE photos (x)").connection.commit()
            ),
            "something else .*photos",
        ),
        (
            lambda path: sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}"),
            "newer flatminima",
        ),
    ],
    ids=["directory", "text-file", "other-sqlite", "newer-version"],
)
def test_a_file_that_is_not_our_database_is_refused_with_one_line(
    tmp_path: Path, make: object, message: str
) -> None:
    path = tmp_path / "x.db"
    make(path)  # type: ignore[operator]
    with pytest.raises(StoreError, match=message):
        Store(path)


def test_a_reader_does_not_create_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no database at"):
        Store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def _host() -> str:
    import socket

    return socket.gethostname()
