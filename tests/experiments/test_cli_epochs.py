"""The training options of the per-epoch measurements: --validation-size and
--track-sharpness on `run` and `compare`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from flatminima.cli import main

TINY_FLAGS = [
    "--epochs", "2", "--train-size", "256", "--batch-size", "64", "--label-noise", "0.4",
    "--quiet",
]  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "--validation-size", "-1"], "argument --validation-size: must be >= 0"),
        (["compare", "--methods", "sam", "--validation-size", "x"], "invalid int value: 'x'"),
        (["run", "--validation-size", "4000"],
         "validation size must be between 0 and 3999 for mnist1d, got 4000"),
        (["run", "--validation-size", "200", "--train-size", "3900"],
         "train size must be between 1 and 3800 for mnist1d with 200 validation examples"),
        (["run", "--track-sharpness", "-2"], "argument --track-sharpness: must be >= 0"),
        (["compare", "--methods", "sam", "--track-sharpness", "5", "--epochs", "2"],
         "track sharpness takes a number of epochs between 0 (never) and 2, got 5"),
    ],
)  # fmt: skip
def test_bad_measurement_options_are_one_line_and_write_nothing(
    arguments: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    try:
        status = main([*arguments, "--db", str(db_path), "--quiet"])
    except SystemExit as exit_:  # argparse's own type errors exit from inside main
        status = exit_.code
    assert status == 2
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1, error
    assert not db_path.exists()


def test_run_with_a_validation_split_and_tracked_sharpness_stores_both_and_prints_the_overhead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    arguments = ["run", "--method", "sam", "--validation-size", "100", "--track-sharpness", "1"]
    assert main([*arguments, *TINY_FLAGS, "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    assert "λ_max tracked during training: 2 measurement(s)" in out and " s each" in out
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        "SELECT validation_accuracy, top_eigenvalue, sharpness_time_s, train_accuracy_noisy "
        "FROM epochs ORDER BY epoch"
    ).fetchall()
    config, final = connection.execute(
        "SELECT config, final_validation_accuracy FROM runs"
    ).fetchone()
    connection.close()
    assert len(rows) == 2 and all(value is not None for row in rows for value in row)
    assert final == rows[-1][0]
    assert (
        json.loads(config)["validation_size"] == 100 and json.loads(config)["track_sharpness"] == 1
    )


def test_compare_without_the_options_stores_no_validation_and_no_sharpness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    assert (
        main(["compare", "--methods", "base", "--seeds", "0", *TINY_FLAGS, "--db", str(db_path)])
        == 0
    )
    assert "λ_max" not in capsys.readouterr().out
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        "SELECT validation_accuracy, top_eigenvalue, train_accuracy_noisy FROM epochs"
    ).fetchall()
    config = connection.execute("SELECT config FROM runs").fetchone()[0]
    connection.close()
    assert [row[:2] for row in rows] == [(None, None)] * 2 and all(
        row[2] is not None for row in rows
    )
    assert "validation_size" not in config and "track_sharpness" not in config
