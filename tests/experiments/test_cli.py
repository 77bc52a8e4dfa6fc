"""The `flatminima` command: one-line errors before any write, and the happy paths."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.experiments import demo
from flatminima.experiments.demo import DEMO_ARMS, demo_configs
from flatminima.registry import method_names

TINY_FLAGS = [
    "--epochs", "2", "--train-size", "256", "--batch-size", "64", "--label-noise", "0.4",
    "--quiet",
]  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "--method", "adamsam"], "accepted: " + ", ".join(method_names())),
        (["run", "--dataset", "cifar10"], "accepted: mnist1d, fashion-mnist, digits"),
        (["run", "--label-noise", "1.0"], "label noise must be a fraction in [0, 1)"),
        (["run", "--label-noise", "-0.1"], "label noise must be a fraction in [0, 1)"),
        (["run", "--method", "sam", "--param", "radius=1"], "accepted: rho"),
        (["run", "--method", "sam", "--param", "rho"], "NAME=VALUE"),
        (["run", "--model", "resnet20"], "accepted for this dataset: mlp, cnn1d"),
        (["run", "--epochs", "two"], "invalid int value: 'two'"),
        (["run", "--dataset", "fashion-mnist", "--model", "cnn", "--data-dir", "{empty}"],
         "install the Debian package dataset-fashion-mnist"),
        (["compare", "--methods", "base,sam", "--sweep", "eta=0.1,1"],
         "no method in the grid takes hyperparameter 'eta'"),
        (["compare", "--methods", "sam", "--param", "asam:eta=0.1"], "not in the grid"),
        (["compare", "--methods", "sam", "--seeds", "a"], "--seeds takes"),
        (["compare", "--methods", "sam", "--jobs", "0"], "argument --jobs: must be >= 1"),
        (["demo", "--seeds", "0"], "argument --seeds: must be >= 1"),
        (["demo", "--epochs", "0"], "argument --epochs: must be >= 1"),
        (["demo", "--seeds", "0-1"], "demo takes a number of seeds"),
        (["demo", "--out", "{file}"], "--out must be a directory"),
        (["compare", "--methods", "sam", "--seeds", "3-1"], "range '3-1' is empty"),
        (["compare", "--methods", "sam", "--param", "rho=0.1", "--sweep", "rho=0.05,0.2"],
         "rho is set more than once as NAME"),
        (["compare", "--methods", "sam", "--report", "{file}"], "--report must be a directory"),
        (["run", "--optimizer", "adamw", "--momentum", "0.5"], "adamw takes none"),
        (["run", "--stale-after", "0"], "--stale-after must be a positive number of hours"),
        (["report"], "no database at"),
        (["sharpness"], "no database at"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_what_is_accepted_and_writes_nothing(
    arguments: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    placeholders = {"{empty}": str(tmp_path / "empty"), "{file}": str(tmp_path / "a-file")}
    arguments = [placeholders.get(a, a) for a in arguments]
    db_path = tmp_path / "runs.db"
    try:
        quiet = [] if arguments[0] == "report" else ["--quiet"]  # report draws no bars
        status = main([*arguments, "--db", str(db_path), *quiet])
    except SystemExit as exit_:  # argparse's own type errors exit from inside main
        status = exit_.code
    assert status == 2
    error = capsys.readouterr().err
    assert expected in error
    assert error.count("\n") == 1, error
    assert not db_path.exists()


@pytest.mark.parametrize("command", ["report", "sharpness", "run"])
def test_a_database_argument_that_is_not_a_database_is_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_database = tmp_path / "notes.db"
    text = "these are my notes, not a database\n" * 100
    not_a_database.write_text(text)
    assert (
        main([command, "--db", str(not_a_database), *(TINY_FLAGS if command == "run" else [])]) == 2
    )
    error = capsys.readouterr().err
    assert "is not a flatminima database" in error and error.count("\n") == 1, error
    assert not_a_database.read_text() == text


def test_report_reads_while_a_writer_holds_the_database(
    trained_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A grid's worker in the middle of a write: the report neither waits nor fails.
    writer = sqlite3.connect(trained_db, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runs SET error = NULL")
    try:
        assert main(["report", "--db", str(trained_db), "--out", str(tmp_path / "out")]) == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "test acc." in capsys.readouterr().out


def test_a_closed_output_pipe_ends_quietly(tmp_path: Path) -> None:
    # `flatminima methods | head -1`: the reader is gone before we write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    finished = subprocess.run(
        [sys.executable, "-m", "flatminima", "methods"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert "Traceback" not in finished.stderr and "Exception" not in finished.stderr
    assert finished.returncode == 1


def test_run_trains_once_and_reports_the_stored_result_when_asked_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    arguments = ["run", "--method", "sam", "--param", "rho=0.1", "--seed", "3", *TINY_FLAGS]
    assert main([*arguments, "--db", str(db_path)]) == 0
    first = capsys.readouterr().out
    assert "1 trained" in first and "sam ρ=0.1 seed=3: test accuracy" in first
    assert main([*arguments, "--db", str(db_path)]) == 0
    second = capsys.readouterr().out
    assert "0 trained, 1 already in" in second
    assert first.splitlines()[-1] == second.splitlines()[-1]
    rows = sqlite3.connect(db_path).execute("SELECT method, seed, status FROM runs").fetchall()
    assert rows == [("sam", 3, "finished")]


def test_compare_runs_a_sweep_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, out = tmp_path / "runs.db", tmp_path / "report"
    status = main(
        [
            "compare", "--methods", "base,sam", "--sweep", "rho=0.05,0.2", "--seeds", "0-1",
            *TINY_FLAGS, "--db", str(db_path), "--report", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    output = capsys.readouterr().out
    # base takes no rho: it runs once per seed, not once per swept value.
    assert "6 run(s): 6 trained" in output
    assert (out / "report.md").exists()
    assert "accuracy_vs_rho.png" in output
    # Two SAM arms: the terminal says which one each Δ vs sam is against.
    assert "Δ vs sam: against the sam arm with the same values" in output
    counts = sqlite3.connect(db_path).execute(
        "SELECT method, COUNT(*) FROM runs GROUP BY method ORDER BY method"
    )
    assert counts.fetchall() == [("base", 2), ("sam", 4)]


def test_report_command_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    main(["run", "--method", "base", *TINY_FLAGS, "--db", str(db_path)])
    capsys.readouterr()
    assert main(["report", "--db", str(db_path), "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr().out
    assert "mnist1d · cnn1d · 40% label noise · 256 training examples · 2 epochs" in output
    assert "test acc. %" in output and "plot:" in output


def test_methods_command_lists_every_registered_method(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["methods"]) == 0
    output = capsys.readouterr().out
    for name in method_names():
        assert f"\n{name} " in f"\n{output}"


def test_demo_grid_is_valid_and_covers_the_base_optimizer_sam_and_the_four_variants() -> None:
    configs = demo_configs()
    methods = {config.method for config in configs}
    expected = {"base", "sam", "fisher-sam", "monge-sam", "tilted-sam", "friendly-sam"}
    assert methods == expected
    assert len({config.config_hash for config in configs}) == len(DEMO_ARMS) * 3
    assert {config.epochs for config in configs} == {100}
    assert {config.label_noise for config in configs} == {0.4}


def test_demo_runs_end_to_end_on_a_shortened_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A smaller measurement than the demo's own (which takes ~2 s a run on one thread).
    monkeypatch.setattr(demo, "DEMO_SHARPNESS", {"examples": 128, "num_probes": 2})
    db_path = tmp_path / "demo.db"
    arguments = ["demo", "--epochs", "1", "--seeds", "1", "--jobs", "1", "--quiet"]
    arguments += ["--db", str(db_path), "--out", str(tmp_path / "out")]
    assert main([*arguments, "--no-sharpness"]) == 0
    output = capsys.readouterr().out
    assert f"{len(DEMO_ARMS)} run(s): {len(DEMO_ARMS)} trained" in output
    for method, _ in DEMO_ARMS:
        assert f"\n{method}" in output
    assert "final_accuracy.png" in output
    assert "λ_max" not in output and "landscape_1d.png" not in output
    assert sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM sharpness").fetchone() == (0,)

    # Again with the default: nothing to train, every demo run measured, shown in the report.
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert f"{len(DEMO_ARMS)} run(s): 0 trained" in output
    assert f"{len(DEMO_ARMS)} run(s): {len(DEMO_ARMS)} measured" in output
    assert "λ_max (mean ± std)" in output and "Spearman" in output
    assert "landscape_1d.png" in output and "accuracy_vs_sharpness.png" in output
    rows = sqlite3.connect(db_path).execute("SELECT examples, landscape FROM sharpness")
    assert [(examples, landscape is not None) for examples, landscape in rows] == [
        (128, True)
    ] * len(DEMO_ARMS)


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base optimizer and SAM, seeds 0 and 1, trained by the command line, tiny setting."""
    db_path = tmp_path_factory.mktemp("cli-sharpness") / "runs.db"
    arguments = ["compare", "--methods", "base,sam", "--seeds", "0-1", *TINY_FLAGS]
    assert main([*arguments, "--db", str(db_path)]) == 0
    return db_path


