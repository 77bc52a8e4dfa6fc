"""Sharpness of stored runs: the rows are measure_sharpness's numbers on the run's own training
examples, measuring is read-only and idempotent, and bad selections fail before any work."""

from __future__ import annotations

import doctest
import math
import shutil
import sqlite3
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.experiments import sharpness_runs
from flatminima.experiments.config import ConfigError, make_run_config
from flatminima.experiments.data import load_dataset
from flatminima.experiments.runner import load_trained_model, run_grid
from flatminima.experiments.sharpness_runs import (
    LANDSCAPE_ALPHAS,
    SharpnessSettings,
    measure_runs,
)
from flatminima.experiments.store import SHARPNESS_COLUMNS, Store
from flatminima.sharpness import landscape_1d, measure_sharpness

# Half of the tiny runs' 256 training examples, so the seeded subset is really a subset; three
# probes so that the trace's standard error is a number.
SMALL = SharpnessSettings(examples=128, batch_size=64, num_probes=3, max_iter=20)
TINY: dict[str, Any] = {
    "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
    "train_size": 256, "label_noise": 0.4,
}  # fmt: skip


def _tiny_grid(methods=("sgd", "sam"), seeds=(0, 1)) -> list:
    return [
        make_run_config(method=method, seed=seed, **TINY) for seed in seeds for method in methods
    ]


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sgd and SAM, seeds 0 and 1, on the tiny setting; not measured (copy it to measure)."""
    db_path = tmp_path_factory.mktemp("trained") / "runs.db"
    run_grid(_tiny_grid(), db_path, progress=False)
    return db_path


def copy_db(source: Path, target_dir: Path) -> Path:
    """The database and its weights in ``target_dir`` (tests must not share what they write)."""
    target = target_dir / source.name
    with sqlite3.connect(source) as original, sqlite3.connect(target) as copy:
        original.backup(copy)
    weights = source.parent / f"{source.stem}-weights"
    shutil.copytree(weights, target_dir / weights.name)
    return target


@pytest.fixture(scope="module")
def measured_db(trained_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db_path = copy_db(trained_db, tmp_path_factory.mktemp("measured"))
    summary = measure_runs(db_path, SMALL, landscape=True, progress=False)
    assert len(summary.measured) == summary.selected == 4 and summary.failed == []
    return db_path


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_rows_equal_measure_sharpness_of_the_loaded_model_on_the_same_training_examples(
    measured_db: Path,
) -> None:
    with Store(measured_db) as store:
        rows = store.sharpness()
        runs = store.runs()
    assert len(rows) == len(runs) == 4
    for run in runs:
        row = rows[run.config_hash]
        model, config = load_trained_model(measured_db, run.config_hash)
        # The documented rule: the run's own training set (noisy labels), a seeded subset.
        data = load_dataset(
            config.dataset,
            seed=config.seed,
            train_size=config.train_size,
            label_noise=config.label_noise,
        )
        chosen = np.sort(
            np.random.default_rng(SMALL.seed).choice(config.train_size, SMALL.examples, False)
        )
        x, y = data.x_train[chosen], data.y_train[chosen]
        batches = list(zip(x.split(SMALL.batch_size), y.split(SMALL.batch_size), strict=True))
        expected = measure_sharpness(
            model,
            _loss,
            batches,
            rho=SMALL.rho,
            adaptive_rho=SMALL.adaptive_rho,
            average_rho=SMALL.average_rho,
            adaptive_average_rho=SMALL.adaptive_average_rho,
            top_k=SMALL.top_k,
            num_probes=SMALL.num_probes,
            steps=SMALL.steps,
            num_samples=SMALL.num_samples,
            max_iter=SMALL.max_iter,
            tol=SMALL.tol,
            seed=SMALL.seed,
        )
        assert row.metrics == expected
        line = landscape_1d(model, _loss, batches, alphas=LANDSCAPE_ALPHAS, seed=SMALL.seed)
        assert row.landscape is not None
        assert row.landscape["alphas"] == line.alphas.tolist()
        assert row.landscape["losses"] == line.losses.tolist()
        assert row.examples == SMALL.examples and row.settings == asdict(SMALL)
        assert "128 of the 256" in row.data and "40% noisy" in row.data
        assert row.environment["torch_threads"] == 1 and row.measure_time_s > 0
        # The labels measured on are the noisy ones the run trained on, not the clean ones.
        assert bool((y != data.y_train_clean[chosen]).any())
        clean = [
            (xb, yb)
            for xb, yb in zip(x.split(64), data.y_train_clean[chosen].split(64), strict=True)
        ]
        with torch.no_grad():
            clean_loss = float(np.mean([float(_loss(model, batch)) for batch in clean]))
        assert not math.isclose(row.metrics["loss"], clean_loss, rel_tol=1e-3)


def _runs_and_epochs(db_path: Path) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        runs = connection.execute("SELECT * FROM runs ORDER BY id").fetchall()
        epochs = connection.execute("SELECT * FROM epochs ORDER BY run_id, epoch").fetchall()
    return runs, epochs


def test_measuring_is_read_only_on_the_runs_and_force_replaces_rows_without_duplicates(
    trained_db: Path, tmp_path: Path
) -> None:
    db_path = copy_db(trained_db, tmp_path)
    runs_before = _runs_and_epochs(db_path)
    weights = sorted((tmp_path / "runs-weights").iterdir())
    weight_bytes = [path.read_bytes() for path in weights]
    settings = replace(SMALL, num_probes=2, max_iter=10)

    first = measure_runs(db_path, settings, methods=["sgd"], progress=False)
    assert (first.selected, len(first.measured), first.already_measured) == (2, 2, 0)
    with Store(db_path) as store:
        before = store.sharpness()
    again = measure_runs(db_path, settings, methods=["sgd"], progress=False)
    assert (len(again.measured), again.already_measured) == (0, 2)

    forced = measure_runs(db_path, settings, methods=["sgd"], force=True, progress=False)
    assert len(forced.measured) == 2
    with Store(db_path) as store:
        after = store.sharpness()
    count = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM sharpness").fetchone()[0]
    assert count == 2 and set(after) == set(before)
    for config_hash, row in after.items():  # the same seed gives the same numbers
        assert row.metrics == before[config_hash].metrics
        assert row.measured_at >= before[config_hash].measured_at

    # A landscape asked for later is added to the measured rows; their scalars stay.
    landscapes = measure_runs(db_path, settings, methods=["sgd"], landscape=True, progress=False)
    assert (landscapes.landscapes_added, len(landscapes.measured)) == (2, 0)
    with Store(db_path) as store:
        with_landscape = store.sharpness()
    for config_hash, row in with_landscape.items():
        assert row.landscape is not None and row.metrics == after[config_hash].metrics
    # Forced again without --landscape: the scalars are replaced, the landscapes kept.
    measure_runs(db_path, settings, methods=["sgd"], force=True, progress=False)
    with Store(db_path) as store:
        kept = store.sharpness()
    assert {h: row.landscape for h, row in kept.items()} == {
        h: row.landscape for h, row in with_landscape.items()
    }

    assert _runs_and_epochs(db_path) == runs_before
    assert [path.read_bytes() for path in weights] == weight_bytes


def test_worker_processes_give_the_same_numbers_as_one_process(
    trained_db: Path, measured_db: Path, tmp_path: Path
) -> None:
    db_path = copy_db(trained_db, tmp_path)
    summary = measure_runs(db_path, SMALL, landscape=True, jobs=2, progress=False)
    assert len(summary.measured) == 4 and summary.failed == []
    with Store(db_path) as parallel, Store(measured_db) as serial:
        in_workers, in_process = parallel.sharpness(), serial.sharpness()
    assert set(in_workers) == set(in_process)
    for config_hash, row in in_workers.items():
        assert row.metrics == in_process[config_hash].metrics
        assert row.landscape == in_process[config_hash].landscape


def test_a_run_without_its_weights_file_is_reported_and_a_failure_does_not_stop_the_others(
    trained_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_path = copy_db(trained_db, tmp_path)
    with Store(db_path) as store:
        first, second, *_ = store.runs()
    (tmp_path / first.weights_path).unlink()
    real_load = sharpness_runs.model_from_weights

    def broken_for_the_second(config: Any, weights_path: Path) -> nn.Module:
        if config.config_hash == second.config_hash:
            raise RuntimeError("unreadable weights")
        return real_load(config, weights_path)

    monkeypatch.setattr(sharpness_runs, "model_from_weights", broken_for_the_second)
    summary = measure_runs(db_path, replace(SMALL, num_probes=2), progress=False)
    assert len(summary.without_weights) == 1 and first.config_hash[:8] in summary.without_weights[0]
    assert len(summary.failed) == 1 and "RuntimeError: unreadable weights" in summary.failed[0]
    assert len(summary.measured) == 2
    with Store(db_path) as store:
        assert set(store.sharpness()) == set(summary.measured)


def test_bad_selections_and_settings_raise_before_anything_is_measured(
    trained_db: Path, tmp_path: Path
) -> None:
    db_path = copy_db(trained_db, tmp_path)
    with Store(db_path) as store:
        failed_id = store.claim("feedface", _tiny_grid()[0].to_dict(), {}, 1)
        store.fail(failed_id, "RuntimeError: boom")
    cases = [
        ({"runs": ["0123456789abcdef"]}, "no run with configuration hash"),
        ({"runs": ["feed"]}, "is failed, not finished"),
        ({"runs": [""]}, "no run with configuration hash"),
        ({"methods": ["tilted-sam"]}, "methods with finished runs: base, sam"),
        ({"settings": replace(SMALL, examples=0)}, "examples (--examples) must be"),
        ({"settings": replace(SMALL, rho=-0.1)}, "rho (--rho) must be a number >= 0"),
        ({"settings": replace(SMALL, top_k=25)}, "at most max_iter=20"),
        ({"jobs": 0}, "jobs (--jobs) must be an integer >= 1"),
    ]
    for arguments, message in cases:
        arguments = {"settings": SMALL, **arguments}
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            measure_runs(db_path, progress=False, **arguments)
    with pytest.raises(FileNotFoundError, match="no database"):
        measure_runs(tmp_path / "absent.db", SMALL, progress=False)
    assert not (tmp_path / "absent.db").exists()
    with Store(db_path) as store:
        assert store.sharpness() == {}


def test_runs_are_selected_by_hash_prefix_and_method(measured_db: Path) -> None:
    with Store(measured_db) as store:
        runs = store.runs()
        by_prefix = sharpness_runs.select_runs(store, [runs[2].config_hash[:10]])
        sams = sharpness_runs.select_runs(store, None, ["sam"])
        every = sharpness_runs.select_runs(store, ["all"])
    assert [run.config_hash for run in by_prefix] == [runs[2].config_hash]
    assert {run.config["method"] for run in sams} == {"sam"} and len(sams) == 2
    assert [run.id for run in every] == [run.id for run in runs]


def test_record_sharpness_refuses_a_run_that_is_not_finished(db_path: Path) -> None:
    with Store(db_path) as store:
        run_id = store.claim("abc", _tiny_grid()[0].to_dict(), {}, 1)
        with pytest.raises(ValueError, match="no finished run"):
            store.record_sharpness(
                run_id,
                metrics=dict.fromkeys(SHARPNESS_COLUMNS, 1.0),
                examples=1,
                data="",
                settings={},
                measure_time_s=0.0,
                environment={},
            )
        assert store.sharpness() == {}


def test_module_example_runs() -> None:
    result = doctest.testmod(sharpness_runs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_a_diverged_run_is_listed_not_measured(tmp_path: Path) -> None:
    diverged = make_run_config(method="sam", seed=0, **{**TINY, "epochs": 1}, lr=1e6)
    healthy = make_run_config(method="sgd", seed=0, **{**TINY, "epochs": 1})
    db_path = tmp_path / "runs.db"
    run_grid([diverged, healthy], db_path, progress=False)
    summary = measure_runs(db_path, SMALL, landscape=True, progress=False)
    assert summary.failed == []
    assert summary.measured == [healthy.config_hash]
    assert len(summary.diverged) == 1 and diverged.config_hash[:8] in summary.diverged[0]
