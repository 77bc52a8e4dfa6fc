"""The report's per-epoch figures: the memorisation and validation curves, and λ_max during
training against the stability thresholds; what they draw is the database's."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from flatminima.experiments.config import make_run_config
from flatminima.experiments.report import write_report
from flatminima.experiments.runner import run_grid
from flatminima.experiments.tracking import sam_edge_of_stability

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1)
TINY = {
    "dataset": "mnist1d", "model": "cnn1d", "epochs": 3, "batch_size": 64, "train_size": 256,
    "label_noise": 0.4,
}  # fmt: skip
ARMS = (("base", {}), ("sam", {"rho": 0.1}))


@pytest.fixture(scope="module")
def tracked_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base optimizer and SAM, two seeds, a validation split, λ_max tracked every 2 epochs."""
    db_path = tmp_path_factory.mktemp("tracked") / "runs.db"
    configs = [
        make_run_config(
            method=method,
            hyperparameters=hyperparameters,
            seed=seed,
            validation_size=64,
            track_sharpness=2,
            **TINY,
        )
        for seed in SEEDS
        for method, hyperparameters in ARMS
    ]
    summary = run_grid(configs, db_path, progress=False)
    assert summary.finished == len(configs)
    return db_path


def _columns(db_path: Path, method: str, column: str) -> dict[int, list[float | None]]:
    """Per seed of ``method``, ``column`` by epoch, straight from SQL."""
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        f"SELECT r.seed, e.{column} FROM epochs e JOIN runs r ON r.id = e.run_id "
        "WHERE r.method = ? ORDER BY r.seed, e.epoch",
        (method,),
    ).fetchall()
    connection.close()
    table: dict[int, list[float | None]] = {}
    for seed, value in rows:
        table.setdefault(seed, []).append(value)
    return table


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).ndim == 3


def test_the_curves_draw_the_stored_memorisation_and_validation_curves(
    tracked_db: Path, tmp_path: Path
) -> None:
    report = write_report(tracked_db, tmp_path / "out")
    curves = next(figure for figure in report.figures if figure.path.name == "curves.png")
    assert _is_png(curves.path)
    labels = {"base": "base", "sam": "sam ρ=0.1"}
    for method, label in labels.items():
        for panel, column in (
            ("training accuracy", "train_accuracy_noisy"),
            ("validation accuracy", "validation_accuracy"),
            ("test accuracy", "test_accuracy"),
        ):
            stored = _columns(tracked_db, method, column)
            values = 100 * np.array([stored[seed] for seed in SEEDS], dtype=float)
            drawn = curves.series[f"{panel}: {label}"]
            assert list(drawn["epoch"]) == [1, 2, 3] and drawn["seeds"] == list(SEEDS)
            assert drawn["mean"] == pytest.approx(values.mean(axis=0), rel=1e-12)
            spread = values.std(axis=0, ddof=1)
            assert drawn["low"] == pytest.approx(
                np.clip(values.mean(axis=0) - spread, 0, 100), rel=1e-12
            )
    assert "memorisation curve" in curves.caption and "±1" in curves.caption
    assert "as noisy as the training labels" in curves.caption


def test_lambda_max_during_training_is_drawn_with_the_thresholds_from_the_stored_numbers(
    tracked_db: Path, tmp_path: Path
) -> None:
    report = write_report(tracked_db, tmp_path / "out")
    [figure] = [f for f in report.figures if f.path.name == "sharpness_during_training.png"]
    assert _is_png(figure.path)
    for method, label in (("base", "base"), ("sam", "sam ρ=0.1")):
        stored = _columns(tracked_db, method, "top_eigenvalue")
        # Measured after epochs 2 and 3 (every second epoch and the last), NULL after epoch 1.
        assert all(stored[seed][0] is None for seed in SEEDS)
        values = np.array([stored[seed][1:] for seed in SEEDS], dtype=float)
        drawn = figure.series[f"λ_max: {label}"]
        assert list(drawn["epoch"]) == [2, 3] and drawn["seeds"] == list(SEEDS)
        assert drawn["mean"] == pytest.approx(values.mean(axis=0), rel=1e-12)
        assert drawn["high"] == pytest.approx(
            values.mean(axis=0) + values.std(axis=0, ddof=1), rel=1e-12
        )
    rates = _columns(tracked_db, "sam", "learning_rate")
    norms = _columns(tracked_db, "sam", "gradient_norm")
    # At every epoch, from its stored learning rate (momentum 0.9).
    threshold = [2 * 1.9 / rate for rate in rates[0]]
    assert rates[0] == rates[1] and list(figure.series["threshold"]["epoch"]) == [1, 2, 3]
    assert figure.series["threshold"]["values"] == pytest.approx(threshold, rel=1e-12)
    # SAM's edge: the λ with ηλ(1 + ρλ/‖g‖) = 2(1 + β) at each seed's stored ‖g‖, averaged.
    edges = [
        np.mean([
            sam_edge_of_stability(rates[seed][epoch], 0.1, 0.9, gradient_norm=norms[seed][epoch])
            for seed in SEEDS
        ])
        for epoch in (1, 2)
    ]  # fmt: skip
    assert figure.series["SAM edge: sam ρ=0.1"]["mean"] == pytest.approx(edges, rel=1e-12)
    for edge, rate, norm in zip(edges, rates[0][1:], norms[0][1:], strict=True):
        assert edge < 2 * 1.9 / rate and norm > 0
    assert "SAM edge: base" not in figure.series
    assert "2(1 + β)/η" in figure.caption and "Agarwala & Dauphin" in figure.caption

    markdown = report.markdown_path.read_text()
    assert "### Sharpness during training" in markdown
    assert "Agarwala & Dauphin (ICML 2023)" in markdown and "ρ/‖g‖" in markdown
    [sam_row] = [line for line in markdown.splitlines() if line.startswith("| sam ρ=0.1 | 2 | 3")]
    cells = [cell.strip() for cell in sam_row.strip("|").split("|")]
    last = np.array([_columns(tracked_db, "sam", "top_eigenvalue")[s][2] for s in SEEDS])
    assert cells[3].startswith(f"{last.mean():.4g} [")
    assert cells[4] == f"{2 * 1.9 / rates[0][2]:.4g}"
    assert cells[5].startswith(f"{edges[1]:.4g} [")
    assert "sharpness_during_training.png" in markdown


def test_without_tracking_or_with_an_older_database_those_figures_and_panels_are_left_out(
    tracked_db: Path, tmp_path: Path
) -> None:
    older = tmp_path / "older.db"
    shutil.copy(tracked_db, older)
    connection = sqlite3.connect(older)
    connection.execute(
        "UPDATE epochs SET train_accuracy_noisy = NULL, validation_accuracy = NULL, "
        "validation_loss = NULL, top_eigenvalue = NULL, gradient_norm = NULL, "
        "sharpness_time_s = NULL"
    )
    connection.commit()
    connection.close()
    report = write_report(older, tmp_path / "out")
    names = [figure.path.name for figure in report.figures]
    assert "sharpness_during_training.png" not in names
    assert not (
        tmp_path / "out" / report.settings[0].slug / "sharpness_during_training.png"
    ).exists()
    curves = report.figures[names.index("curves.png")]
    panels = {name.split(":")[0] for name in curves.series}
    assert panels == {"test accuracy", "training loss"}
    markdown = report.markdown_path.read_text()
    assert "Sharpness during training" not in markdown and "Agarwala" not in markdown
