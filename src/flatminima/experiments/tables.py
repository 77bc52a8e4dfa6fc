"""The report's tables as rows of strings, and their rendering as markdown and plain text.

Every cell is a number of the summary (:mod:`flatminima.experiments.summary`) formatted: the
accuracy table (one row per arm), the sharpness table (one row per measured arm) and the rank
correlations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from flatminima.experiments.labels import describe_hyperparameter
from flatminima.experiments.statistics import Interval
from flatminima.experiments.summary import (
    REFERENCE_METHOD,
    Arm,
    Selection,
    Setting,
    sharpness_correlations,
    tracked_sharpness,
)
from flatminima.registry import BASE_OPTIMIZER

TABLE_HEADERS = (
    "method",
    "seeds",
    "test acc. % (mean ± std)",
    "95% CI",
    f"Δ vs {BASE_OPTIMIZER} (pts, 95% CI)",
    f"Δ vs {REFERENCE_METHOD} (pts, 95% CI)",
    "passes ×",
    "time ×",
    "notes",
)


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.2f}"


def _difference(interval: Interval | None) -> str:
    if interval is None:
        return "—"
    text = f"{100 * interval.mean:+.2f}"
    if interval.n > 1:
        text += f" [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
    return f"{text} (n={interval.n})"


def _seeds(arm: Arm) -> str:
    """How many seeds are in the statistics: ``3``, or ``2 of 3`` when some failed."""
    return str(len(arm.runs)) if not arm.failed else f"{len(arm.runs)} of {arm.attempted}"


def _notes(arm: Arm) -> str:
    """The arm's caveats: failed seeds, diverged seeds (and what that does to its costs)."""
    notes = []
    if arm.failed and arm.runs:
        notes.append(f"{len(arm.failed)} of {arm.attempted} seeds failed")
    diverged = arm.diverged
    if diverged:
        where = ", ".join(
            f"seed {seed} at epoch {epoch}" if epoch is not None else f"seed {seed}"
            for seed, epoch in diverged.items()
        )
        completed = len(arm.completed)
        cost = f"costs from the other {completed}" if completed else "no cost ratio: all diverged"
        notes.append(
            f"{len(diverged)} of {arm.attempted} seeds diverged ({where}; accuracy in the mean, "
            f"{cost})"
        )
    return "; ".join(notes)


def _failed_accuracy(arm: Arm) -> str:
    """The accuracy cell of an arm whose runs all failed."""
    return f"all {len(arm.failed)} runs failed" if len(arm.failed) > 1 else "the run failed"


def table_rows(setting: Setting) -> list[list[str]]:
    """The report table of one setting, as strings (``TABLE_HEADERS`` columns); an arm whose
    runs all failed has a row that says so, its numbers ``—``."""
    rows = []
    for arm in setting.arms:
        if not arm.runs:
            rows.append([arm.label, _seeds(arm), _failed_accuracy(arm), *["—"] * 5, _notes(arm)])
            continue
        accuracy = arm.accuracy
        spread = "" if math.isnan(arm.std) else f" ± {100 * arm.std:.2f}"
        interval = (
            "—" if accuracy.n < 2 else f"[{_percent(accuracy.low)}, {_percent(accuracy.high)}]"
        )
        rows.append(
            [
                arm.label,
                _seeds(arm),
                f"{_percent(accuracy.mean)}{spread}",
                interval,
                "—" if arm.method == BASE_OPTIMIZER else _difference(arm.versus_base),
                _difference(arm.versus_reference),
                "—" if math.isnan(arm.passes_ratio) else f"{arm.passes_ratio:.2f}",
                "—" if math.isnan(arm.time_ratio) else f"{arm.time_ratio:.2f}",
                _notes(arm),
            ]
        )
    return rows


SELECTION_HEADERS = (
    "method",
    "chosen on validation",
    "validation acc. % (seeds)",
    "seeds",
    "test acc. % (mean ± std)",
    "95% CI",
    f"Δ vs {BASE_OPTIMIZER} (pts, 95% CI)",
    f"Δ vs {REFERENCE_METHOD} (pts, 95% CI)",
    "passes ×",
    "time ×",
    "notes",
)


