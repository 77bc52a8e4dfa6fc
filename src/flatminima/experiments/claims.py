"""Each paper's claim, judged from a study's runs by a rule fixed before the numbers.

A reproduction study (``docs/reproductions/studies/*.toml``) trains a method beside SAM, ASAM
or the base optimizer; this module reads the study's finished runs back and turns each claim
of the method's paper into one measured effect, a 95% interval over seeds (paired: a seed fixes
the data, the initialisation and every minibatch for every method) and a verdict:

* **reproduced**: the interval lies on the side the paper claims;
* **not reproduced at this scale**: it lies on the other side;
* **inconclusive (interval contains 0)**: it straddles no difference.

The claims, in the form they are measured:

* :func:`more_accurate`: the method's test accuracy exceeds the other's, each at the
  hyperparameters chosen on validation data (never on the test set).
* :func:`as_accurate_as`: the method's test accuracy is at most :data:`EQUIVALENCE_MARGIN`
  points below the other's (the claim of the cheaper members), both chosen on validation.
* :func:`less_sensitive_to_rho`: over the ρ values both methods ran, the spread of the
  method's test accuracy (best ρ minus worst ρ, per seed) is smaller than the other's.
* :func:`flatter_at_larger_tilt`: a sharpness measure of the trained model (λ_max, tr(H)) is
  smaller at the largest tilt than at the smallest.
* :func:`closer_to_reference_at_larger_tilt`: at the largest tilt the test accuracy is closer
  to SAM's (same ρ) than at the smallest.

``python -m flatminima.experiments.claims STUDY.toml ... --out verdicts.md`` writes the table
for the studies given, each study judged by the claims :data:`PAPER_CLAIMS` lists for its file
name.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flatminima.experiments.config import ConfigError
from flatminima.experiments.files import write_text_atomically
from flatminima.experiments.statistics import Interval, paired_difference
from flatminima.experiments.store import Store
from flatminima.experiments.study import Study, load_study
from flatminima.experiments.summary import (
    Arm,
    Selection,
    Setting,
    select_by_validation,
    summarize,
)

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced at this scale"
INCONCLUSIVE = "inconclusive (interval contains 0)"


@dataclass(frozen=True)
class Verdict:
    """One claim on one setting: what was measured, its interval and what it says."""

    claim: str
    setting: str
    effect: Interval
    """The paired difference over seeds, oriented so that a positive value is the paper's
    claim holding."""
    unit: str
    measured: str
    """How the effect is computed, in words (the contrast and the seeds)."""

    @property
    def verdict(self) -> str:
        if not self.effect.has_bounds or math.isnan(self.effect.low):
            return INCONCLUSIVE
        if self.effect.low > 0:
            return REPRODUCED
        if self.effect.high < 0:
            return NOT_REPRODUCED
        return INCONCLUSIVE


class ClaimError(ValueError):
    """A study whose runs cannot judge a claim (a method missing, no seeds in common)."""


def _arms(setting: Setting, method: str) -> list[Arm]:
    arms = [arm for arm in setting.arms_of(method) if arm.runs]
    if not arms:
        raise ClaimError(f"{setting.title}: no finished run of {method}")
    return arms


def _chosen_pair(setting: Setting, method: str, other: str) -> tuple[Selection, Selection]:
    """The validation choices of ``method`` and ``other`` (one selection of the setting)."""
    selections = {selection.method: selection for selection in select_by_validation(setting)}
    for name in (method, other):
        if name not in selections:
            raise ClaimError(f"{setting.title}: no finished run of {name}")
    return selections[method], selections[other]


def _at_grid_edge(selection: Selection) -> bool:
    """Whether the choice is the first or last of a sweep of three or more values (in the
    report's order, smallest first): the best may then lie outside the grid, which a verdict
    must say."""
    candidates = selection.candidates
    return len(candidates) >= 3 and selection.chosen in (candidates[0], candidates[-1])


def _points(interval: Interval | None, what: str) -> Interval:
    if interval is None:
        raise ClaimError(f"{what}: the two arms share no seed")
    return interval.scaled(100.0)


EQUIVALENCE_MARGIN = 1.0
"""How far below the other's accuracy, in points, still counts as "as accurate" (fixed before
any study ran)."""


def _accuracy_contest(method: str, other: str, margin: float, claim: str) -> Claim:
    """The method's test accuracy minus the other's, plus ``margin``, both at their
    validation-chosen hyperparameters, in points."""

    def judge(setting: Setting) -> Verdict:
        mine, theirs = _chosen_pair(setting, method, other)
        difference = _points(
            paired_difference(mine.chosen.final_accuracy, theirs.chosen.final_accuracy), method
        )
        effect = Interval(
            difference.mean + margin,
            difference.low + margin,
            difference.high + margin,
            difference.n,
        )
        plus = f" + {margin:g}" if margin else ""
        measured = (
            f"test accuracy of {mine.chosen.label} − {theirs.chosen.label}{plus} (each chosen "
            "on validation)"
        )
        edges = [
            f"{selection.chosen.label} at its grid's edge"
            for selection in (mine, theirs)
            if _at_grid_edge(selection)
        ]
        if edges:
            measured += f"; chosen {', '.join(edges)}"
        return Verdict(claim, setting.title, effect, "points", measured)

    return judge


def more_accurate(method: str, other: str) -> Claim:
    """The method's test accuracy minus the other's, both at their validation-chosen
    hyperparameters, in points."""
    return _accuracy_contest(method, other, 0.0, f"{method} more accurate than {other}")


def as_accurate_as(method: str, other: str) -> Claim:
    """The method's test accuracy minus the other's plus :data:`EQUIVALENCE_MARGIN`, both at
    their validation-chosen hyperparameters, in points: positive when the method is at most
    that margin behind (the claim of the cheaper members: the other's accuracy at less cost)."""
    claim = f"{method} as accurate as {other} (within {EQUIVALENCE_MARGIN:g} point)"
    return _accuracy_contest(method, other, EQUIVALENCE_MARGIN, claim)


def _spread(arms: Sequence[Arm], rhos: Sequence[float]) -> dict[int, float]:
    """Per seed (those every arm finished): best minus worst test accuracy over ``rhos``."""
    by_rho = {arm.hyperparameters["rho"]: arm.final_accuracy for arm in arms}
    seeds = set.intersection(*(set(by_rho[rho]) for rho in rhos))
    return {
        seed: max(by_rho[rho][seed] for rho in rhos) - min(by_rho[rho][seed] for rho in rhos)
        for seed in seeds
    }


def less_sensitive_to_rho(method: str, other: str, up_to: float | None = None) -> Claim:
    """The other's spread of test accuracy over ρ minus the method's, in points, over the ρ
    values both ran (those at most ``up_to``, when given: the spread depends on the grid, so a
    study may be judged on more than one)."""

    def judge(setting: Setting) -> Verdict:
        mine, theirs = _arms(setting, method), _arms(setting, other)
        rhos = sorted(
            rho
            for rho in {arm.hyperparameters.get("rho") for arm in mine}
            & {arm.hyperparameters.get("rho") for arm in theirs}
            if rho is not None and (up_to is None or rho <= up_to)
        )
        if len(rhos) < 2:
            raise ClaimError(f"{setting.title}: {method} and {other} share fewer than 2 ρ")
        effect = _points(paired_difference(_spread(theirs, rhos), _spread(mine, rhos)), method)
        grid = ", ".join(f"{rho:g}" for rho in rhos)
        return Verdict(
            f"{method} less sensitive to ρ than {other}",
            setting.title,
            effect,
            "points",
            f"spread (best − worst ρ) of {other}'s test accuracy − {method}'s, ρ ∈ {{{grid}}}",
        )

    return judge


def _by_tilt(setting: Setting, method: str) -> tuple[Arm, Arm]:
    arms = sorted(_arms(setting, method), key=lambda arm: arm.hyperparameters["tilt"])
    if len(arms) < 2:
        raise ClaimError(f"{setting.title}: {method} ran at fewer than 2 tilts")
    return arms[0], arms[-1]


SHARPNESS_NAMES = {"hessian_top_eigenvalue": "λ_max", "hessian_trace": "tr(H)"}


def flatter_at_larger_tilt(method: str, metric: str) -> Claim:
    """``metric`` of the model trained at the smallest tilt minus at the largest."""

    def judge(setting: Setting) -> Verdict:
        low, high = _by_tilt(setting, method)

        def values(arm: Arm) -> dict[int, float]:
            return {seed: record.metrics[metric] for seed, record in arm.sharpness.items()}

        effect = paired_difference(values(low), values(high))
        if effect is None:
            raise ClaimError(f"{setting.title}: {method}'s sharpness was not measured")
        name = SHARPNESS_NAMES.get(metric, metric)
        return Verdict(
            f"{method} flatter ({name}) at larger tilt",
            setting.title,
            effect,
            name,
            f"{name} of {low.label} − {high.label}",
        )

    return judge


def closer_to_reference_at_larger_tilt(method: str, reference: str) -> Claim:
    """|accuracy − the reference's| at the smallest tilt minus at the largest, in points (the
    reference at its one setting in the study)."""

    def judge(setting: Setting) -> Verdict:
        low, high = _by_tilt(setting, method)
        ref = _arms(setting, reference)[0]

        def gap(arm: Arm) -> dict[int, float]:
            theirs = ref.final_accuracy
            return {
                seed: abs(value - theirs[seed])
                for seed, value in arm.final_accuracy.items()
                if seed in theirs
            }

        effect = _points(paired_difference(gap(low), gap(high)), method)
        return Verdict(
            f"{method} approaches {reference} as the tilt grows",
            setting.title,
            effect,
            "points",
            # No "|": the verdict table is markdown.
            f"test-accuracy gap to {ref.label} (absolute difference) at {low.label} − at "
            f"{high.label}",
        )

    return judge


Claim = Callable[[Setting], Verdict]

PAPER_CLAIMS: dict[str, list[Claim]] = {
    "fisher_sam": [more_accurate("fisher-sam", "sam"), more_accurate("fisher-sam", "asam")],
    # The spread over rho, over the decade 0.05-0.5 the studies first ran and over the whole
    # grid (to 1, added because Monge and Friendly SAM chose 0.5 on Fashion-MNIST).
    "monge_sam": [
        less_sensitive_to_rho("monge-sam", "sam", up_to=0.5),
        less_sensitive_to_rho("monge-sam", "sam"),
    ],
    "friendly_sam": [
        more_accurate("friendly-sam", "sam"),
        less_sensitive_to_rho("friendly-sam", "sam", up_to=0.5),
        less_sensitive_to_rho("friendly-sam", "sam"),
    ],
    "tilted_sam": [
        flatter_at_larger_tilt("tilted-sam", "hessian_top_eigenvalue"),
        flatter_at_larger_tilt("tilted-sam", "hessian_trace"),
        # Accuracy against t is the report's table and plot, not a verdict: the study keeps
        # rho fixed for every t, so it is no fair accuracy contest with a tuned SAM.
        closer_to_reference_at_larger_tilt("tilted-sam", "sam"),
    ],
    "family": [
        more_accurate("gsam", "sam"),
        more_accurate("wsam", "sam"),
        more_accurate("bilateral-sam", "sam"),
        as_accurate_as("momentum-sam", "sam"),
        as_accurate_as("esam", "sam"),
        as_accurate_as("looksam", "sam"),
    ],
}
"""The claims each study judges, by the start of its file name (``fisher_sam_mnist1d.toml``
is judged by ``fisher_sam``'s)."""


def study_setting(study: Study) -> Setting:
    """The one setting of a study's finished runs."""
    if study.database is None:
        raise ClaimError(f"{study.name}: no [output] database to read")
    hashes = study.config_hashes
    with Store(study.database, create=False) as store:
        ended = [
            run
            for run in store.runs()
            if run.config_hash in hashes and run.status in ("finished", "failed")
        ]
        if len(ended) < len(hashes):  # a verdict on part of the grid is no verdict
            raise ClaimError(
                f"{study.name}: {len(ended)} of its {len(hashes)} runs have ended; run "
                f"`flatminima compare --study {study.name}` first"
            )
        settings = summarize(store, hashes)
    if len(settings) != 1:
        raise ClaimError(f"{study.name}: {len(settings)} settings with finished runs, not 1")
    return settings[0]


def judge_study(path: str | Path) -> list[Verdict]:
    """Every claim :data:`PAPER_CLAIMS` lists for the study file at ``path``."""
    path = Path(path)
    claims = [claims for prefix, claims in PAPER_CLAIMS.items() if path.stem.startswith(prefix)]
    if not claims:
        raise ClaimError(f"{path}: no claims for this study (known: {', '.join(PAPER_CLAIMS)})")
    setting = study_setting(load_study(path))
    return [claim(setting) for claim in claims[0]]


def _format(effect: Interval, unit: str) -> str:
    digits = 2 if unit == "points" else 3
    return f"{effect.mean:+.{digits}f} [{effect.low:+.{digits}f}, {effect.high:+.{digits}f}]"


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a markdown table: claim, setting, effect with its interval, verdict."""
    lines = [
        "| claim | setting | measured (positive: the claim holds) | effect, 95% CI | seeds | "
        "verdict |",
        "|---|---|---|---|---|---|",
    ]
    for verdict in verdicts:
        lines.append(
            f"| {verdict.claim} | {verdict.setting} | {verdict.measured} | "
            f"{_format(verdict.effect, verdict.unit)} {verdict.unit} | {verdict.effect.n} | "
            f"**{verdict.verdict}** |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flatminima.experiments.claims",
        description="Judge the papers' claims from reproduction studies' runs.",
    )
    parser.add_argument("studies", nargs="+", type=Path, help="study files (TOML)")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args(argv)
    try:
        verdicts = [verdict for study in args.studies for verdict in judge_study(study)]
    except (ClaimError, ConfigError, FileNotFoundError) as error:
        print(f"claims: error: {error}", file=sys.stderr)
        return 2
    table = verdict_table(verdicts)
    print(table)
    if args.out is not None:
        write_text_atomically(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
