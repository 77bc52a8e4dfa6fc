"""The runner and store under faults and odd inputs (issue 15, items 8 to 18): each test
reproduces one failure an adversarial pass found, and checks that it is now one line, refused
before training, or survived."""

from __future__ import annotations

import errno
import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import matplotlib.figure
import numpy as np
import pytest
import torch
from filesystems import fill, read_only_copy, small_disk

from flatminima.cli import main
from flatminima.experiments import data as data_module
from flatminima.experiments import runner, sharpness_runs
from flatminima.experiments import store as store_module
from flatminima.experiments.config import ConfigError, make_run_config
from flatminima.experiments.grid import MAX_GRID_RUNS, Assignment, expand_grid, parse_seeds
from flatminima.experiments.report import summarize, write_report
from flatminima.experiments.runner import WeightsFileError, load_trained_model, run_grid
from flatminima.experiments.sharpness_runs import SharpnessSettings, measure_runs
from flatminima.experiments.store import DataMismatchError, Store
from flatminima.experiments.workers import Event, run_tasks

TINY_FLAGS = [
    "--epochs", "2", "--train-size", "256", "--batch-size", "64", "--label-noise", "0.4",
    "--quiet",
]  # fmt: skip
TINY = {"dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64, "train_size": 256,
        "label_noise": 0.4}  # fmt: skip
QUICK_SHARPNESS = {"num_probes": 2, "max_iter": 5, "steps": 1, "num_samples": 1}


def _grid(tiny: dict[str, Any], methods=("sgd", "sam"), seeds=(0, 1)) -> list:
    return [make_run_config(method=m, seed=s, **tiny) for s in seeds for m in methods]


def _one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


def _partials(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if "partial" in path.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Four finished tiny runs (two methods, two seeds): copy before changing."""
    db_path = tmp_path_factory.mktemp("trained") / "runs.db"
    configs = _grid(dict(TINY))
    assert run_grid(configs, db_path, progress=False).finished == 4
    return db_path, configs


def _copy(db_path: Path, directory: Path) -> Path:
    target = directory / db_path.name
    with sqlite3.connect(db_path) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    weights = directory / f"{db_path.stem}-weights"
    weights.mkdir()
    for file in (db_path.parent / f"{db_path.stem}-weights").iterdir():
        (weights / file.name).write_bytes(file.read_bytes())
    return target


# --- 8: absurd grids -------------------------------------------------------------------------


def test_8_an_absurd_seed_range_is_refused_in_one_line_before_it_is_expanded(
    capsys: pytest.CaptureFixture[str], db_path: Path
) -> None:
    with pytest.raises(ConfigError, match=f"at most {MAX_GRID_RUNS}"):
        parse_seeds(["0-1000000000"])
    status = main(["compare", "--methods", "sgd", "--seeds", "0-1000000000", "--db", str(db_path)])
    assert status == 2
    assert "more than 10000 seeds" in _one_line(capsys.readouterr().err)
    assert not db_path.exists()


def test_8_a_grid_whose_sweeps_multiply_past_the_limit_is_refused_before_it_is_built() -> None:
    # 10 sweeps of 10 values: 10^10 combinations, counted and refused, never enumerated.
    sweeps = [Assignment("tilted-sam", "tilt", tuple(str(v) for v in range(1, 11)))] + [
        Assignment("tilted-sam", name, tuple(f"0.{v}" for v in range(1, 11)))
        for name in ("rho", "radius", "noise_scale")
    ]
    with pytest.raises(ConfigError, match=r"the grid is 20000 runs"):
        expand_grid(
            ["tilted-sam"], list(range(2)), [], sweeps, {"dataset": "mnist1d", "model": "mlp"}
        )


# --- 9: a full disk --------------------------------------------------------------------------


class _FullDisk:
    """A file object that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path: Path, room: int) -> None:
        self.stream = open(path, "wb")
        self.room = room

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.stream.write(data[: self.room])
        self.room -= min(self.room, len(data))
        if self.room == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stream.close()


