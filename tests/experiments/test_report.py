"""The report: its numbers are the database's, its plots are valid PNG files."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

import flatminima
from flatminima.experiments.config import make_run_config
from flatminima.experiments.plots import arm_styles, method_color
from flatminima.experiments.report import write_report
from flatminima.experiments.runner import run_grid
from flatminima.experiments.statistics import Interval
from flatminima.experiments.store import Store
from flatminima.experiments.summary import summarize
from flatminima.experiments.tables import TABLE_HEADERS, table_rows
from flatminima.registry import BASE_OPTIMIZER, method_names

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def swept_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base optimizer, SAM at two radii and Fisher SAM at one, three seeds, tiny setting."""
    db_path = tmp_path_factory.mktemp("report") / "runs.db"
    tiny = {
        "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
        "train_size": 256, "label_noise": 0.4,
    }  # fmt: skip
    arms = [("base", {}), ("sam", {"rho": 0.05}), ("sam", {"rho": 0.2}), ("fisher-sam", {})]
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
    # Registry order, numeric order within a sweep; every label shows the radius ρ.
    assert [arm.label for arm in setting.arms] == [
        "base",
        "sam ρ=0.05",
        "sam ρ=0.2",
        "fisher-sam ρ=0.1",
    ]
    base = from_sql[("base", "{}")]
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
        if arm.method == "base":
            assert arm.versus_base is None and arm.passes_ratio == 1.0
            continue
        differences = [values[seed] - base[seed] for seed in SEEDS]
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
    assert names == {
        "curves.png",
        "final_accuracy.png",
        "accuracy_vs_cost.png",
        "accuracy_vs_rho.png",
    }
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


# --- hand-made databases: chosen accuracies, failures and divergence, no training ------------


def _record_run(
    store: Store,
    training: dict[str, Any],
    *,
    method: str,
    seed: int,
    accuracy: float = 0.5,
    hyperparameters: dict[str, Any] | None = None,
    error: str | None = None,
    diverged_at_epoch: int | None = None,
) -> None:
    """One run written as the runner would: failed with ``error``, or finished with the final
    test accuracy ``accuracy`` at every epoch (up to ``diverged_at_epoch`` when it diverged,
    its passes and time then covering only those epochs)."""
    config = make_run_config(method=method, hyperparameters=hyperparameters, seed=seed, **training)
    passes_per_step = 1 if method == "base" else 2
    run_id = store.claim(config.config_hash, config.to_dict(), {}, passes_per_step)
    assert run_id is not None
    if error is not None:
        store.fail(run_id, error)
        return
    epochs = diverged_at_epoch or config.epochs
    for epoch in range(1, epochs + 1):
        store.record_epoch(
            run_id,
            {
                "epoch": epoch, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": accuracy,
                "learning_rate": config.lr, "train_time_s": 0.5 * passes_per_step,
                "passes": 10 * passes_per_step * epoch,
            },
        )  # fmt: skip
    final = {
        "train_time_s": 0.5 * passes_per_step * epochs,
        "passes": 10 * passes_per_step * epochs,
        "passes_per_step": passes_per_step,
        "final_test_accuracy": accuracy,
        "final_test_loss": 1.0,
        "final_train_accuracy_noisy": accuracy,
        "final_train_accuracy_clean": accuracy,
        "diverged_at_epoch": diverged_at_epoch,
    }
    store.finish(run_id, final, weights_path=f"{config.config_hash}.pt")


def _table_cells(markdown: str, label: str, heading: str = "") -> dict[str, str]:
    """The main table's row of ``label`` (the first one after ``heading``), by column name."""
    section = markdown[markdown.index(heading) :] if heading else markdown
    row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
    return dict(zip(TABLE_HEADERS, cells, strict=True))


