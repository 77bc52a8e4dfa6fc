"""The SQLite store: claims, interrupted runs, concurrent readers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from flatminima.experiments.store import (
    OPTIONAL_EPOCH_COLUMNS,
    SCHEMA_VERSION,
    RunLostError,
    Store,
    StoreError,
)

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
        path = store.save_weights(run_id, "abc", {"w": torch.ones(2)})
        store.finish(run_id, FINAL, path)
        assert store.claim("abc", CONFIG, {}, 1) is None
        [run] = store.runs()
        assert run.status == "finished" and run.attempts == 1
        assert run.final == {
            **FINAL,
            "diverged_at_epoch": None,
            "final_validation_accuracy": None,
        }
        assert torch.equal(torch.load(db_path.parent / run.weights_path)["w"], torch.ones(2))
        # Columns an epoch may leave out come back as None.
        [stored] = store.epochs(run_id)
        assert stored == {**dict.fromkeys(OPTIONAL_EPOCH_COLUMNS), **EPOCH}


def test_a_run_left_running_by_a_dead_process_is_redone_from_scratch(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.record_epoch(run_id, EPOCH)
    # Pretend a process that has exited owned it (a crash or a kill mid-run).
    _edit(db_path, "UPDATE runs SET owner = ?", (f"{_host()}:{_dead_pid()}",))
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
        _edit(db_path, "UPDATE runs SET owner = ?", (f"{_host()}:{sleeper.pid}",))
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


def _edit(db_path: Path, statement: str, parameters: tuple = ()) -> None:
    """Change the file behind the store's back, as another process would."""
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute(statement, parameters)
    connection.close()


def _set_heartbeat(db_path: Path, hours_ago: float) -> None:
    heartbeat = datetime.now(timezone.utc) - timedelta(hours=hours_ago)
    _edit(db_path, "UPDATE runs SET heartbeat_at = ?", (heartbeat.isoformat(timespec="seconds"),))


def _set_owner_elsewhere(db_path: Path, heartbeat_hours_ago: float) -> None:
    """Pretend a process under another hostname (another container) owns the run."""
    _set_heartbeat(db_path, hours_ago=heartbeat_hours_ago)
    _edit(db_path, "UPDATE runs SET owner = 'some-other-host:12345'")


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
    _set_heartbeat(db_path, hours_ago=3)
    with Store(db_path) as store:
        store.record_epoch(run_id, EPOCH)  # its heartbeat is now
    _edit(db_path, "UPDATE runs SET owner = 'some-other-host:12345'")
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) is None


def test_a_run_taken_over_is_no_longer_written_by_its_old_owner(db_path: Path) -> None:
    # Process A (this one) looked dead to process B on another host, which took the run over.
    with Store(db_path) as store:
        run_id = store.claim("abc", CONFIG, {}, 1)
        store.record_epoch(run_id, EPOCH)
    _edit(db_path, "UPDATE runs SET owner = 'some-other-host:12345', attempts = 2")
    _edit(db_path, "DELETE FROM epochs")
    with Store(db_path) as store:
        with pytest.raises(RunLostError):
            store.record_epoch(run_id, {**EPOCH, "epoch": 2})
        with pytest.raises(RunLostError):
            store.save_weights(run_id, "abc", {"w": torch.ones(2)})
        with pytest.raises(RunLostError):
            store.finish(run_id, FINAL, "runs-weights/abc.pt")
        assert store.fail(run_id, "RuntimeError: late") is False
        [run] = store.runs()
        assert run.status == "running" and run.error is None and store.epochs(run_id) == []
    assert not (db_path.parent / "runs-weights" / "abc.pt").exists()
    assert list((db_path.parent / "runs-weights").glob("*.partial")) == []


def test_a_taken_over_run_does_not_fail_a_grid(db_path: Path, monkeypatch) -> None:
    # The runner stops a run it lost and leaves the new owner's outcome alone.
    from flatminima.experiments import runner
    from flatminima.experiments.config import make_run_config

    config = make_run_config(
        method="sgd", dataset="digits", model="mlp", epochs=1, train_size=64, seed=0
    )
    original_record = Store.record_epoch

    def taken_over_before_the_epoch(self, run_id, metrics):
        self._connection.execute("UPDATE runs SET owner = 'some-other-host:12345'")
        original_record(self, run_id, metrics)

    monkeypatch.setattr(Store, "record_epoch", taken_over_before_the_epoch)
    summary = runner.run_grid([config], db_path, progress=False)
    assert (summary.finished, summary.skipped, summary.failed) == (0, 1, [])
    row = sqlite3.connect(db_path).execute("SELECT status, owner, error FROM runs").fetchone()
    assert row == ("running", "some-other-host:12345", None)


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


def _open_and_claim(path: str, name: str, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    with Store(path) as store:
        assert store.claim(name, CONFIG, {}, 1) is not None


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    # SQLite answers "database is locked" at once, without waiting, to a process that switches
    # a new file to WAL while another does: the store retries. Forked (cheap: no new import).
    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        path = tmp_path / f"new-{round_}.db"
        start = context.Barrier(4)
        processes = [
            context.Process(target=_open_and_claim, args=(str(path), f"run{i}", start))
            for i in range(4)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [process.exitcode for process in processes] == [0, 0, 0, 0], f"round {round_}"
        with Store(path) as store:
            assert len(store.runs()) == 4


def test_a_file_that_is_not_ours_is_left_exactly_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "photos.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE photos (x)")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="something else"):
        Store(path)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_database_copied_out_of_wal_mode_is_switched_back_by_writers_only(db_path: Path) -> None:
    Store(db_path).close()
    sqlite3.connect(db_path).execute("PRAGMA journal_mode=DELETE").close()
    Store(db_path, create=False).close()  # a reader changes nothing
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    Store(db_path).close()
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_locked_database_is_reported_as_locked_not_as_foreign(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A version-1 file needs migrating, and another process holds the write lock past the
    # (shortened) timeout: the error says so, it does not call the file foreign.
    Store(db_path).close()
    connection = sqlite3.connect(db_path, isolation_level=None)
    connection.execute("PRAGMA user_version=1")
    connection.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr("flatminima.experiments.store.BUSY_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            Store(db_path)
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def test_a_database_path_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "a-file" / "runs.db")


def test_a_run_an_older_version_was_training_gets_a_grace_period_after_migration(
    db_path: Path,
) -> None:
    with Store(db_path) as store:
        store.claim("abc", CONFIG, {}, 1)
    started = (datetime.now(timezone.utc) - timedelta(hours=5)).isoformat(timespec="seconds")
    connection = sqlite3.connect(db_path)
    with connection:  # as version 1 wrote it: no heartbeat, started five hours ago elsewhere
        connection.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
        connection.execute("ALTER TABLE runs DROP COLUMN diverged_at_epoch")
        connection.execute("ALTER TABLE runs DROP COLUMN data_fingerprint")
        connection.execute(
            "UPDATE runs SET owner = 'some-other-host:12345', started_at = ?", (started,)
        )
        connection.execute("PRAGMA user_version=1")
    connection.close()
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) is None
        assert store.claim("abc", CONFIG, {}, 1, stale_after_s=1e-9) is not None
