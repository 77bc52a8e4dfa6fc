"""Hyperparameters chosen on validation data: the choice reads validation accuracy only, the
report gives the chosen setting's test accuracy, every value stays in the sweep plot.

The databases are written directly through the Store API (no training): each run's final
validation and test accuracies are planted, so that what the selection must choose is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from planted_runs import SEEDS, SETTING, TEST, VALIDATION, plant, write_run

from flatminima.cli import main
from flatminima.experiments.report import write_report
from flatminima.experiments.store import Store
from flatminima.experiments.summary import (
    SelectionError,
    select_by_validation,
    summarize,
)
from flatminima.experiments.tables import SELECTION_HEADERS, selection_rows


@pytest.fixture
def planted_db(tmp_path: Path) -> Path:
    db_path = tmp_path / "planted.db"
    plant(db_path)
    return db_path


def _selections(db_path: Path) -> dict[str, Any]:
    with Store(db_path, create=False) as store:
        [setting] = summarize(store)
    return {selection.method: selection for selection in select_by_validation(setting)}


def test_the_choice_follows_validation_even_where_the_test_set_disagrees(planted_db: Path) -> None:
    selections = _selections(planted_db)
    assert list(selections) == ["base", "sam", "friendly-sam"]
    sam, friendly = selections["sam"], selections["friendly-sam"]
    # Validation says ρ = 0.05 for SAM (the test set says 0.2), ρ = 0.2 for Friendly SAM.
    assert sam.chosen.hyperparameters["rho"] == 0.05
    assert friendly.chosen.hyperparameters["rho"] == 0.2
    assert sam.choice == "ρ=0.05" and friendly.choice == "ρ=0.2"
    # What is reported of the choice is its own test accuracy, not the better unchosen one.
    assert sam.chosen.accuracy.mean == pytest.approx(np.mean(TEST[("sam", 0.05)]))
    assert friendly.chosen.accuracy.mean == pytest.approx(np.mean(TEST[("friendly-sam", 0.2)]))
    assert sam.validation == pytest.approx(
        {"sam ρ=0.05": np.mean(VALIDATION[("sam", 0.05)]), "sam ρ=0.2": 0.65}
    )
    assert sam.seeds == SEEDS
    # Paired differences against the other methods' chosen settings, over their seeds.
    base = np.array(TEST[("base", None)])
    expected = np.array(TEST[("friendly-sam", 0.2)]) - base
    assert friendly.versus_base.mean == pytest.approx(expected.mean())
    versus_sam = np.array(TEST[("friendly-sam", 0.2)]) - np.array(TEST[("sam", 0.05)])
    assert friendly.versus_reference.mean == pytest.approx(versus_sam.mean())
    assert sam.versus_reference is None and selections["base"].versus_base is None
    assert selections["base"].choice == ""


def test_the_choice_does_not_move_when_test_accuracies_are_reshuffled(
    tmp_path: Path,
) -> None:
    """Every test accuracy of the database replaced (rank order reversed, values changed):
    the same settings are chosen, and only what is reported of them changes."""
    reversed_test = {key: [1.0 - value for value in values] for key, values in TEST.items()}
    plant(tmp_path / "a.db")
    plant(tmp_path / "b.db", reversed_test)
    first, second = _selections(tmp_path / "a.db"), _selections(tmp_path / "b.db")
    for method in first:
        assert first[method].chosen.label == second[method].chosen.label
        assert first[method].validation == second[method].validation
    assert second["sam"].chosen.accuracy.mean == pytest.approx(
        np.mean(reversed_test[("sam", 0.05)])
    )


def test_ties_go_to_the_first_setting_and_only_shared_seeds_count(tmp_path: Path) -> None:
    db_path = tmp_path / "ties.db"
    with Store(db_path) as store:
        for seed in SEEDS:
            write_run(store, "sam", {"rho": 0.05}, seed, test=0.5, validation=0.7)
            write_run(store, "sam", {"rho": 0.1}, seed, test=0.6, validation=0.7)
            # ρ = 0.2 has no seed 1: only seeds 0 and 2 are shared by all three settings
            # (its seed-1 run would otherwise be averaged against nothing).
            if seed != 1:
                validation = 0.69 if seed == 0 else 0.71
                write_run(store, "sam", {"rho": 0.2}, seed, test=0.9, validation=validation)
    [sam] = _selections(db_path).values()
    assert sam.seeds == (0, 2)
    # 0.7 = 0.7 = mean(0.69, 0.71): an exact tie, broken by order: the smallest ρ.
    assert sam.validation["sam ρ=0.2"] == pytest.approx(0.7)
    assert sam.chosen.hyperparameters["rho"] == 0.05


def test_without_a_validation_split_the_selection_is_a_one_line_error(tmp_path: Path) -> None:
    db_path = tmp_path / "plain.db"
    plain = {**SETTING, "validation_size": 0}
    with Store(db_path) as store:
        for rho in (0.05, 0.2):
            write_run(store, "sam", {"rho": rho}, 0, test=0.5, validation=None, setting=plain)
    with Store(db_path, create=False) as store:
        [setting] = summarize(store)
    with pytest.raises(SelectionError, match=r"--select-by validation needs runs with a valid"):
        select_by_validation(setting)
    out = tmp_path / "out"
    assert main(["report", "--db", str(db_path), "--out", str(out), "--select-by", "validation"])
    assert not (out / "report.md").exists()  # nothing half-written


def test_report_command_without_a_validation_split_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "plain.db"
    with Store(db_path) as store:
        write_run(
            store,
            "sam",
            {},
            0,
            test=0.5,
            validation=None,
            setting={**SETTING, "validation_size": 0},
        )
    arguments = ["report", "--db", str(db_path), "--select-by", "validation"]
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--select-by validation" in error


def test_a_sweep_sharing_no_seed_is_refused(tmp_path: Path) -> None:
    db_path = tmp_path / "apart.db"
    with Store(db_path) as store:
        write_run(store, "sam", {"rho": 0.05}, 0, test=0.5, validation=0.7)
        write_run(store, "sam", {"rho": 0.2}, 1, test=0.5, validation=0.7)
    with pytest.raises(SelectionError, match="share no seed"):
        _selections(db_path)


def test_the_report_leads_with_the_chosen_settings_and_rings_them_in_the_sweep_plot(
    planted_db: Path, tmp_path: Path
) -> None:
    report = write_report(planted_db, tmp_path / "out", select_by="validation")
    [setting] = report.settings
    selections = report.selections[setting.slug]
    rows = selection_rows(selections)
    markdown = report.markdown_path.read_text()
    # The main table comes before the table of every setting run.
    main_table = markdown.index("| " + " | ".join(SELECTION_HEADERS) + " |")
    assert main_table < markdown.index("### Every setting run")
    by_method = {row[0]: dict(zip(SELECTION_HEADERS, row, strict=True)) for row in rows}
    assert by_method["sam"]["chosen on validation"] == "ρ=0.05 of 0.05, 0.2"
    assert by_method["friendly-sam"]["chosen on validation"] == "ρ=0.2 of 0.05, 0.2"
    assert by_method["base"]["chosen on validation"] == "one setting run"
    sam_test = 100 * np.array(TEST[("sam", 0.05)])
    assert by_method["sam"]["test acc. % (mean ± std)"] == (
        f"{sam_test.mean():.2f} ± {sam_test.std(ddof=1):.2f}"
    )
    assert by_method["sam"]["validation acc. % (seeds)"] == (
        f"{100 * np.mean(VALIDATION[('sam', 0.05)]):.2f} (3)"
    )
    assert by_method["friendly-sam"]["Δ vs sam (pts, 95% CI)"].startswith(
        f"{100 * (np.mean(TEST[('friendly-sam', 0.2)]) - np.mean(TEST[('sam', 0.05)])):+.2f} ["
    )
    for row in rows:
        assert "| " + " | ".join(row) + " |" in markdown
    # The numbers the choice was made on, every setting's, beside the table.
    assert "- sam (seeds 0, 1, 2): ρ=0.05 71.00 (chosen), ρ=0.2 65.00" in markdown
    assert "friendly-sam (seeds 0, 1, 2): ρ=0.05 66.00, ρ=0.2 70.00 (chosen)" in report.text
    assert "base (seeds" not in markdown  # one setting: nothing was chosen
    assert "validation labels carry the same label noise" in markdown.replace("\n", " ")
    assert "Hyperparameters chosen on validation data" in report.text
    # The sweep plot: every value run, the chosen one ringed.
    [sweep] = [figure for figure in report.figures if figure.path.name == "accuracy_vs_rho.png"]
    assert matplotlib.image.imread(sweep.path).ndim == 3
    assert sorted(sweep.series["sam"]["x"]) == [0.05, 0.2]
    assert set(sweep.series) >= {"chosen: sam ρ=0.05", "chosen: friendly-sam ρ=0.2"}
    assert "chosen: sam ρ=0.2" not in sweep.series
    ringed = sweep.series["chosen: sam ρ=0.05"]
    assert ringed["x"].tolist() == [0.05]
    assert ringed["mean"][0] == pytest.approx(100 * np.mean(TEST[("sam", 0.05)]))
    assert "Ringed" in sweep.caption


def test_a_report_without_selection_is_unchanged(planted_db: Path, tmp_path: Path) -> None:
    report = write_report(planted_db, tmp_path / "out")
    markdown = report.markdown_path.read_text()
    assert "chosen on validation" not in markdown and "Every setting run" not in markdown
    [sweep] = [figure for figure in report.figures if figure.path.name == "accuracy_vs_rho.png"]
    assert not any(key.startswith("chosen") for key in sweep.series)
    assert all(selected == [] for selected in report.selections.values())


def test_report_command_with_selection(planted_db: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    arguments = ["report", "--db", str(planted_db), "--out", str(out), "--select-by", "validation"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "Hyperparameters chosen on validation data" in printed
    assert "ρ=0.05 of 0.05, 0.2" in printed


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--select-by validation chooses what the report shows: give --report DIR"),
        (["--report", "{out}"], "--select-by validation needs a validation split"),
    ],
)
def test_compare_checks_selection_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    db_path = tmp_path / "never.db"
    arguments = ["compare", "--methods", "sam", "--sweep", "rho=0.05,0.1", "--epochs", "1"]
    extra = [item.replace("{out}", str(tmp_path / "out")) for item in extra]
    status = main([*arguments, "--select-by", "validation", "--db", str(db_path), *extra])
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error
    assert not db_path.exists()


def test_unknown_rule_is_refused(planted_db: Path, tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="--select-by takes validation"):
        write_report(planted_db, tmp_path / "out", select_by="test")
