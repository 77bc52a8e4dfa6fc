"""The report: its numbers are the database's, its plots are valid PNG files."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from flatminima.experiments.config import make_run_config
from flatminima.experiments.report import Interval, summarize, write_report
from flatminima.experiments.runner import run_grid
from flatminima.experiments.store import Store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def swept_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sgd, SAM at two radii and Fisher SAM at one, three seeds, on the tiny setting."""
    db_path = tmp_path_factory.mktemp("report") / "runs.db"
    tiny = {
        "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
        "train_size": 256, "label_noise": 0.4,
    }  # fmt: skip
    arms = [("sgd", {}), ("sam", {"rho": 0.05}), ("sam", {"rho": 0.2}), ("fisher-sam", {})]
    configs = [
        make_run_config(method=method, hyperparameters=hyperparameters, seed=seed, **tiny)
        for seed in SEEDS
        for method, hyperparameters in arms
    ]
    run_grid(configs, db_path, progress=False)
    return db_path


def _final_accuracies(db_path: Path) -> dict[tuple[str, str], dict[int, float]]:
    """Final test accuracy by (method, hyperparameters JSON) and seed, straight from SQL."""
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        "SELECT method, json_extract(config, '$.hyperparameters'), seed, final_test_accuracy "
        "FROM runs WHERE status = 'finished'"
    ).fetchall()
    connection.close()
    table: dict[tuple[str, str], dict[int, float]] = {}
    for method, hyperparameters, seed, accuracy in rows:
        table.setdefault((method, hyperparameters), {})[seed] = accuracy
    return table


def test_report_numbers_equal_the_database(swept_db: Path) -> None:
    from_sql = _final_accuracies(swept_db)
    with Store(swept_db) as store:
        [setting] = summarize(store)
    assert len(setting.arms) == len(from_sql) == 4
    # Registry order, numeric order within a sweep, the swept value in the label.
    assert [arm.label for arm in setting.arms] == [
        "sgd",
        "sam rho=0.05",
        "sam rho=0.2",
        "fisher-sam",
    ]
    sgd = from_sql[("sgd", "{}")]
    for arm in setting.arms:
        stored = json.dumps(arm.hyperparameters, sort_keys=True, separators=(",", ":"))
        values = from_sql[(arm.method, stored)]
        assert arm.final_accuracy == values
        accuracies = list(values.values())
        assert arm.accuracy.n == len(SEEDS)
        assert arm.accuracy.mean == pytest.approx(np.mean(accuracies), abs=1e-12)
        if np.std(accuracies) > 0:
            expected = stats.t.interval(
                0.95, len(accuracies) - 1, loc=np.mean(accuracies), scale=stats.sem(accuracies)
            )
            assert (arm.accuracy.low, arm.accuracy.high) == pytest.approx(expected, abs=1e-12)
        if arm.method == "sgd":
            assert arm.versus_base is None and arm.passes_ratio == 1.0
            continue
        differences = [values[seed] - sgd[seed] for seed in SEEDS]
        assert arm.versus_base.mean == pytest.approx(np.mean(differences), abs=1e-12)
        assert arm.passes_ratio == 2.0
        # SAM is the reference itself; Fisher SAM (ρ = 0.1 by default) has no SAM arm at its
        # radius among the two swept ones, so the report pairs it with neither.
        assert arm.versus_reference is None


def test_report_writes_markdown_with_the_table_and_valid_pngs(
    swept_db: Path, tmp_path: Path
) -> None:
    report = write_report(swept_db, tmp_path / "out")
    markdown = report.markdown_path.read_text()
    [setting] = report.settings
    assert setting.title in markdown
    for arm in setting.arms:
        accuracy = f"{100 * arm.accuracy.mean:.2f} ± {100 * arm.std:.2f}"
        assert accuracy in markdown and accuracy in report.text
        assert f"| {arm.label} |" in markdown
        if arm.versus_base is not None:
            assert f"{100 * arm.versus_base.mean:+.2f} [" in markdown
    names = {path.name for path in report.plots}
    assert names == {"test_accuracy_curves.png", "final_accuracy.png", "accuracy_vs_rho.png"}
    for path in report.plots:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({path.relative_to(tmp_path / 'out')})" in markdown
        # A plot with content, not a blank canvas.
        assert image[..., :3].std() > 0.05


def test_sam_pairs_with_the_sam_arm_of_the_same_radius(tmp_path: Path) -> None:
    tiny = {
        "dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64,
        "train_size": 128, "label_noise": 0.2,
    }  # fmt: skip
    arms = [("sam", {"rho": 0.05}), ("sam", {"rho": 0.1}), ("monge-sam", {"rho": 0.1})]
    configs = [
        make_run_config(method=method, hyperparameters=hyperparameters, seed=seed, **tiny)
        for seed in (0, 1)
        for method, hyperparameters in arms
    ]
    run_grid(configs, tmp_path / "runs.db", progress=False)
    with Store(tmp_path / "runs.db") as store:
        [setting] = summarize(store)
    monge = next(arm for arm in setting.arms if arm.method == "monge-sam")
    sam = next(arm for arm in setting.arms if arm.hyperparameters == {"rho": 0.1})
    expected = [monge.final_accuracy[s] - sam.final_accuracy[s] for s in (0, 1)]
    assert monge.versus_reference.mean == pytest.approx(np.mean(expected), abs=1e-12)
    # No base-optimizer runs: no ratios and no differences to it, rather than made-up ones.
    assert math.isnan(monge.passes_ratio) and monge.versus_base is None


def test_interval_of_one_value_has_no_bounds() -> None:
    interval = Interval.of([0.5])
    assert interval.mean == 0.5 and math.isnan(interval.low) and math.isnan(interval.high)


def test_report_of_a_missing_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no database"):
        write_report(tmp_path / "absent.db", tmp_path / "out")
    assert not (tmp_path / "absent.db").exists()