SMALL_FLAGS = ["--examples", "128", "--num-probes", "2", "--quiet"]


def test_sharpness_measures_once_force_replaces_and_the_report_shows_it(
    trained_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    with sqlite3.connect(trained_db) as source, sqlite3.connect(db_path) as copy:
        source.backup(copy)
    shutil.copytree(trained_db.parent / "runs-weights", tmp_path / "runs-weights")
    capsys.readouterr()
    out = tmp_path / "landscapes"
    arguments = ["sharpness", "--db", str(db_path), *SMALL_FLAGS]
    assert main([*arguments, "--landscape", "--out", str(out), "--jobs", "2"]) == 0
    output = capsys.readouterr().out
    assert "4 run(s): 4 measured, 0 already measured" in output
    hashes = [row[0] for row in sqlite3.connect(db_path).execute("SELECT config_hash FROM runs")]
    for config_hash in hashes:  # every run's line, found by its hash
        assert f"\n{config_hash}  " in output
    [png] = out.glob("*/landscape_1d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"landscape: {png}" in output

    assert main(arguments) == 0
    assert "4 run(s): 0 measured, 4 already measured" in capsys.readouterr().out
    assert main([*arguments, "--force", "--method", "sam", "--runs", *hashes]) == 0
    assert "2 run(s): 2 measured, 0 already measured" in capsys.readouterr().out
    counts = sqlite3.connect(db_path).execute("SELECT COUNT(*), COUNT(landscape) FROM sharpness")
    assert counts.fetchone() == (4, 4)  # --force without --landscape kept the landscapes
    statuses = sqlite3.connect(db_path).execute("SELECT DISTINCT status FROM runs").fetchall()
    assert statuses == [("finished",)]

    assert main(["report", "--db", str(db_path), "--out", str(tmp_path / "report")]) == 0
    output = capsys.readouterr().out
    assert "λ_max (mean ± std)" in output and "Spearman rank correlation" in output
    assert "accuracy_vs_sharpness.png" in output


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--runs", "0123456789abcdef"], "no run with configuration hash '0123456789abcdef'"),
        (["--method", "asam"], "no finished run of method 'asam'"),
        (["--examples", "0"], "examples (--examples) must be an integer >= 1"),
        (["--rho", "-0.1"], "rho (--rho) must be a number >= 0"),
        (["--top-k", "0"], "top_k (--top-k) must be an integer >= 1"),
        (["--num-probes", "0"], "num_probes (--num-probes) must be an integer >= 1"),
        (["--seed", "-1"], "seed (--seed) must be an integer >= 0"),
        (["--jobs", "0"], "argument --jobs: must be >= 1"),
        (["--examples", "many"], "invalid int value: 'many'"),
    ],
)  # fmt: skip
def test_sharpness_bad_input_is_one_line_and_measures_nothing(
    arguments: list[str],
    expected: str,
    trained_db: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    try:
        status = main(["sharpness", "--db", str(trained_db), "--quiet", *arguments])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1, error
    assert sqlite3.connect(trained_db).execute("SELECT COUNT(*) FROM sharpness").fetchone() == (0,)


def test_sharpness_of_a_missing_database_is_an_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sharpness", "--db", str(tmp_path / "absent.db")]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()
