"""The report's sharpness section: its numbers are the database's, its correlations SciPy's,
its plots valid; databases from before the sharpness table still report."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from flatminima.experiments.config import RunConfig, make_run_config
from flatminima.experiments.labels import arm_label
from flatminima.experiments.report import write_report
from flatminima.experiments.runner import run_grid
from flatminima.experiments.sharpness_runs import SharpnessSettings, measure_runs
from flatminima.experiments.statistics import spearman
from flatminima.experiments.store import SCHEMA_VERSION, Store
from flatminima.experiments.summary import sharpness_correlations, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = SharpnessSettings(examples=128, num_probes=2, max_iter=15)
TINY: dict[str, Any] = {
    "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
    "train_size": 256, "label_noise": 0.4,
}  # fmt: skip
SHOWN = ("hessian_top_eigenvalue", "hessian_trace", "worst_case_sharpness")


@pytest.fixture(scope="module")
def measured_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base optimizer and SAM, three seeds each, every run measured with a landscape."""
    db_path = tmp_path_factory.mktemp("sharpness-report") / "runs.db"
    configs = [
        make_run_config(method=method, seed=seed, **TINY)
        for seed in (0, 1, 2)
        for method in ("base", "sam")
    ]
    run_grid(configs, db_path, progress=False)
    measure_runs(db_path, SMALL, landscape=True, progress=False)
    return db_path