def test_9_saving_weights_to_a_full_disk_raises_and_leaves_no_partial_file(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", {"dataset": "d", "model": "m", "method": "x", "seed": 0,
                                     "label_noise": 0.0}, {}, 1)  # fmt: skip
        monkeypatch.setattr(
            store_module, "open", lambda path, mode: _FullDisk(path, 100), raising=False
        )
        with pytest.raises(OSError) as raised:
            store.save_weights(run_id, "abc", {"w": torch.ones(1000)})
        assert store_module.out_of_space(raised.value)
        assert list(store.weights_dir.iterdir()) == []  # no <hash>.pt.<uuid>.partial


def test_9_a_full_disk_stops_the_grid_in_one_line_and_a_resume_leaves_nothing_behind(
    tiny: dict[str, Any], db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    configs = _grid(tiny, methods=("sgd",), seeds=(0, 1, 2))
    saved = []

    def full(self: Store, run_id: int, config_hash: str, state: Any) -> str:
        saved.append(config_hash)
        partial = self.weights_dir / f"{config_hash}.pt.deadbeef.partial"
        partial.write_bytes(b"half")  # as a process killed mid-write leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(partial))

    monkeypatch.setattr(Store, "save_weights", full)
    summary = run_grid(configs, db_path, progress=False)
    assert summary.stopped is not None and "no space left" in summary.stopped
    assert len(saved) == 1 and summary.failed == []  # the other runs were not tried
    monkeypatch.undo()

    status = main(
        ["compare", "--methods", "sgd", "--seeds", "0-2", *TINY_FLAGS, "--db", str(db_path)]
    )
    assert status == 0, capsys.readouterr().err
    with Store(db_path) as store:
        assert [run.status for run in store.runs()] == ["finished"] * 3
    assert _partials(db_path.parent) == []


def test_9_the_cli_says_one_line_and_stops_when_the_disk_is_full(
    tiny: dict[str, Any], db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]

    def record_epoch(self: Store, run_id: int, metrics: Any) -> None:
        raise error

    monkeypatch.setattr(Store, "record_epoch", record_epoch)
    status = main(
        ["compare", "--methods", "sgd,sam", "--seeds", "0", *TINY_FLAGS, "--db", str(db_path)]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert "grid stopped: no space left" in captured.err and "Traceback" not in captured.err
    assert captured.err.count("grid stopped") == 1


def test_9_a_report_written_to_a_full_disk_is_one_line_and_leaves_no_partial_plot(
    trained: tuple[Path, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def full(self: Any, path: Any, **kwargs: Any) -> None:
        with open(path, "wb") as stream:
            stream.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = tmp_path / "report"
    status = main(["report", "--db", str(trained[0]), "--out", str(out)])
    assert status == 1
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert _partials(out) == [] and list(out.rglob("*.png")) == []


def test_9_a_real_full_disk_stops_compare_in_one_line_with_nothing_left_behind(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk", size="8m") as disk:
        db_path = disk / "runs.db"
        command = [
            sys.executable, "-m", "flatminima.cli", "compare", "--methods", "sgd,sam",
            "--seeds", "0-3", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
            "--quiet", "--db", str(db_path),
        ]  # fmt: skip
        filler = fill(disk, leave_bytes=500_000)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "grid stopped" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
        assert _partials(disk) == []
        # A report written to the full disk (from a copy of the database elsewhere, which
        # SQLite can open): one line, no partial file either.
        with sqlite3.connect(db_path) as source, sqlite3.connect(tmp_path / "copy.db") as copy:
            source.backup(copy)
        (disk / "report").mkdir()
        full = fill(disk / "report", leave_bytes=0)
        report = [sys.executable, "-m", "flatminima.cli", "report", "--db",
                  str(tmp_path / "copy.db"), "--out", str(disk / "report")]  # fmt: skip
        result = subprocess.run(report, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        assert "No space left on device" in _one_line(result.stderr)
        assert _partials(disk) == []
        full.unlink()
        filler.unlink()
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert _partials(disk) == []
        with Store(db_path) as store:
            assert [run.status for run in store.runs()] == ["finished"] * 8


# --- 10 and 11: what cannot be written -------------------------------------------------------


def test_10_report_reads_a_database_in_a_read_only_directory(
    trained: tuple[Path, list], tmp_path: Path, capsys: Any
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _copy(trained[0], source)
    with read_only_copy(source, tmp_path / "ro") as read_only:
        status = main(
            ["report", "--db", str(read_only / "runs.db"), "--out", str(tmp_path / "out")]
        )
        assert status == 0, capsys.readouterr().err
        assert sorted(path.name for path in read_only.iterdir()) == ["runs-weights", "runs.db"]
    assert (tmp_path / "out" / "report.md").exists()


def test_10_compare_on_a_read_only_database_refuses_in_one_line_before_training(
    trained: tuple[Path, list], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _copy(trained[0], source)
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained"))
    with read_only_copy(source, tmp_path / "ro") as read_only:
        status = main(["compare", "--methods", "sgd", "--seeds", "5,6", *TINY_FLAGS,
                       "--db", str(read_only / "runs.db")])  # fmt: skip
    assert status == 2
    assert "cannot" in _one_line(capsys.readouterr().err)


def test_10_sharpness_on_a_read_only_database_refuses_in_one_line_before_measuring(
    trained: tuple[Path, list], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _copy(trained[0], source)
    monkeypatch.setattr(sharpness_runs, "measure_run", lambda *a, **k: pytest.fail("measured"))
    with read_only_copy(source, tmp_path / "ro") as read_only:
        status = main(["sharpness", "--examples", "32", "--quiet", "--out", str(tmp_path / "o"),
                       "--db", str(read_only / "runs.db")])  # fmt: skip
    assert status == 2
    assert "cannot write the database" in _one_line(capsys.readouterr().err)


def test_11_an_unwritable_weights_folder_is_refused_before_training(
    tiny: dict[str, Any], db_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (db_path.parent / "runs-weights").write_text("a file where the folder should be")
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained"))
    status = main(
        ["compare", "--methods", "sgd", "--seeds", "0", *TINY_FLAGS, "--db", str(db_path)]
    )
    assert status == 2
    assert "cannot write the weights folder" in _one_line(capsys.readouterr().err)
    with Store(db_path) as store:
        assert store.runs() == []


def test_11_a_read_only_weights_folder_is_refused_before_training(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained"))
    with read_only_copy(tmp_path / "empty", tmp_path / "runs-weights"):
        status = main(["compare", "--methods", "sgd", "--seeds", "0", *TINY_FLAGS,
                       "--db", str(tmp_path / "runs.db")])  # fmt: skip
    assert status == 2
    assert "cannot write the weights folder" in _one_line(capsys.readouterr().err)


# --- 12: PID reuse ---------------------------------------------------------------------------

CONFIG = {"dataset": "mnist1d", "model": "mlp", "method": "sgd", "seed": 0, "label_noise": 0.0}


def _leave_running(db_path: Path, owner: str, heartbeat_age_s: float = 0.0) -> None:
    heartbeat = (datetime.now(timezone.utc) - timedelta(seconds=heartbeat_age_s)).isoformat(
        timespec="seconds"
    )
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "UPDATE runs SET owner = ?, heartbeat_at = ?, started_at = ?",
            (owner, heartbeat, heartbeat),
        )


def test_12_a_run_whose_pid_now_belongs_to_another_process_is_taken_over(db_path: Path) -> None:
    live = os.getppid()  # alive, and not the process that claimed the run
    start = store_module._process_start(live)
    assert start is not None
    with Store(db_path) as store:
        store.claim("abc", CONFIG, {}, 1)
    _leave_running(db_path, f"{socket.gethostname()}:{live}@{int(start) + 1}")
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1) is not None  # the PID was reused


def test_12_a_same_host_owner_that_is_alive_but_silent_too_long_is_taken_over(
    db_path: Path,
) -> None:
    live = os.getppid()
    owner = f"{socket.gethostname()}:{live}@{store_module._process_start(live)}"
    with Store(db_path) as store:
        store.claim("abc", CONFIG, {}, 1)
    _leave_running(db_path, owner, heartbeat_age_s=600)
    with Store(db_path) as store:
        assert store.claim("abc", CONFIG, {}, 1, stale_after_s=3600) is None  # alive, recent
        assert store.claim("abc", CONFIG, {}, 1, stale_after_s=60) is not None  # silent


def test_12_compare_never_exits_0_while_another_process_trains_part_of_the_grid(
    tiny: dict[str, Any], db_path: Path, capsys: Any
) -> None:
    config = make_run_config(method="sgd", seed=0, **tiny)
    with Store(db_path) as store:
        store.claim(config.config_hash, config.to_dict(), {}, 1)
    live = os.getppid()
    _leave_running(db_path, f"{socket.gethostname()}:{live}@{store_module._process_start(live)}")
    status = main(
        ["compare", "--methods", "sgd", "--seeds", "0", *TINY_FLAGS, "--db", str(db_path)]
    )
    assert status == 3
    assert "the grid is incomplete" in capsys.readouterr().err


# --- 13: sharpness of different settings is never pooled -------------------------------------


def test_13_measurements_with_different_settings_are_kept_apart_and_never_pooled(
    trained: tuple[Path, list], tmp_path: Path
) -> None:
    db_path = _copy(trained[0], tmp_path)
    configs = trained[1]
    defaults = SharpnessSettings(examples=64, **QUICK_SHARPNESS)
    other = SharpnessSettings(examples=32, rho=0.5, **QUICK_SHARPNESS)
    hashes = [config.config_hash for config in configs]
    measure_runs(db_path, defaults, runs=hashes[:2], progress=False)
    measure_runs(db_path, other, runs=hashes[2:], progress=False)
    measure_runs(db_path, other, runs=hashes[:1], progress=False)  # a second row, not a replacement
    with Store(db_path) as store:
        assert sorted(store.sharpness(asdict(defaults))) == sorted(hashes[:2])
        assert sorted(store.sharpness(asdict(other))) == sorted([hashes[0], *hashes[2:]])
        with pytest.raises(ValueError, match="2 different settings"):
            store.sharpness()
        [setting] = summarize(store)
    report = write_report(db_path, tmp_path / "out")
    markdown = report.markdown_path.read_text()
    assert markdown.count("### Sharpness beside test accuracy") == 2
    assert "measured with examples=32, rho=0.5" in markdown
    assert "measured with examples=64, rho=0.05" in markdown
    # Each section ranks only its own measurement's runs: 2 and 3, never the 5 rows pooled.
    assert "2 run(s) measured" in markdown and "3 run(s) measured" in markdown
    assert "5 run(s) measured" not in markdown
    assert all(not arm.sharpness for arm in setting.arms)  # the views carry them


# --- 14: one verdict for divergence ----------------------------------------------------------


def test_14_finite_weights_with_an_infinite_test_loss_are_diverged_everywhere(
    tiny: dict[str, Any], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runner.evaluate
    monkeypatch.setattr(
        runner, "evaluate", lambda model, x, y, *rest: (math.inf, real(model, x, y, *rest)[1])
    )
    config = make_run_config(method="sgd", seed=0, **{**tiny, "epochs": 3})
    run_grid([config], db_path, progress=False)
    monkeypatch.undo()
    with Store(db_path) as store:
        [run] = store.runs()
        assert all(
            torch.isfinite(t).all() for t in torch.load(db_path.parent / run.weights_path).values()
        )
        assert run.final["diverged_at_epoch"] == 1 and run.diverged  # the runner's verdict
        [setting] = summarize(store)
    assert setting.arms[0].diverged == {0: 1}  # the report's
    summary = measure_runs(
        db_path, SharpnessSettings(examples=32, **QUICK_SHARPNESS), progress=False
    )
    assert len(summary.diverged) == 1 and summary.measured == []  # and sharpness's


# --- 15: deleting runs -----------------------------------------------------------------------


def test_15_a_run_deleted_by_hand_leaves_no_orphans_that_break_the_next_compare(
    trained: tuple[Path, list], tmp_path: Path
) -> None:
    db_path = _copy(trained[0], tmp_path)
    with sqlite3.connect(db_path) as connection:  # foreign keys off, as in the sqlite3 shell
        last = connection.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        connection.execute("DELETE FROM runs WHERE id = ?", (last,))
        assert connection.execute(
            "SELECT COUNT(*) FROM epochs WHERE run_id = ?", (last,)
        ).fetchone()[0]
    summary = run_grid(trained[1], db_path, progress=False)
    assert (summary.finished, summary.failed) == (1, [])
    with Store(db_path) as store:
        assert all(len(store.epochs(run.id)) == 2 for run in store.runs())


def test_15_forget_deletes_a_run_its_rows_and_weights_and_forget_failed_every_failed_run(
    trained: tuple[Path, list], tmp_path: Path, capsys: Any
) -> None:
    db_path = _copy(trained[0], tmp_path)
    first, second, *_ = trained[1]
    measure_runs(db_path, SharpnessSettings(examples=32, **QUICK_SHARPNESS), progress=False)
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "UPDATE runs SET status = 'failed' WHERE config_hash = ?", (second.config_hash,)
        )
    assert main(["forget", first.config_hash[:6], "--db", str(db_path)]) == 0
    assert f"forgot {first.config_hash}" in capsys.readouterr().out
    assert main(["forget", "--failed", "--db", str(db_path)]) == 0
    with sqlite3.connect(db_path) as connection:
        hashes = {row[0] for row in connection.execute("SELECT config_hash FROM runs")}
        assert hashes == {config.config_hash for config in trained[1][2:]}
        ids = {row[0] for row in connection.execute("SELECT id FROM runs")}
        for table in ("epochs", "sharpness"):
            assert {row[0] for row in connection.execute(f"SELECT run_id FROM {table}")} == ids
    assert not (tmp_path / "runs-weights" / f"{first.config_hash}.pt").exists()
    assert not (tmp_path / "runs-weights" / f"{second.config_hash}.pt").exists()
    assert main(["forget", "ffffffff", "--db", str(db_path)]) == 2
    assert "matches no run" in _one_line(capsys.readouterr().err)


def test_15_a_version_2_database_is_migrated_with_its_sharpness_rows_kept(
    trained: tuple[Path, list], tmp_path: Path
) -> None:
    db_path = _copy(trained[0], tmp_path)
    settings = SharpnessSettings(examples=32, **QUICK_SHARPNESS)
    measure_runs(db_path, settings, progress=False)
    with sqlite3.connect(db_path) as connection:  # the version 2 layout: one row per run
        before = connection.execute("SELECT * FROM sharpness ORDER BY run_id").fetchall()
        connection.execute("ALTER TABLE sharpness RENAME TO new")
        connection.execute(
            "CREATE TABLE sharpness (run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE "
            "CASCADE, config_hash TEXT NOT NULL UNIQUE, examples INTEGER NOT NULL, data TEXT "
            "NOT NULL, settings TEXT NOT NULL, loss REAL, hessian_top_eigenvalue REAL, "
            "hessian_more_eigenvalues TEXT, hessian_trace REAL, hessian_trace_stderr REAL, "
            "worst_case_sharpness REAL, average_sharpness REAL, adaptive_worst_case_sharpness "
            "REAL, adaptive_average_sharpness REAL, landscape TEXT, measure_time_s REAL NOT "
            "NULL, environment TEXT, measured_at TEXT NOT NULL)"
        )
        connection.execute("INSERT INTO sharpness SELECT * FROM new")
        connection.execute("DROP TABLE new")
        connection.execute("ALTER TABLE runs DROP COLUMN data_fingerprint")
        connection.execute("PRAGMA user_version=2")
    with Store(db_path) as store:
        assert len(store.sharpness(asdict(settings))) == 4
        store.forget(trained[1][0].config_hash)  # cascades in the migrated table too
    with sqlite3.connect(db_path) as connection:
        assert (
            connection.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
        )
        after = connection.execute("SELECT * FROM sharpness ORDER BY run_id").fetchall()
    assert after == before[1:]


# --- 16: damage and odd inputs, one line each ------------------------------------------------


def test_16_a_garbage_or_truncated_weights_file_is_one_line(
    trained: tuple[Path, list], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_path = _copy(trained[0], tmp_path)
    first, second, *_ = trained[1]
    weights = tmp_path / "runs-weights"
    (weights / f"{first.config_hash}.pt").write_bytes(b"not a weights file at all")
    truncated = weights / f"{second.config_hash}.pt"
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(WeightsFileError, match="is damaged"):
        load_trained_model(db_path, first.config_hash)
    summary = measure_runs(
        db_path, SharpnessSettings(examples=32, **QUICK_SHARPNESS), progress=False
    )
    assert len(summary.failed) == 2 and len(summary.measured) == 2
    for failure in summary.failed:
        assert "\n" not in failure and "weights_only" not in failure and "is damaged" in failure
    assert all(record.exc_info is None for record in caplog.records)  # no traceback logged


def test_16_a_truncated_mnist1d_cache_is_one_line_and_nothing_is_recorded(
    tmp_path: Path, db_path: Path, capsys: Any
) -> None:
    cache = tmp_path / "data"
    cache.mkdir()
    data_module._load_mnist1d(cache)  # generated there
    npz = cache / "mnist1d.npz"
    npz.write_bytes(npz.read_bytes()[:5000])
    status = main(["compare", "--methods", "sgd", "--seeds", "0", *TINY_FLAGS,
                   "--data-dir", str(cache), "--db", str(db_path)])  # fmt: skip
    assert status == 2
    assert "is damaged" in _one_line(capsys.readouterr().err)
    with Store(db_path) as store:
        assert store.runs() == []


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "--seed", "9223372036854775808"], "seed must be between 0 and 2**63 - 1"),
        (["run", "--method", "tilted-sam", "--param", "num_samples=1e20"], "at most 2**63 - 1"),
        (["run", "--weight-decay", "inf"], "weight decay must be a finite number"),
        (["run", "--db", "/dev/null"], "is not a regular file"),
    ],
)
def test_16_odd_inputs_are_refused_in_one_line(
    arguments: list[str], expected: str, capsys: Any, db_path: Path
) -> None:
    journal_existed = Path("/dev/null-journal").exists()
    db = [] if "--db" in arguments else ["--db", str(db_path)]
    assert main([*arguments, *TINY_FLAGS, *db]) == 2
    assert expected in _one_line(capsys.readouterr().err)
    assert Path("/dev/null-journal").exists() == journal_existed


def test_16_a_data_dir_that_is_a_file_is_refused_and_no_run_is_recorded_failed(
    tmp_path: Path, db_path: Path, capsys: Any
) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    try:
        status = main(["run", *TINY_FLAGS, "--data-dir", str(not_a_folder), "--db", str(db_path)])
    except SystemExit as exit:  # refused by the option parser itself
        status = exit.code
    assert status == 2
    assert "is a file, not a directory" in _one_line(capsys.readouterr().err)
    with pytest.raises(data_module.DatasetUnavailableError):
        runner.execute_run(make_run_config(dataset="mnist1d", model="mlp", method="sgd"),
                           Store(db_path), not_a_folder)  # fmt: skip
    with Store(db_path) as store:
        assert store.runs() == []


def _corrupt(db_path: Path) -> None:
    with sqlite3.connect(db_path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
    assert pages >= 4
    with open(db_path, "r+b") as stream:
        stream.seek(2 * page_size)  # the third page: a table's b-tree, not the header
        stream.write(np.random.default_rng(0).bytes(page_size))


@pytest.mark.parametrize("command", ["compare", "sharpness", "report"])
def test_16_a_corrupted_database_page_is_noticed_by_every_command(
    trained: tuple[Path, list], tmp_path: Path, capsys: Any, command: str
) -> None:
    db_path = _copy(trained[0], tmp_path)
    _corrupt(db_path)
    arguments = {
        "compare": ["compare", "--methods", "sgd", "--seeds", "0", *TINY_FLAGS],
        "sharpness": ["sharpness", "--examples", "32", "--quiet"],
        "report": ["report", "--out", str(tmp_path / "out")],
    }[command]
    assert main([*arguments, "--db", str(db_path)]) == 2
    assert "is damaged" in _one_line(capsys.readouterr().err)


# --- 17: data provenance ---------------------------------------------------------------------


def test_17_runs_trained_on_different_data_are_never_mixed(
    tiny: dict[str, Any], tmp_path: Path, db_path: Path, capsys: Any
) -> None:
    first, other = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    other.mkdir()
    data_module._load_mnist1d(first)
    with np.load(first / "mnist1d.npz") as arrays:
        changed = {name: arrays[name] for name in arrays.files}
    changed["x_train"] = changed["x_train"] + np.float32(0.01)
    np.savez(other / "mnist1d.npz", **changed)

    config = make_run_config(method="sgd", seed=0, **tiny)
    run_grid([config], db_path, data_dir=first, progress=False)
    with Store(db_path) as store:
        [run] = store.runs()
    assert run.data_fingerprint == data_module.fingerprint("mnist1d", first)

    later = make_run_config(method="sam", seed=0, **tiny)
    with pytest.raises(DataMismatchError, match="trained on other data"):
        run_grid([later], db_path, data_dir=other, progress=False)
    status = main(["compare", "--methods", "sam", "--seeds", "0", *TINY_FLAGS,
                   "--data-dir", str(other), "--db", str(db_path)])  # fmt: skip
    assert status == 2
    assert "give --data-dir the data they trained on" in _one_line(capsys.readouterr().err)
    with Store(db_path) as store:
        assert len(store.runs()) == 1
    # Measuring on the other data is refused too, in one line.
    summary = measure_runs(db_path, SharpnessSettings(examples=32, **QUICK_SHARPNESS),
                           data_dir=other, progress=False)  # fmt: skip
    assert len(summary.failed) == 1 and "trained on other mnist1d data" in summary.failed[0]


# --- 18: atomic plots and reports ------------------------------------------------------------


def test_18_a_plot_interrupted_while_written_leaves_the_earlier_one_whole(
    trained: tuple[Path, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    report = write_report(trained[0], out)
    before = {path: path.read_bytes() for path in report.plots}
    markdown = report.markdown_path.read_bytes()

    def killed(self: Any, path: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"")  # what a SIGKILL mid-write leaves: an empty file
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(trained[0], out)
    monkeypatch.undo()
    for path, content in before.items():
        if path.exists():  # removed as an earlier plot, or kept whole: never truncated
            assert path.read_bytes() == content
    assert report.markdown_path.read_bytes() == markdown
    assert _partials(out) == []
    assert [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
    # What a SIGKILL (no `finally` runs) leaves, a hidden partial, goes with the next report.
    killed = report.plots[0].with_name(f".{report.plots[0].stem}.123.partial.png")
    killed.parent.mkdir(parents=True, exist_ok=True)
    killed.write_bytes(b"")
    write_report(trained[0], out)
    assert _partials(out) == []


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _stop_first(context: None, item: int, emit: Any) -> str:
    if item == 0:
        return "stop"  # as a run that met a full disk
    time.sleep(0.5)
    return "done"


@pytest.mark.parametrize("jobs", [1, 2])
def test_9_a_stop_on_one_worker_ends_the_grid_on_every_worker(jobs: int) -> None:
    ended: list[int] = []
    stopped: list[bool] = []

    def follow(event: Event) -> None:
        if event.kind == "end":
            ended.append(event.index)
            stopped.append(event.payload == "stop")

    run_tasks(
        _stop_first,
        list(range(8)),
        jobs=jobs,
        setup=_nothing,
        on_event=follow,
        should_stop=lambda: any(stopped),
    )
    assert ended[-1] == 0 and len(ended) <= jobs  # nothing started after the stop was seen


def test_9_an_sqlite_error_that_is_not_a_full_disk_fails_the_run_as_it_is(
    tiny: dict[str, Any], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "claim", locked)
    summary = run_grid(_grid(tiny, methods=("sgd",), seeds=(0,)), db_path, progress=False)
    assert summary.stopped is None
    assert len(summary.failed) == 1 and "OperationalError: database is locked" in summary.failed[0]
