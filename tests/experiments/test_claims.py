"""The papers' claims judged from a study's runs: planted databases whose effects are known
(accuracy, spread over ρ, sharpness) must get the verdict the rule gives, on the side the
interval lies; selection reads validation accuracy only."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from planted_runs import SETTING, write_run

from flatminima.experiments import claims
from flatminima.experiments.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    judge_study,
    verdict_table,
)
from flatminima.experiments.store import SHARPNESS_COLUMNS, Store
from flatminima.experiments.study import load_study

SEEDS = (0, 1, 2, 3, 4)
NOISE = (0.000, 0.004, -0.003, 0.002, -0.001)
"""Per-seed jitter, so that every interval has a width."""

TRAINING = "\n".join(f"{key} = {value!r}" for key, value in SETTING.items()).replace("'", '"')


def _study(tmp_path: Path, name: str, methods: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'seeds = "0-4"\nselect_by = "validation"\n\n[training]\n{TRAINING}\n\n'
        f'{textwrap.dedent(methods)}\n[output]\ndatabase = "planted.db"\n'
    )
    return path


def _plant(tmp_path: Path, arms: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple]) -> None:
    """Arms (method, hyperparameters) → (test accuracy, validation accuracy), jittered by seed."""
    with Store(tmp_path / "planted.db") as store:
        for (method, hyperparameters), (test, validation) in arms.items():
            for seed, jitter in zip(SEEDS, NOISE, strict=True):
                write_run(
                    store,
                    method,
                    dict(hyperparameters),
                    seed,
                    test=test + jitter,
                    validation=validation + jitter,
                )


FISHER = """\
[methods.base]
[methods.sam]
rho = [0.05, 0.2]
[methods.asam]
rho = [0.5, 1.0]
[methods.fisher-sam]
rho = [0.05, 0.2]
"""


@pytest.mark.parametrize(
    ("fisher_test", "expected"),
    [(0.75, REPRODUCED), (0.60, NOT_REPRODUCED), (0.70, INCONCLUSIVE)],
)
def test_more_accurate_judges_the_validation_chosen_settings(
    tmp_path: Path, fisher_test: float, expected: str
) -> None:
    # Validation chooses sam ρ=0.05 (test 0.70) and fisher-sam ρ=0.2; the unchosen arms have
    # test accuracies that would flip every verdict if the test set chose.
    _plant(
        tmp_path,
        {
            ("base", ()): (0.50, 0.50),
            ("sam", (("rho", 0.05),)): (0.70, 0.80),
            ("sam", (("rho", 0.2),)): (0.95, 0.60),
            ("asam", (("rho", 0.5),)): (0.65, 0.70),
            ("asam", (("rho", 1.0),)): (0.99, 0.50),
            ("fisher-sam", (("rho", 0.05),)): (0.99, 0.50),
            ("fisher-sam", (("rho", 0.2),)): (fisher_test, 0.80),
        },
    )
    fisher_vs_sam, fisher_vs_asam = judge_study(_study(tmp_path, "fisher_sam_x", FISHER))
    assert fisher_vs_sam.claim == "fisher-sam more accurate than sam"
    assert fisher_vs_sam.effect.n == 5
    assert fisher_vs_sam.effect.mean == pytest.approx(100 * (fisher_test - 0.70))
    # 0.70: the same accuracy as SAM's chosen arm on every seed, a zero-width interval at 0.
    assert fisher_vs_sam.verdict == expected
    assert fisher_vs_asam.effect.mean == pytest.approx(100 * (fisher_test - 0.65))
    assert "sam ρ=0.05" in fisher_vs_sam.measured and "fisher-sam ρ=0.2" in fisher_vs_sam.measured
    assert "edge" not in fisher_vs_sam.measured  # sweeps of two values have no inside


def test_an_interval_containing_zero_is_inconclusive(tmp_path: Path) -> None:
    pairs = [(0.70, 0.71), (0.72, 0.70), (0.69, 0.70), (0.71, 0.70), (0.70, 0.705)]
    with Store(tmp_path / "planted.db") as store:
        for seed, (mine, theirs) in enumerate(pairs):
            write_run(store, "base", {}, seed, test=0.5, validation=0.5)
            write_run(store, "sam", {"rho": 0.05}, seed, test=theirs, validation=0.7)
            write_run(store, "friendly-sam", {"rho": 0.05}, seed, test=mine, validation=0.7)
    study = _study(
        tmp_path,
        "friendly_sam_x",
        "[methods.base]\n[methods.sam]\nrho = 0.05\n[methods.friendly-sam]\nrho = 0.05\n",
    )
    # One ρ each: the accuracy claim alone (the spread over ρ needs two).
    accuracy = claims.more_accurate("friendly-sam", "sam")(claims.study_setting(load_study(study)))
    assert accuracy.effect.low < 0 < accuracy.effect.high
    assert accuracy.verdict == INCONCLUSIVE


def test_less_sensitive_to_rho_compares_the_spread_over_the_shared_rhos(tmp_path: Path) -> None:
    # Monge SAM: 0.70 / 0.72 / 0.71 across ρ (spread 2 points); SAM: 0.60 / 0.75 / 0.70
    # (spread 15 points). Validation plays no part.
    arms = {("base", ()): (0.5, 0.5)}
    for rho, monge, sam in [(0.05, 0.70, 0.60), (0.1, 0.72, 0.75), (0.5, 0.71, 0.70)]:
        arms[("monge-sam", (("rho", rho),))] = (monge, 0.5)
        arms[("sam", (("rho", rho),))] = (sam, 0.5)
    _plant(tmp_path, arms)
    methods = "[methods.base]\n[methods.sam]\nrho = [0.05, 0.1, 0.5]\n"
    methods += "[methods.monge-sam]\nrho = [0.05, 0.1, 0.5]\n"
    decade, verdict = judge_study(_study(tmp_path, "monge_sam_x", methods))
    # The same jitter on every arm of a seed: the spreads are exact.
    assert verdict.effect.mean == pytest.approx(15.0 - 2.0)
    assert verdict.verdict == REPRODUCED
    assert "ρ ∈ {0.05, 0.1, 0.5}" in verdict.measured
    # Up to 0.5: the same three values here.
    assert decade.effect == verdict.effect
    narrower = claims.less_sensitive_to_rho("monge-sam", "sam", up_to=0.1)(
        claims.study_setting(load_study(tmp_path / "monge_sam_x.toml"))
    )
    assert narrower.effect.mean == pytest.approx(15.0 - 2.0)  # SAM 0.60-0.75, Monge 0.70-0.72
    assert "ρ ∈ {0.05, 0.1}" in narrower.measured


def _measure(store: Store, method: str, tilt: float, values: list[float]) -> None:
    for run in store.runs():
        config = run.config
        if config["method"] == method and config["hyperparameters"].get("tilt") == tilt:
            metrics = dict.fromkeys(SHARPNESS_COLUMNS, 1.0)
            metrics["hessian_top_eigenvalue"] = values[config["seed"]]
            metrics["hessian_trace"] = 10 * values[config["seed"]]
            store.record_sharpness(
                run.id,
                metrics=metrics,
                examples=64,
                data="planted",
                settings={"examples": 64},
                measure_time_s=0.0,
                environment={},
            )


def test_tilted_claims_read_the_smallest_and_largest_tilt(tmp_path: Path) -> None:
    tilts = {0.0: 0.60, 5.0: 0.64, 100.0: 0.69}  # SAM at 0.70: t = 100 is closer
    arms = {("base", ()): (0.5, 0.5), ("sam", (("rho", 0.1),)): (0.70, 0.7)}
    for tilt, accuracy in tilts.items():
        arms[("tilted-sam", (("rho", 0.1), ("tilt", tilt)))] = (accuracy, accuracy)
    _plant(tmp_path, arms)
    with Store(tmp_path / "planted.db") as store:
        _measure(store, "tilted-sam", 0.0, [5.0, 5.2, 4.9, 5.1, 5.0])
        _measure(store, "tilted-sam", 5.0, [4.0, 4.1, 3.9, 4.2, 4.0])
        _measure(store, "tilted-sam", 100.0, [6.0, 6.1, 5.8, 6.3, 6.0])  # sharper
    methods = "[methods.base]\n[methods.sam]\nrho = 0.1\n[methods.tilted-sam]\nrho = 0.1\n"
    methods += "tilt = [0.0, 5.0, 100.0]\n"
    top, trace, approach = judge_study(_study(tmp_path, "tilted_sam_x", methods))
    accuracy = claims.more_accurate("tilted-sam", "sam")(
        claims.study_setting(load_study(tmp_path / "tilted_sam_x.toml"))
    )
    assert top.effect.mean == pytest.approx(5.04 - 6.04)
    assert top.verdict == NOT_REPRODUCED
    assert trace.effect.mean == pytest.approx(10 * (5.04 - 6.04))
    assert top.measured == "λ_max of tilted-sam ρ=0.1 tilt=0 − tilted-sam ρ=0.1 tilt=100"
    # Chosen on validation: t = 100 (0.69) against SAM (0.70).
    assert accuracy.effect.mean == pytest.approx(-1.0)
    assert accuracy.measured.endswith("; chosen tilted-sam ρ=0.1 tilt=100 at its grid's edge")
    assert approach.effect.mean == pytest.approx(10.0 - 1.0)
    assert approach.verdict == REPRODUCED
    assert "|" not in approach.measured  # a cell of a markdown table
    table = verdict_table([top, approach])
    assert table.count("\n") == 3 and f"**{NOT_REPRODUCED}**" in table


def test_a_study_without_claims_or_runs_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _plant(tmp_path, {("base", ()): (0.5, 0.5)})
    unknown = _study(tmp_path, "adam_study", "[methods.base]\n")
    assert claims.main([str(unknown)]) == 2
    assert "no claims for this study" in capsys.readouterr().err
    missing = _study(tmp_path, "fisher_sam_y", FISHER)
    assert claims.main([str(missing)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("claims: error: ") and "5 of its 35 runs have ended" in line


@pytest.mark.parametrize(("behind", "expected"), [(0.005, REPRODUCED), (0.03, NOT_REPRODUCED)])
def test_as_accurate_as_allows_the_stated_margin_and_no_more(
    tmp_path: Path, behind: float, expected: str
) -> None:
    _plant(
        tmp_path,
        {
            ("base", ()): (0.50, 0.50),
            ("sam", (("rho", 0.1),)): (0.70, 0.70),
            ("momentum-sam", (("rho", 1.0),)): (0.70 - behind, 0.70),
        },
    )
    study = _study(
        tmp_path,
        "family_x",
        "[methods.base]\n[methods.sam]\nrho = 0.1\n[methods.momentum-sam]\nrho = 1.0\n",
    )
    setting = claims.study_setting(load_study(study))
    verdict = claims.as_accurate_as("momentum-sam", "sam")(setting)
    assert verdict.effect.mean == pytest.approx(claims.EQUIVALENCE_MARGIN - 100 * behind)
    assert verdict.verdict == expected
    assert verdict.claim == "momentum-sam as accurate as sam (within 1 point)"


def test_a_study_with_runs_still_to_train_gets_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _plant(tmp_path, {("base", ()): (0.5, 0.5), ("sam", (("rho", 0.1),)): (0.7, 0.7)})
    methods = "[methods.base]\n[methods.sam]\nrho = [0.1, 0.2]\n[methods.monge-sam]\nrho = 0.1\n"
    study = _study(tmp_path, "monge_sam_z", methods)
    assert claims.main([str(study)]) == 2
    assert "10 of its 20 runs have ended; run `flatminima compare --study" in (
        capsys.readouterr().err
    )