def _from_sql(db_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Each measured run's accuracy and sharpness by arm label (the method and its
    hyperparameters, from SQL), in seed order."""
    with sqlite3.connect(db_path) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT r.method, json_extract(r.config, '$.hyperparameters') AS hyperparameters, "
            "r.seed, r.final_test_accuracy, s.* FROM sharpness s "
            "JOIN runs r ON r.id = s.run_id ORDER BY r.seed"
        ).fetchall()
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_arm[arm_label(row["method"], json.loads(row["hyperparameters"]))].append(dict(row))
    return by_arm


def _cells(markdown: str, heading: str, label: str) -> list[str]:
    """The cells of the row starting with ``label`` in the first table after ``heading``."""
    section = markdown[markdown.index(heading) :]
    row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def _mean_std(cell: str) -> tuple[float, float, float]:
    """``"12.3 ± 0.45"`` → (mean, std, half a unit in the last decimal printed)."""
    mean, std = cell.split(" ± ")
    decimals = len(mean.partition(".")[2])
    return float(mean), float(std), 0.5 * 10.0**-decimals


def test_sharpness_columns_equal_the_database(measured_db: Path, tmp_path: Path) -> None:
    report = write_report(measured_db, tmp_path / "out")
    markdown = report.markdown_path.read_text()
    heading = "### Sharpness beside test accuracy"
    assert heading in markdown and "sharpness beside test accuracy" in report.text
    assert "λ_max (mean ± std)" in markdown and "worst-case sharpness, ρ=0.05" in markdown
    assert "128 of the 256 (drawn with seed 0) training examples" in markdown
    for method, rows in _from_sql(measured_db).items():
        cells = _cells(markdown, heading, method)
        assert cells[1] == str(len(rows)) == "3"
        mean, std, tolerance = _mean_std(cells[2])
        accuracies = [100 * row["final_test_accuracy"] for row in rows]
        assert mean == pytest.approx(np.mean(accuracies), abs=tolerance)
        assert std == pytest.approx(np.std(accuracies, ddof=1), abs=tolerance)
        for cell, column in zip(cells[3:], SHOWN, strict=True):
            mean, std, tolerance = _mean_std(cell)
            values = [row[column] for row in rows]
            assert mean == pytest.approx(np.mean(values), abs=tolerance)
            assert std == pytest.approx(np.std(values, ddof=1), rel=0.05)
        # The terminal table shows the same row.
        assert " ".join(cells[1:]) in " ".join(report.text.split())


def test_rank_correlations_are_scipys_over_the_measured_runs(
    measured_db: Path, tmp_path: Path
) -> None:
    by_method = _from_sql(measured_db)
    rows = [row for method_rows in by_method.values() for row in method_rows]
    with Store(measured_db) as store:
        [setting] = summarize(store)
    correlations = {c.metric: c for c in sharpness_correlations(setting)}
    assert set(SHOWN) <= set(correlations)
    markdown = write_report(measured_db, tmp_path / "out").markdown_path.read_text()
    assert "Spearman rank correlation with final test accuracy" in markdown
    for metric, correlation in correlations.items():
        sharpness = [row[metric] for row in rows]
        accuracy = [row["final_test_accuracy"] for row in rows]
        expected = stats.spearmanr(sharpness, accuracy)
        assert correlation.n == len(rows) == 6
        assert correlation.coefficient == pytest.approx(expected.statistic, abs=1e-12)
        # Six runs: the exact p-value over all 720 pairings.
        assert correlation.p_value == pytest.approx(_exact_p(sharpness, accuracy), rel=1e-9)
        cells = _cells(markdown, "Spearman rank correlation", correlation.name)
        assert cells[1:] == [f"{correlation.coefficient:+.2f}", f"{correlation.p_value:.2g}", "6"]


def _exact_p(x: list[float], y: list[float]) -> float:
    """Brute force with SciPy's coefficient: the share of all pairings of x with y at least as
    correlated, in absolute value, as the observed one."""
    observed = abs(stats.spearmanr(x, y).statistic)
    pairings = list(itertools.permutations(y))
    extreme = sum(abs(stats.spearmanr(x, p).statistic) >= observed - 1e-12 for p in pairings)
    return extreme / len(pairings)


def test_spearman_p_value_is_exact_for_few_runs() -> None:
    # A perfect ranking of n runs: only it and its reverse reach |ρ| = 1, p = 2/n!.
    assert spearman([1.0, 2.0, 3.0, 4.0], [0.1, 0.5, 0.7, 0.9]) == (1.0, pytest.approx(2 / 24))
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == (-1.0, pytest.approx(2 / 6))
    rng = np.random.default_rng(0)
    for n in (5, 6, 7):
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert spearman(x, y)[1] == pytest.approx(_exact_p(list(x), list(y)), rel=1e-9)


def test_spearman_handles_ties_and_undefined_cases() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=12).astype(float)  # many ties
    y = rng.normal(size=12)
    coefficient, p_value = spearman(x, y)
    expected = stats.spearmanr(x, y)
    assert coefficient == pytest.approx(expected.statistic, abs=1e-12)
    assert p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert spearman(list(range(10)), list(range(10, 0, -1))) == (-1.0, 0.0)  # t approx.
    assert all(math.isnan(v) for v in spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert all(math.isnan(v) for v in spearman([1.0, 2.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # content, not a blank canvas


def test_plots_are_valid_pngs_and_the_landscape_numbers_are_the_databases(
    measured_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = write_report(measured_db, out)
    names = {path.name for path in report.plots}
    assert {"accuracy_vs_sharpness.png", "landscape_1d.png"} <= names
    markdown = report.markdown_path.read_text()
    for path in report.plots:
        _valid_png(path)
        assert f"]({path.relative_to(out)})" in markdown
    [setting] = report.settings
    by_arm = _from_sql(measured_db)
    # The landscape numbers and figure: every seed of every arm, as stored.
    numbers = json.loads((out / setting.slug / "landscape_1d.json").read_text())
    landscape = next(f for f in report.figures if f.path.name == "landscape_1d.png")
    assert set(numbers) == set(by_arm) == set(landscape.series)
    for label, rows in by_arm.items():
        assert sorted(numbers[label]) == ["0", "1", "2"]
        drawn = landscape.series[label]
        for row in rows:
            stored = json.loads(row["landscape"])
            line = numbers[label][str(row["seed"])]
            assert line["alphas"] == stored["alphas"] and line["losses"] == stored["losses"]
            assert list(drawn["seeds"][row["seed"]]) == stored["losses"]
            assert len(line["alphas"]) == 21 and min(line["losses"]) > 0
        losses = np.array([json.loads(row["landscape"])["losses"] for row in rows])
        assert drawn["mean"] == pytest.approx(losses.mean(axis=0), rel=1e-12)
    # The sharpness figure: a panel per stored measure, each run's point from the database,
    # the panel's Spearman coefficient in its caption text.
    scatter = next(f for f in report.figures if f.path.name == "accuracy_vs_sharpness.png")
    correlations = {c.metric: c for c in sharpness_correlations(setting)}
    for metric in correlations:
        for label, rows in by_arm.items():
            drawn = scatter.series[f"{metric}: {label}"]
            assert list(drawn["x"]) == [row[metric] for row in rows]
            assert list(drawn["y"]) == pytest.approx(
                [100 * row["final_test_accuracy"] for row in rows], rel=1e-12
            )
    assert "Spearman" in scatter.caption


def test_a_database_without_the_sharpness_table_still_reports(
    measured_db: Path, tmp_path: Path
) -> None:
    # A database written before the sharpness table existed (schema version 1, also without
    # the runs' heartbeat and divergence columns): the same runs, no such table.
    db_path = tmp_path / "old.db"
    with sqlite3.connect(measured_db) as source, sqlite3.connect(db_path) as copy:
        source.backup(copy)
        copy.execute("DROP TABLE sharpness")
        copy.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
        copy.execute("ALTER TABLE runs DROP COLUMN diverged_at_epoch")
        copy.execute("PRAGMA user_version=1")
        # Its baseline under its old name, `sgd` (and hashed with it, as it was then).
        for run_id, text in copy.execute("SELECT id, config FROM runs WHERE method = 'base'"):
            config = {**json.loads(text), "method": "sgd"}
            copy.execute(
                "UPDATE runs SET method = 'sgd', config = ?, config_hash = ? WHERE id = ?",
                (json.dumps(config, sort_keys=True), RunConfig(**config).config_hash, run_id),
            )
    # Weights paths are stored relative to the database's folder.
    shutil.copytree(measured_db.parent / "runs-weights", tmp_path / "runs-weights")
    with sqlite3.connect(db_path) as connection:
        old_columns = [row[1] for row in connection.execute("PRAGMA table_info(runs)")]
        select_old = f"SELECT {', '.join(old_columns)} FROM runs ORDER BY id"
        runs_before = connection.execute(select_old).fetchall()
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "sharpness" not in tables

    report = write_report(db_path, tmp_path / "out")
    markdown = report.markdown_path.read_text()
    assert "test acc. % (mean ± std)" in markdown
    assert "Sharpness beside test accuracy" not in markdown and "Spearman" not in markdown
    # The old `sgd` runs are the base arm, and SAM is compared with it.
    [setting] = report.settings
    assert [arm.label for arm in setting.arms] == ["base", "sam ρ=0.05"]
    assert setting.arms[1].versus_base is not None and setting.arms[1].versus_base.n == 3
    assert {path.name for path in report.plots} == {
        "curves.png",
        "final_accuracy.png",
        "accuracy_vs_cost.png",
    }
    with sqlite3.connect(db_path) as connection:
        assert connection.execute(select_old).fetchall() == runs_before
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        migrated = "SELECT COUNT(*) FROM runs WHERE diverged_at_epoch IS NULL"
        assert connection.execute(migrated).fetchone()[0] == len(runs_before)

    # Measured afterwards, one run only: its row alone, and no correlation from one run.
    with Store(db_path) as store:
        first = store.runs()[0]
    summary = measure_runs(db_path, SMALL, runs=[first.config_hash], progress=False)
    assert summary.measured == [first.config_hash]
    markdown = write_report(db_path, tmp_path / "out").markdown_path.read_text()
    first_label = arm_label(first.config["method"], first.config["hyperparameters"])
    cells = _cells(markdown, "### Sharpness beside test accuracy", first_label)
    assert cells[1] == "1" and cells[2] == f"{100 * first.final['final_test_accuracy']:.2f}"
    other = "sam ρ=0.05" if first_label == "base" else "base"
    section = markdown[markdown.index("### Sharpness beside") :]
    assert f"| {other} |" not in section.split("Spearman")[0]
    assert re.search(r"\| top Hessian eigenvalue λ_max \| — \| — \| 1 \|", markdown)