def _chosen(selection: Selection) -> str:
    """``ρ=0.1 of 0.05, 0.1, 0.2``: the chosen values and the values they were chosen from."""
    if len(selection.candidates) == 1:
        return "one setting run"
    if len(selection.swept) == 1:
        [name] = selection.swept
        values = ", ".join(
            describe_hyperparameter(name, arm.hyperparameters.get(name)).split("=", 1)[1]
            for arm in selection.candidates
        )
        return f"{selection.choice} of {values}"
    return f"{selection.choice} of {len(selection.candidates)} settings"


def selection_rows(selections: Sequence[Selection]) -> list[list[str]]:
    """The main table of a report whose hyperparameters were chosen on validation data
    (``SELECTION_HEADERS`` columns): one row per method, the test accuracy of its chosen
    setting and the paired differences to the base optimizer's and SAM's chosen settings."""
    rows = []
    for selection in selections:
        arm = selection.chosen
        accuracy = arm.accuracy
        spread = "" if math.isnan(arm.std) else f" ± {100 * arm.std:.2f}"
        interval = (
            "—" if accuracy.n < 2 else f"[{_percent(accuracy.low)}, {_percent(accuracy.high)}]"
        )
        validation = selection.validation[arm.label]
        rows.append(
            [
                selection.method,
                _chosen(selection),
                f"{_percent(validation)} ({len(selection.seeds)})",
                _seeds(arm),
                f"{_percent(accuracy.mean)}{spread}",
                interval,
                "—" if selection.method == BASE_OPTIMIZER else _difference(selection.versus_base),
                _difference(selection.versus_reference),
                "—" if math.isnan(arm.passes_ratio) else f"{arm.passes_ratio:.2f}",
                "—" if math.isnan(arm.time_ratio) else f"{arm.time_ratio:.2f}",
                _notes(arm),
            ]
        )
    return rows


def validation_lines(selections: Sequence[Selection]) -> list[str]:
    """For each swept method, every setting's validation score, the chosen one marked: the
    numbers the choice was made on, e.g. ``sam (seeds 0, 1, 2): ρ=0.05 71.00 (chosen), ρ=0.2
    65.00``."""
    lines = []
    for selection in selections:
        if len(selection.candidates) < 2:
            continue
        scores = []
        for arm in selection.candidates:
            values = " ".join(
                describe_hyperparameter(name, arm.hyperparameters.get(name))
                for name in selection.swept
            )
            chosen = " (chosen)" if arm is selection.chosen else ""
            scores.append(f"{values} {_percent(selection.validation[arm.label])}{chosen}")
        seeds = ", ".join(map(str, selection.seeds))
        lines.append(f"{selection.method} (seeds {seeds}): " + ", ".join(scores))
    return lines


ERROR_SHOWN = 200
"""How many characters of a failed run's error the report quotes (its first line)."""


def failure_lines(setting: Setting) -> list[str]:
    """``label, seed s: error`` for each failed run of the setting (the error's first line)."""
    lines = []
    for arm in setting.arms:
        for run in arm.failed:
            error_lines = (run.error or "").strip().splitlines()
            error = error_lines[0] if error_lines else "no error recorded"
            if len(error) > ERROR_SHOWN:
                error = error[: ERROR_SHOWN - 1] + "…"
            lines.append(f"{arm.label}, seed {run.config['seed']}: {error}")
    return lines


# --- sharpness beside accuracy ----------------------------------------------------------------

SHARPNESS_SHOWN = (
    ("hessian_top_eigenvalue", "λ_max"),
    ("hessian_trace", "tr(H)"),
    ("worst_case_sharpness", "worst-case sharpness"),
)
"""The measures in the sharpness table: (key of ``measure_sharpness``, column name)."""


