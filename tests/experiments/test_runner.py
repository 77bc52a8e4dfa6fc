"""End-to-end training on tiny settings: what ran is in the database, grids resume."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flatminima.experiments import runner
from flatminima.experiments.config import make_run_config
from flatminima.experiments.data import load_dataset
from flatminima.experiments.runner import evaluate, load_trained_model, run_grid, train
from flatminima.experiments.store import Store
from flatminima.registry import get_method


def _grid(tiny: dict[str, Any], methods: tuple[str, ...] = ("sgd", "sam"), seeds=(0, 1)) -> list:
    return [
        make_run_config(method=method, seed=seed, **tiny) for seed in seeds for method in methods
    ]


def test_a_grid_records_every_run_its_epochs_costs_and_weights(
    tiny: dict[str, Any], db_path: Path
) -> None:
    configs = _grid(tiny)
    summary = run_grid(configs, db_path, progress=False)
    assert (summary.total, summary.finished, summary.failed) == (4, 4, [])

    steps = math.ceil(tiny["train_size"] / tiny["batch_size"]) * tiny["epochs"]
    with Store(db_path) as store:
        runs = {run.config_hash: run for run in store.runs()}
        assert set(runs) == {config.config_hash for config in configs}
        for config in configs:
            run = runs[config.config_hash]
            assert run.status == "finished" and run.attempts == 1
            assert run.config == config.to_dict()
            assert run.environment["torch"] == torch.__version__
            assert run.finished_at is not None and run.started_at <= run.finished_at
            epochs = store.epochs(run.id)
            assert [row["epoch"] for row in epochs] == list(range(1, tiny["epochs"] + 1))
            per_step = get_method(config.method).passes_per_step(config.hyperparameters)
            assert run.final["passes"] == epochs[-1]["passes"] == steps * per_step
            assert run.final["final_test_accuracy"] == epochs[-1]["test_accuracy"]
            assert 0 < epochs[0]["train_time_s"] <= epochs[-1]["train_time_s"]

            # The saved weights are the final model: they reproduce its test accuracy.
            model, stored_config = load_trained_model(db_path, config.config_hash)
            assert stored_config == config
            data = load_dataset(config.dataset, seed=config.seed, train_size=config.train_size)
            _, accuracy = evaluate(model, data.x_test, data.y_test)
            assert accuracy == run.final["final_test_accuracy"]


def test_the_same_configuration_and_seed_give_identical_numbers(tiny: dict[str, Any]) -> None:
    # Tilted SAM draws random starts: the seed must cover the method's randomness too.
    config = make_run_config(method="tilted-sam", hyperparameters={"radius": 0.1}, **tiny)
    data = load_dataset(
        config.dataset, seed=config.seed, train_size=config.train_size, label_noise=0.4
    )
    first, second = train(config, data), train(config, data)
    assert [m.train_loss for m in first.epochs] == [m.train_loss for m in second.epochs]
    assert [m.test_loss for m in first.epochs] == [m.test_loss for m in second.epochs]
    for name, tensor in first.state_dict.items():
        assert torch.equal(tensor, second.state_dict[name])
    other_seed = train(make_run_config(method="tilted-sam", seed=1, **tiny), data)
    assert other_seed.epochs[-1].test_loss != first.epochs[-1].test_loss


def test_a_finished_grid_is_skipped_and_a_duplicate_runs_once(
    tiny: dict[str, Any], db_path: Path
) -> None:
    configs = _grid(tiny, methods=("sgd",), seeds=(0,))
    run_grid(configs, db_path, progress=False)
    again = run_grid(configs + configs, db_path, progress=False)
    assert (again.total, again.already_finished, again.finished) == (1, 1, 0)
    with Store(db_path) as store:
        assert len(store.runs()) == 1


def test_a_failing_run_is_recorded_the_grid_goes_on_and_it_is_retried_later(
    tiny: dict[str, Any], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = _grid(tiny, methods=("sgd",), seeds=(0, 1))
    real_load = runner.load_dataset

    def broken_for_seed_one(*args: Any, seed: int, **kwargs: Any) -> Any:
        if seed == 1:
            raise RuntimeError("disk on fire")
        return real_load(*args, seed=seed, **kwargs)

    monkeypatch.setattr(runner, "load_dataset", broken_for_seed_one)
    summary = run_grid(configs, db_path, progress=False)
    assert summary.finished == 1 and len(summary.failed) == 1
    assert "disk on fire" in summary.failed[0]
    with Store(db_path) as store:
        statuses = {run.config["seed"]: (run.status, run.error) for run in store.runs()}
    assert statuses[0] == ("finished", None)
    assert statuses[1] == ("failed", "RuntimeError: disk on fire")

    monkeypatch.setattr(runner, "load_dataset", real_load)
    retry = run_grid(configs, db_path, progress=False)
    assert (retry.already_finished, retry.finished, retry.failed) == (1, 1, [])
    with Store(db_path) as store:
        retried = next(run for run in store.runs() if run.config["seed"] == 1)
    assert retried.status == "finished" and retried.attempts == 2


def _final_numbers(db_path: Path) -> dict[str, tuple]:
    with Store(db_path) as store:
        return {
            run.config_hash: (
                run.final["final_test_accuracy"],
                run.final["final_test_loss"],
                tuple(row["train_loss"] for row in store.epochs(run.id)),
            )
            for run in store.runs()
        }


def test_worker_processes_give_the_same_numbers_as_one_process(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    configs = _grid(tiny, methods=("sgd", "sam"), seeds=(0, 1))
    serial = run_grid(configs, tmp_path / "serial.db", progress=False)
    parallel = run_grid(configs, tmp_path / "parallel.db", jobs=2, progress=False)
    assert serial.finished == parallel.finished == 4 and parallel.failed == []
    assert _final_numbers(tmp_path / "serial.db") == _final_numbers(tmp_path / "parallel.db")
    with Store(tmp_path / "parallel.db") as store:
        threads = {run.environment["torch_threads"] for run in store.runs()}
    assert threads == {1}


def _snapshot(db_path: Path) -> tuple[list[tuple], list[tuple]]:
    # Read-only: a reader must never create the file or change it.
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        runs = connection.execute(
            "SELECT id, config_hash, status, attempts, finished_at, final_test_accuracy "
            "FROM runs ORDER BY id"
        ).fetchall()
        epochs = connection.execute(
            "SELECT run_id, COUNT(*) FROM epochs GROUP BY run_id ORDER BY run_id"
        ).fetchall()
    finally:
        connection.close()
    return runs, epochs


def test_a_killed_grid_resumes_and_finishes_without_duplicates(
    tiny: dict[str, Any], db_path: Path
) -> None:
    settings = {**tiny, "epochs": 80, "batch_size": 128}
    command = [
        sys.executable, "-m", "flatminima.cli", "compare", "--methods", "sgd,sam",
        "--seeds", "0,1", "--epochs", str(settings["epochs"]),
        "--train-size", str(settings["train_size"]), "--batch-size", "128",
        "--label-noise", str(settings["label_noise"]), "--db", str(db_path), "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        # Read the database while the grid writes it, and kill the grid once a run has
        # finished and the next one is part-way through.
        while True:
            assert process.poll() is None, "the grid ended before it could be interrupted"
            assert time.monotonic() < deadline, "the grid made no progress"
            try:
                runs, epochs = _snapshot(db_path)
            except sqlite3.OperationalError:  # the grid has not created the database yet
                runs, epochs = [], []
            if runs:
                finished = [run for run in runs if run[2] == "finished"]
                running = [run for run in runs if run[2] == "running"]
                partial = dict(epochs).get(running[0][0], 0) if running else 0
                if finished and partial >= 1:
                    break
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()

    before_runs, _ = _snapshot(db_path)
    finished_before = [run for run in before_runs if run[2] == "finished"]
    interrupted = [run for run in before_runs if run[2] == "running"]
    assert finished_before and len(interrupted) == 1

    configs = _grid(settings, methods=("sgd", "sam"), seeds=(0, 1))
    summary = run_grid(configs, db_path, progress=False)
    assert summary.already_finished == len(finished_before)
    assert summary.finished == 4 - len(finished_before) and summary.failed == []

    after_runs, after_epochs = _snapshot(db_path)
    assert len(after_runs) == 4 and {run[1] for run in after_runs} == {
        config.config_hash for config in configs
    }
    assert all(run[2] == "finished" for run in after_runs)
    assert all(count == settings["epochs"] for _, count in after_epochs)
    # Nothing recorded is lost: runs finished before the kill are untouched.
    for run in finished_before:
        assert run in after_runs
    redone = next(run for run in after_runs if run[0] == interrupted[0][0])
    assert redone[3] == 2


def test_a_diverged_run_stops_at_once_and_is_kept_as_diverged(
    tiny: dict[str, Any], db_path: Path
) -> None:
    # A learning rate no model survives: the loss is not finite after the first epoch.
    config = make_run_config(method="sam", seed=0, **{**tiny, "epochs": 4}, lr=1e6)
    summary = run_grid([config], db_path, progress=False)
    assert (summary.finished, summary.failed) == (1, [])
    with Store(db_path) as store:
        [run] = store.runs()
        epochs = store.epochs(run.id)
    # A real outcome of its configuration, not a failure to retry: finished, marked, short.
    assert run.status == "finished" and run.final["diverged_at_epoch"] == 1
    assert [row["epoch"] for row in epochs] == [1]
    assert run.final["final_test_loss"] is None  # NaN, stored as NULL
    steps = math.ceil(tiny["train_size"] / tiny["batch_size"])
    assert run.final["passes"] == 2 * steps
    assert run_grid([config], db_path, progress=False).already_finished == 1


def test_a_healthy_run_is_not_marked_diverged(tiny: dict[str, Any], db_path: Path) -> None:
    config = make_run_config(method="sgd", seed=0, **tiny)
    run_grid([config], db_path, progress=False)
    with Store(db_path) as store:
        [run] = store.runs()
    assert run.final["diverged_at_epoch"] is None
    assert run.environment["flatminima_commit"] != ""
    assert "scikit-learn" in run.environment


def test_the_runner_calls_the_generic_per_epoch_hook(
    tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sparse SAM learns its mask before epochs 0, k, 2k, ... (counted from 0) from the
    epoch's training batches, through registry.start_epoch: no per-method code in the runner."""
    from flatminima.methods.sparse_sam import SparseSAM

    calls: list[tuple[int | None, int]] = []
    real = SparseSAM.refresh_mask

    def counting(self, model, loss_fn, batches, *, epoch=None):  # type: ignore[no-untyped-def]
        batches = list(batches)
        calls.append((epoch, sum(len(y) for _, y in batches)))
        return real(self, model, loss_fn, batches, epoch=epoch)

    monkeypatch.setattr(SparseSAM, "refresh_mask", counting)
    tiny["epochs"] = 3
    config = make_run_config(
        method="sparse-sam", hyperparameters={"update_every": 2, "num_samples": 8}, **tiny
    )
    data = load_dataset(config.dataset, seed=config.seed, train_size=config.train_size)
    train(config, data)
    assert [epoch for epoch, _ in calls] == [0, 2]
    assert all(examples == len(data.y_train) for _, examples in calls)