def test_a_method_whose_runs_all_failed_keeps_a_row(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    with Store(db_path) as store:
        for seed in SEEDS:
            _record_run(store, tiny, method="base", seed=seed, accuracy=0.5)
            _record_run(store, tiny, method="sam", seed=seed, error=f"RuntimeError: boom {seed}")
            failed = {"error": "ValueError: bad\nTraceback line"} if seed == 1 else {}
            _record_run(store, tiny, method="asam", seed=seed, accuracy=0.625, **failed)
    report = write_report(db_path, tmp_path / "out")
    [setting] = report.settings
    assert [arm.label for arm in setting.arms] == ["base", "sam ρ=0.05", "asam ρ=0.5"]
    markdown = report.markdown_path.read_text()

    sam = _table_cells(markdown, "sam ρ=0.05")
    assert sam["seeds"] == "0 of 3"
    assert sam["test acc. % (mean ± std)"] == "all 3 runs failed"
    assert sam["95% CI"] == sam["passes ×"] == "—"
    assert "sam" in report.text and "all 3 runs failed" in report.text
    # Failed runs are in no statistic: asam is paired with base over its two finished seeds.
    asam = _table_cells(markdown, "asam ρ=0.5")
    assert asam["seeds"] == "2 of 3" and asam["notes"] == "1 of 3 seeds failed"
    assert asam["test acc. % (mean ± std)"] == "62.50 ± 0.00"
    assert asam[f"Δ vs {BASE_OPTIMIZER} (pts, 95% CI)"] == "+12.50 [+12.50, +12.50] (n=2)"
    assert _table_cells(markdown, "base")["seeds"] == "3"
    # Each failure listed with its error's first line.
    assert "- sam ρ=0.05, seed 0: RuntimeError: boom 0" in markdown
    assert "- asam ρ=0.5, seed 1: ValueError: bad\n" in markdown and "Traceback" not in markdown
    assert "Not in the statistics: 4 failed" in markdown
    # The plots draw only what finished (a failed arm has nothing to plot).
    names = {path.name for path in report.plots}
    assert names == {"curves.png", "final_accuracy.png", "accuracy_vs_cost.png"}
    cost = next(figure for figure in report.figures if figure.path.name == "accuracy_vs_cost.png")
    assert cost.series["passes"]["labels"] == ["base", "asam ρ=0.5"]


def test_a_setting_whose_runs_all_failed_is_shown_without_plots(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    with Store(db_path) as store:
        _record_run(store, tiny, method="sam", seed=0, error="RuntimeError: out of memory")
    report = write_report(db_path, tmp_path / "out")
    assert len(report.settings) == 1 and report.plots == []
    cells = _table_cells(report.markdown_path.read_text(), "sam ρ=0.05")
    assert cells["seeds"] == "0 of 1" and cells["test acc. % (mean ± std)"] == "the run failed"


def test_a_diverged_run_is_flagged_counted_in_the_mean_and_left_out_of_the_costs(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    training = {**tiny, "epochs": 6}
    with Store(db_path) as store:
        for seed in SEEDS:
            _record_run(store, training, method="base", seed=seed, accuracy=0.5)
            diverged = 4 if seed == 2 else None
            accuracy = 0.125 if diverged else 0.75
            _record_run(
                store, training, method="sam", seed=seed, accuracy=accuracy,
                diverged_at_epoch=diverged,
            )  # fmt: skip
    report = write_report(db_path, tmp_path / "out")
    [setting] = report.settings
    sam = setting.arms_of("sam")[0]
    assert sam.diverged == {2: 4}
    # Its accuracy is real, in the mean: (0.75 + 0.75 + 0.125) / 3.
    assert sam.accuracy.mean == pytest.approx((0.75 + 0.75 + 0.125) / 3, abs=1e-12)
    assert sam.versus_base.n == 3
    # Its cost covers 4 epochs of 6: the ratios come from the two full runs only (2 passes a
    # step against base's 1, exactly), not (6 + 6 + 4) / 3 / 6 of that.
    assert sam.passes_ratio == 2.0 and sam.time_ratio == 2.0
    markdown = report.markdown_path.read_text()
    notes = _table_cells(markdown, "sam ρ=0.05")["notes"]
    assert notes.startswith("1 of 3 seeds diverged (seed 2 at epoch 4")
    assert "accuracy in the mean" in notes and "costs from the other 2" in notes
    assert _table_cells(markdown, "base")["notes"] == ""
    assert "diverged" in report.text
    assert "counts in the mean" in markdown  # the notes explain what a diverged run means
    # The diverged seed's curve is drawn apart, up to epoch 4; it does not cut the mean curve
    # of the other two short.
    curves = report.figures[0]
    assert curves.path.name == "curves.png"
    mean_curve = curves.series["test accuracy: sam ρ=0.05"]
    assert mean_curve["seeds"] == [0, 1] and list(mean_curve["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert mean_curve["mean"] == pytest.approx([75.0] * 6)
    alone = curves.series["test accuracy: sam ρ=0.05, diverged seed 2"]["values"]
    assert list(alone) == pytest.approx([12.5] * 4)
    # The final-accuracy figure draws it among the points, in the mean.
    final = report.figures[1].series["test accuracy: sam ρ=0.05"]
    assert list(final["values"]) == pytest.approx([75.0, 75.0, 12.5])
    assert final["mean"] == pytest.approx(100 * sam.accuracy.mean)


def test_an_arm_whose_runs_all_diverged_has_no_cost_ratio(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    with Store(db_path) as store:
        _record_run(store, tiny, method="base", seed=0)
        _record_run(store, tiny, method="sam", seed=0, accuracy=0.25, diverged_at_epoch=1)
    report = write_report(db_path, tmp_path / "out")
    [setting] = report.settings
    # No cost ratio for sam: nothing to draw against cost.
    assert {path.name for path in report.plots} == {"curves.png", "final_accuracy.png"}
    sam = setting.arms_of("sam")[0]
    assert math.isnan(sam.passes_ratio) and math.isnan(sam.time_ratio)
    assert sam.accuracy.mean == 0.25
    [_, sam_row] = table_rows(setting)
    assert sam_row[-3:-1] == ["—", "—"] and "no cost ratio: all diverged" in sam_row[-1]


def test_accuracy_intervals_are_clipped_to_0_and_100_percent_in_table_and_plot(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    near_one = (1.0, 1.0, 0.96875)  # its t-interval reaches past 100%
    near_zero = (0.0, 0.0, 0.03125)  # and this one below 0%
    with Store(db_path) as store:
        for seed in SEEDS:
            for rho, accuracies in ((0.05, near_one), (0.1, near_zero)):
                _record_run(
                    store, tiny, method="sam", seed=seed, accuracy=accuracies[seed],
                    hyperparameters={"rho": rho},
                )  # fmt: skip
    raw_high = Interval.of(near_one).high
    raw_low = Interval.of(near_zero).low
    assert raw_high > 1 and raw_low < 0  # the case the clipping is for

    report = write_report(db_path, tmp_path / "out")
    [setting] = report.settings
    high_arm, low_arm = setting.arms
    assert high_arm.accuracy.high == 1.0 and low_arm.accuracy.low == 0.0
    # The other bound and the mean are the t-interval's own.
    assert high_arm.accuracy.low == pytest.approx(Interval.of(near_one).low, abs=1e-15)
    assert high_arm.accuracy.mean == pytest.approx(np.mean(near_one), abs=1e-15)

    markdown = report.markdown_path.read_text()
    assert _table_cells(markdown, high_arm.label)["95% CI"].endswith(", 100.00]")
    assert _table_cells(markdown, low_arm.label)["95% CI"].startswith("[0.00, ")

    # The ρ-sweep plot's error bars end at 100% and 0%, not past them.
    sweep = next(figure for figure in report.figures if figure.path.name == "accuracy_vs_rho.png")
    [line] = [series for name, series in sweep.series.items() if name.startswith("sam")]
    assert list(line["x"]) == [0.05, 0.1] and list(sweep.series["ticks"]["x"]) == [0.05, 0.1]
    assert line["high"] == pytest.approx([100.0, 100 * low_arm.accuracy.high], abs=1e-9)
    assert line["low"] == pytest.approx([100 * high_arm.accuracy.low, 0.0], abs=1e-9)


def test_titles_name_every_training_field_that_differs_between_settings(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    with Store(db_path) as store:
        for training in (
            {"lr": 0.05},
            {"lr": 0.1},
            {"lr": 0.1, "weight_decay": 0.0},
            {"lr": 0.1, "optimizer": "adamw"},
        ):
            _record_run(store, {**tiny, **training}, method="base", seed=0)
    report = write_report(db_path, tmp_path / "out")
    titles = [setting.title for setting in report.settings]
    assert len(set(titles)) == len(titles) == 4
    for setting in report.settings:
        c = setting.config
        assert setting.title.startswith(setting.headline)
        momentum = "no momentum" if c["momentum"] is None else f"momentum {c['momentum']}"
        assert setting.subtitle == (
            f"base optimizer {c['optimizer']} · lr {c['lr']} · {momentum} · "
            f"weight decay {c['weight_decay']}"
        )
        assert setting.plot_title == f"{setting.headline}\n{setting.subtitle}"
    markdown = report.markdown_path.read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == [f"## {title}" for title in titles]


def test_a_single_setting_and_fields_the_headline_shows_add_no_subtitle(
    db_path: Path, tiny: dict[str, Any]
) -> None:
    with Store(db_path) as store:
        _record_run(store, tiny, method="base", seed=0)
        _record_run(store, {**tiny, "label_noise": 0.405}, method="base", seed=0)
        settings = summarize(store)
    assert [setting.subtitle for setting in settings] == ["", ""]
    # Label noise is printed with its every digit, so 40% and 40.5% do not read the same.
    assert [setting.title for setting in settings] == [
        "mnist1d · cnn1d · 40% label noise · 256 training examples · 2 epochs",
        "mnist1d · cnn1d · 40.5% label noise · 256 training examples · 2 epochs",
    ]


def test_writing_a_report_again_removes_its_stale_plots_only(
    db_path: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    with Store(db_path) as store:
        for rho in (0.05, 0.1):
            _record_run(store, tiny, method="sam", seed=0, hyperparameters={"rho": rho})
    out = tmp_path / "out"
    first = write_report(db_path, out)
    [setting] = first.settings
    directory = out / setting.slug
    assert (directory / "accuracy_vs_rho.png").exists()
    # Files a user put there, and report files of another report's setting, stay.
    (directory / "my_notes.txt").write_text("mine")
    (directory / "landscape_1d.json").write_text("{}")  # an earlier measurement's numbers
    (out / "elsewhere.png").write_bytes(PNG_SIGNATURE)
    (directory / "kept").mkdir()
    (directory / "kept" / "inner.png").write_bytes(PNG_SIGNATURE)

    # The same setting without the sweep (one ρ only): no accuracy_vs_rho.png any more.
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "DELETE FROM runs WHERE json_extract(config, '$.hyperparameters.rho') = 0.1"
        )
    second = write_report(db_path, out)
    assert [s.slug for s in second.settings] == [setting.slug]
    assert (
        {path.name for path in directory.glob("*.png")}
        == {path.name for path in second.plots}
        == {"curves.png", "final_accuracy.png"}
    )
    assert not (directory / "landscape_1d.json").exists()
    assert "landscape_1d.json" not in second.markdown_path.read_text()
    assert (directory / "my_notes.txt").read_text() == "mine"
    assert (out / "elsewhere.png").exists() and (directory / "kept" / "inner.png").exists()


def test_paired_differences_use_only_the_seeds_both_arms_ran(
    db_path: Path, tiny: dict[str, Any]
) -> None:
    # base ran seeds 0, 1, 2; SAM only 0 and 2. Pairing by position would pair SAM's seed 2
    # with base's seed 1; an unpaired difference would use base's seed 1 as well.
    sgd = {0: 0.5, 1: 0.25, 2: 0.75}
    sam = {0: 0.625, 2: 0.8125}
    with Store(db_path) as store:
        for seed, accuracy in sgd.items():
            _record_run(store, tiny, method="base", seed=seed, accuracy=accuracy)
        for seed, accuracy in sam.items():
            _record_run(store, tiny, method="sam", seed=seed, accuracy=accuracy)
        [setting] = summarize(store)
    difference = setting.arms_of("sam")[0].versus_base
    paired = [sam[0] - sgd[0], sam[2] - sgd[2]]  # 0.125 and 0.0625
    assert difference.n == 2
    assert difference.mean == pytest.approx(np.mean(paired), abs=1e-15)
    expected = stats.t.interval(0.95, 1, loc=np.mean(paired), scale=stats.sem(paired))
    assert (difference.low, difference.high) == pytest.approx(expected, abs=1e-12)


def test_an_interval_with_zero_spread_has_the_mean_as_both_bounds(
    db_path: Path, tiny: dict[str, Any]
) -> None:
    assert Interval.of([0.25, 0.25, 0.25]) == Interval(0.25, 0.25, 0.25, 3)
    # The same through the report: every seed of an arm at the same accuracy, and the same
    # paired difference at every seed.
    with Store(db_path) as store:
        for seed in SEEDS:
            _record_run(store, tiny, method="base", seed=seed, accuracy=0.25 + 0.125 * seed)
            _record_run(store, tiny, method="sam", seed=seed, accuracy=0.5 + 0.125 * seed)
            _record_run(store, tiny, method="asam", seed=seed, accuracy=0.75)
        [setting] = summarize(store)
    assert setting.arms_of("asam")[0].accuracy == Interval(0.75, 0.75, 0.75, 3)
    assert setting.arms_of("sam")[0].versus_base == Interval(0.25, 0.25, 0.25, 3)
    rows = {row[0]: row for row in table_rows(setting)}
    assert rows["asam ρ=0.5"][2:4] == ["75.00 ± 0.00", "[75.00, 75.00]"]
    assert rows["sam ρ=0.05"][4] == "+25.00 [+25.00, +25.00] (n=3)"


# --- the figures: the numbers they draw are the database's --------------------------------------


def _epochs_from_sql(db_path: Path) -> dict[tuple[str, str], dict[int, dict[str, list[float]]]]:
    """Per arm (method, hyperparameters JSON) and seed, the epoch columns, straight from SQL."""
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        "SELECT r.method, json_extract(r.config, '$.hyperparameters'), r.seed, e.test_accuracy, "
        "e.train_loss FROM epochs e JOIN runs r ON r.id = e.run_id ORDER BY r.id, e.epoch"
    ).fetchall()
    connection.close()
    table: dict[tuple[str, str], dict[int, dict[str, list[float]]]] = {}
    for method, hyperparameters, seed, accuracy, loss in rows:
        columns = table.setdefault((method, hyperparameters), {}).setdefault(
            seed, {"test_accuracy": [], "train_loss": []}
        )
        columns["test_accuracy"].append(accuracy)
        columns["train_loss"].append(loss)
    return table


def _finals_from_sql(db_path: Path, column: str) -> dict[tuple[str, str], list[float]]:
    connection = sqlite3.connect(db_path)
    rows = connection.execute(
        f"SELECT method, json_extract(config, '$.hyperparameters'), {column} FROM runs "
        "ORDER BY seed"
    ).fetchall()
    connection.close()
    table: dict[tuple[str, str], list[float]] = {}
    for method, hyperparameters, value in rows:
        table.setdefault((method, hyperparameters), []).append(value)
    return table


def test_every_figure_draws_the_databases_numbers(swept_db: Path, tmp_path: Path) -> None:
    report = write_report(swept_db, tmp_path / "out")
    [setting] = report.settings
    figures = {figure.path.name: figure for figure in report.figures}
    epochs = _epochs_from_sql(swept_db)
    noisy = _finals_from_sql(swept_db, "final_train_accuracy_noisy")
    clean = _finals_from_sql(swept_db, "final_train_accuracy_clean")
    tested = _finals_from_sql(swept_db, "final_test_accuracy")
    for arm in setting.arms:
        key = (arm.method, json.dumps(arm.hyperparameters, sort_keys=True, separators=(",", ":")))
        # Curves: mean and ±1 std band over seeds, per epoch, of both stored columns.
        for panel, column, scale in (
            ("test accuracy", "test_accuracy", 100),
            ("training loss", "train_loss", 1),
        ):
            values = scale * np.array([epochs[key][seed][column] for seed in SEEDS])
            drawn = figures["curves.png"].series[f"{panel}: {arm.label}"]
            assert drawn["seeds"] == list(SEEDS) and list(drawn["epoch"]) == [1, 2]
            assert drawn["mean"] == pytest.approx(values.mean(axis=0), rel=1e-12)
            spread = values.std(axis=0, ddof=1)
            expected_high = values.mean(axis=0) + spread
            if column == "test_accuracy":
                expected_high = np.clip(expected_high, 0, 100)
            assert drawn["high"] == pytest.approx(expected_high, rel=1e-12)
        # Final accuracy: each seed's point, the mean and interval beside them.
        final = figures["final_accuracy.png"].series[f"test accuracy: {arm.label}"]
        assert list(final["values"]) == pytest.approx([100 * v for v in tested[key]], rel=1e-12)
        interval = Interval.of(tested[key]).clipped(0, 1)
        assert (final["mean"], final["low"], final["high"]) == pytest.approx(
            (100 * interval.mean, 100 * interval.low, 100 * interval.high), rel=1e-12
        )
        for words, stored in (("noisy labels", noisy), ("true labels", clean)):
            train = figures["final_accuracy.png"].series[f"training accuracy, {words}: {arm.label}"]
            assert train["mean"] == pytest.approx(100 * np.mean(stored[key]), rel=1e-12)
    base = Interval.of(tested[("base", "{}")])
    reference = figures["final_accuracy.png"].series["base reference"]
    assert reference["mean"] == pytest.approx(100 * base.mean, rel=1e-12)
    assert reference == figures["accuracy_vs_rho.png"].series["base reference"]

    # Accuracy against cost: a point per arm at its cost ratios; the front is the set of arms
    # no other arm beats on both, found here by brute force.
    cost = figures["accuracy_vs_cost.png"]
    for panel, attribute in (("passes", "passes_ratio"), ("time", "time_ratio")):
        drawn = cost.series[panel]
        assert drawn["labels"] == [arm.label for arm in setting.arms]
        assert list(drawn["cost"]) == [getattr(arm, attribute) for arm in setting.arms]
        points = list(zip(drawn["cost"], drawn["mean"], strict=True))
        dominated = {
            label
            for label, (c, a) in zip(drawn["labels"], points, strict=True)
            if any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in points)
        }
        assert set(drawn["front"]) == set(drawn["labels"]) - dominated
        assert "base" in drawn["front"]  # the cheapest arm is always on the front
    assert list(cost.series["passes"]["cost"]) == [1.0, 2.0, 2.0, 2.0]

    # The ρ sweep: ticks at every value run; Fisher SAM, run at one ρ, placed on it.
    sweep = figures["accuracy_vs_rho.png"]
    assert list(sweep.series["ticks"]["x"]) == [0.05, 0.1, 0.2]
    assert list(sweep.series["sam"]["x"]) == [0.05, 0.2]
    assert list(sweep.series["single: fisher-sam ρ=0.1"]["x"]) == [0.1]

    # Every figure is a PNG with content, shown in report.md with its numbered caption.
    markdown = report.markdown_path.read_text()
    for number, figure in enumerate(report.figures, start=1):
        image = matplotlib.image.imread(figure.path)
        assert figure.path.read_bytes()[:8] == PNG_SIGNATURE and image[..., :3].std() > 0.05
        shown = f"]({figure.path.relative_to(tmp_path / 'out')})\n\n*Figure {number}.* "
        assert shown + figure.caption in markdown


def test_one_colour_per_method_in_every_figure(swept_db: Path) -> None:
    with Store(swept_db) as store:
        [setting] = summarize(store)
    styles = arm_styles(setting)
    sam = [styles[arm.label] for arm in setting.arms_of("sam")]
    # Both SAM arms in SAM's colour, told apart by line style and marker.
    assert {style.color for style in sam} == {method_color("sam")}
    assert len({(style.linestyle, style.marker) for style in sam}) == 2
    colours = [method_color(name) for name in method_names()]
    assert len(set(colours)) == len(colours)


def test_the_report_neither_uses_pyplot_nor_switches_the_backend(
    swept_db: Path, tmp_path: Path
) -> None:
    script = (
        "import sys, matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "import flatminima.cli\n"
        "from flatminima.experiments.report import write_report\n"
        f"write_report({str(swept_db)!r}, {str(tmp_path / 'out')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == before\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_only_the_plot_modules_import_matplotlib() -> None:
    package = Path(flatminima.__file__).parent
    importing = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import|from) matplotlib", path.read_text(), re.MULTILINE)
    )
    assert importing == ["experiments/plots.py", "experiments/saddle_plot.py", "sharpness/plots.py"]