def mean_and_std(values: Sequence[float]) -> str:
    """``mean ± std`` with the standard deviation to two significant digits and the mean to the
    same decimal place (4 significant digits for a single value or no spread)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return "—"
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    if std == 0:
        return f"{mean:.4g}"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _common_setting(setting: Setting, name: str) -> Any:
    """The value of a measurement setting shared by every measured run, else ``None``."""
    values = {
        json.dumps(row.settings.get(name)) for arm in setting.arms for row in arm.sharpness.values()
    }
    return json.loads(values.pop()) if len(values) == 1 else None


def sharpness_headers(setting: Setting) -> list[str]:
    rho = _common_setting(setting, "rho")
    radius = f"ρ={rho}" if rho is not None else "ρ varies"
    return [
        "method",
        "runs",
        "test acc. % (same runs)",
        "λ_max (mean ± std)",
        "tr(H) (mean ± std)",
        f"worst-case sharpness, {radius} (mean ± std)",
    ]


def sharpness_rows(setting: Setting) -> list[list[str]]:
    """One row per measured arm: test accuracy and sharpness over the measured seeds."""
    rows = []
    for arm in setting.arms:
        if not arm.sharpness:
            continue
        seeds = sorted(arm.sharpness)
        accuracies = [100 * arm.final_accuracy[seed] for seed in seeds]
        accuracy = f"{np.mean(accuracies):.2f}"
        if len(seeds) > 1:
            accuracy += f" ± {np.std(accuracies, ddof=1):.2f}"
        measures = [
            mean_and_std([arm.sharpness[seed].metrics[key] for seed in seeds])
            for key, _ in SHARPNESS_SHOWN
        ]
        rows.append([arm.label, str(len(seeds)), accuracy, *measures])
    return rows


CORRELATION_HEADERS = (
    "sharpness measure",
    "Spearman ρ_s with test accuracy",
    "p (two-sided)",
    "runs",
)


def correlation_rows(setting: Setting) -> list[list[str]]:
    return [
        [
            correlation.name,
            "—" if math.isnan(correlation.coefficient) else f"{correlation.coefficient:+.2f}",
            "—" if math.isnan(correlation.p_value) else f"{correlation.p_value:.2g}",
            str(correlation.n),
        ]
        for correlation in sharpness_correlations(setting)
    ]


def measured_on(setting: Setting) -> str:
    """A sentence saying what the setting's sharpness was measured on."""
    rows = [row for arm in setting.arms for row in arm.sharpness.values()]
    data = sorted({row.data for row in rows})
    described = data[0] if len(data) == 1 else "; ".join(data)
    return (
        f"{len(rows)} run(s) measured from their final weights, on the training loss "
        f"(eval mode) of {described}."
    )


# --- rendering -------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        return "  ".join(cells).rstrip()

    return "\n".join(
        [line(headers), "  ".join("-" * width for width in widths), *map(line, rows)]
    ).rstrip()


# --- sharpness tracked during training --------------------------------------------------------

TRACKING_HEADERS = (
    "method",
    "seeds",
    "epoch",
    "λ_max (mean [95% CI])",
    "threshold 2(1+β)/η",
    "SAM's predicted edge (mean [95% CI])",
    "peak λ_max / threshold",
    "peak λ_max / SAM edge",
)


def _number_interval(interval: Interval) -> str:
    if math.isnan(interval.mean):
        return "—"
    text = f"{interval.mean:.4g}"
    return text + (f" [{interval.low:.4g}, {interval.high:.4g}]" if interval.has_bounds else "")


def _peak_ratio(values: np.ndarray, limit: np.ndarray | None) -> str:
    """The largest ratio of λ_max to ``limit`` over the measured epochs, mean over seeds."""
    if limit is None:
        return "—"
    return f"{float(np.mean(np.max(values / limit, axis=1))):.3f}"


def tracking_rows(setting: Setting) -> list[list[str]]:
    """One row per arm that tracked λ_max during training: the measured value at the last
    measured epoch beside the stability threshold and SAM's predicted edge there, and how close
    λ_max came to each over training."""
    rows = []
    for curve in tracked_sharpness(setting):
        threshold = (
            "—" if curve.threshold is None else f"{float(curve.threshold[:, -1].mean()):.4g}"
        )
        edge = "—" if curve.sam_edge is None else _number_interval(curve.last(curve.sam_edge))
        rows.append(
            [
                curve.arm.label,
                str(len(curve.seeds)),
                str(int(curve.epochs[-1])),
                _number_interval(curve.last(curve.values)),
                threshold,
                edge,
                _peak_ratio(curve.values, curve.threshold),
                _peak_ratio(curve.values, curve.sam_edge),
            ]
        )
    return rows
