"""The `flatminima` command: one-line errors before any write, and the happy paths."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatminima.cli import build_parser, interrupted_message, main
from flatminima.cli.commands import method_description
from flatminima.experiments import demo
from flatminima.experiments.config import make_run_config
from flatminima.experiments.demo import DEMO_ARMS, demo_configs
from flatminima.experiments.sharpness_runs import SharpnessSettings, measure_runs
from flatminima.experiments.store import Store
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
    # Arms labelled as the report labels them: SAM with its (default) radius.
    assert "  sam ρ=0.05 seed=0  " in output and "  base seed=0  " in output
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
    assert "\nsam ρ=0.05 " in output and "\nbase " in output


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


# --- issue 14: the command line as a researcher reads it --------------------------------------


def test_methods_prints_each_whole_summary_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    output = " ".join(capsys.readouterr().out.split())
    # Tilted SAM's summary runs over two docstring lines: the second is not cut off.
    assert "a tilted mean of s perturbed gradients." in output
    for name in method_names():
        assert " ".join(method_description(name).split()) in output
        assert method_description(name).endswith(".")


def test_a_missing_data_dir_is_an_error_and_is_never_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent" / "path"
    for command in (["run"], ["compare", "--methods", "sam"], ["sharpness"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--data-dir", str(missing), "--db", str(tmp_path / "runs.db")])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert f"argument --data-dir: {missing} does not exist" in error
        assert error.count("\n") == 1
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "runs.db").exists()


def test_report_on_an_empty_file_is_not_a_database_and_leaves_it_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert main(["report", "--db", str(empty), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "is not a flatminima database" in error and error.count("\n") == 1
    assert empty.stat().st_size == 0 and not (tmp_path / "out").exists()


def _dead_pid() -> int:
    """The id of a process that has exited (and, for the moment, of no other)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_interrupted_and_running_runs_read_the_same_in_the_terminal_and_report_md(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "runs.db"
    assert main(["run", "--method", "base", *TINY_FLAGS, "--db", str(db_path)]) == 0
    configs = [
        make_run_config(
            method="sam", seed=seed, dataset="mnist1d", model="cnn1d", epochs=2, batch_size=64,
            train_size=256, label_noise=0.4,
        )
        for seed in (1, 2)
    ]  # fmt: skip
    with Store(db_path) as store:
        for config in configs:  # claimed by this (live) process
            assert store.claim(config.config_hash, config.to_dict(), {}, 2) is not None
    # The second one's process is gone: interrupted, not running.
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "UPDATE runs SET owner = ? WHERE config_hash = ?",
            (f"{socket.gethostname()}:{_dead_pid()}", configs[1].config_hash),
        )
    capsys.readouterr()
    assert main(["report", "--db", str(db_path), "--out", str(tmp_path / "out")]) == 0
    terminal = capsys.readouterr().out
    markdown = (tmp_path / "out" / "report.md").read_text()
    line = (
        "Not in the statistics: 1 interrupted (left running by a process that is gone: the same "
        "command redoes them), 1 running."
    )
    assert line in terminal and line in markdown


def test_sigterm_stops_a_grid_as_ctrl_c_does(db_path: Path) -> None:
    command = [
        sys.executable, "-m", "flatminima", "compare", "--methods", "base,sam", "--seeds", "0-1",
        "--epochs", "40", "--train-size", "256", "--batch-size", "128", "--label-noise", "0.4",
        "--db", str(db_path), "--jobs", "2", "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    deadline = time.monotonic() + 180
    try:
        while True:  # until a run has finished and others are under way
            assert process.poll() is None, "the grid ended before it could be stopped"
            assert time.monotonic() < deadline, "the grid made no progress"
            try:
                with sqlite3.connect(db_path) as connection:
                    statuses = [row[0] for row in connection.execute("SELECT status FROM runs")]
            except sqlite3.OperationalError:
                statuses = []
            if "finished" in statuses and "running" in statuses:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted; finished runs are kept, run the same command again to resume" in stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    with Store(db_path) as store:
        assert store.runs("finished")
        assert store.live_runs() == set()  # the workers were stopped with the grid


def test_sharpness_force_interrupted_says_what_is_left(trained_db: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "runs.db"
    with sqlite3.connect(trained_db) as source, sqlite3.connect(db_path) as copy:
        source.backup(copy)
    shutil.copytree(trained_db.parent / "runs-weights", tmp_path / "runs-weights")
    measure_runs(db_path, SharpnessSettings(examples=128, num_probes=2), progress=False)
    with Store(db_path) as store:
        hashes = [run.config_hash for run in store.runs()]
    # The same settings as the rows (rows of other settings are another measurement).
    args = build_parser().parse_args(
        ["sharpness", "--db", str(db_path), "--force", "--examples", "128", "--num-probes", "2"]
    )
    # Started after every row was written: every run is left, and the command names them.
    left = interrupted_message(args, started_at="9999-01-01T00:00:00+00:00")
    assert "would measure every selected run again" in left
    assert left.endswith("--runs " + " ".join(hashes)) and "run the same command" not in left
    # Started before: nothing is left to name.
    done = interrupted_message(args, started_at="2000-01-01T00:00:00+00:00")
    assert "--runs" not in done
    plain = build_parser().parse_args(["sharpness", "--db", str(db_path)])
    assert "run the same command again to measure the rest" in interrupted_message(plain, "")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(db_path: Path) -> None:
    command = [
        sys.executable, "-m", "flatminima", "compare", "--methods", "base,sam", "--seeds", "0",
        *[flag for flag in TINY_FLAGS if flag != "--quiet"], "--db", str(db_path),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "\x1b[" not in finished.stderr and "\r" not in finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/2", "[2/2"]
    assert lines[1].startswith("[2/2] sam ρ=0.05 seed=0: finished after 2 epoch(s), test accuracy")


def test_demo_quick_is_the_base_optimizer_against_sam_and_a_subset_of_the_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = demo_configs(demo.QUICK_SEEDS, quick=True)
    assert {config.method for config in quick} == {"base", "sam"}
    assert {config.seed for config in quick} == {0, 1, 2}
    # The same runs as the full demo's: a later `flatminima demo` resumes from them.
    full = {config.config_hash for config in demo_configs()}
    assert {config.config_hash for config in quick} <= full
    arguments = ["demo", "--quick", "--epochs", "1", "--jobs", "1", "--quiet", "--no-sharpness"]
    assert main([*arguments, "--db", str(tmp_path / "d.db"), "--out", str(tmp_path / "o")]) == 0
    assert "6 run(s): 6 trained" in capsys.readouterr().out
