"""Tables and plots from the experiment database.

Finished and failed runs are grouped by *setting* (everything in the configuration except the
method, its hyperparameters and the seed: dataset, model, label noise, training budget, base
optimizer...) and, inside a setting, by *arm* (a method with one set of hyperparameters). For
each arm the report gives the final test accuracy over its finished seeds (mean ± sample
standard deviation, Student-t 95% interval clipped to [0, 100] %), the paired difference to the
base optimizer and to SAM over the seeds both finished (same seed = same initialisation, data
subset, label noise and batch order), and the cost relative to the base optimizer: measured
forward/backward passes and training wall time. Failed runs are counted in their arm's row (an
arm whose runs all failed still has one) and diverged runs are flagged there. A setting's title
names every training field that differs between the settings of the report.

Plots per setting: mean test-accuracy curves (± one std over seeds), the distribution of final
accuracies per arm, and, for every hyperparameter that takes several values within a method
(a ρ sweep), final accuracy against it. Each setting's plots go to its own directory (named by
its slug); writing that directory again first removes the PNG files (and the landscape JSON)
left there by an earlier report, so that no stale plot survives beside the new ones.

Where runs were measured with ``flatminima sharpness`` (the database's ``sharpness`` table), a
second table per setting puts their sharpness beside their test accuracy (mean ± std over the
measured seeds of the top Hessian eigenvalue, the Hessian trace and the worst-case sharpness),
followed by the Spearman rank correlation, over the setting's measured runs, between each
sharpness measure and test accuracy; plots add test accuracy against the top eigenvalue (one
point per run) and, where measured, the 1-D loss landscape of each arm's first seed.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.special import stdtr, stdtrit

from flatminima.experiments.files import write_atomically, write_text_atomically
from flatminima.experiments.store import RunRecord, SharpnessRecord, Store, settings_key
from flatminima.registry import BASE_OPTIMIZER, METHODS, method_names

REFERENCE_METHOD = "sam"
"""The second reference of the paired comparison: plain SAM."""

ARM_KEYS = ("method", "hyperparameters", "seed")
"""Configuration keys that distinguish runs within one setting."""


ACCURACY_RANGE = (0.0, 1.0)
"""The values an accuracy (a fraction) can take: its confidence intervals are clipped to it."""


@dataclass(frozen=True)
class Interval:
    """A mean with its Student-t 95% confidence interval (``nan`` bounds for fewer than two
    samples, ``nan`` mean for none)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        array = np.asarray(values, dtype=float)
        if len(array) == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = float(array.mean())
        if len(array) < 2:
            return cls(mean, math.nan, math.nan, len(array))
        # stdtrit is Student's t quantile function (scipy.special: far lighter than scipy.stats).
        quantile = float(stdtrit(len(array) - 1, 0.975))
        half_width = quantile * float(array.std(ddof=1)) / math.sqrt(len(array))
        return cls(mean, mean - half_width, mean + half_width, len(array))

    def clipped(self, lowest: float, highest: float) -> Interval:
        """The interval with its bounds kept within [lowest, highest], the values the quantity
        can take: with three seeds the t-interval of an accuracy near 100% reaches past it.
        ``nan`` bounds stay ``nan``."""
        return Interval(
            self.mean,
            float(np.clip(self.low, lowest, highest)),
            float(np.clip(self.high, lowest, highest)),
            self.n,
        )


@dataclass
class Arm:
    """One method with one set of hyperparameters, over the seeds it ran in a setting."""

    method: str
    hyperparameters: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    """The finished runs, by seed: the statistics are theirs."""
    failed: list[RunRecord] = field(default_factory=list)
    """The failed runs, by seed: counted and listed, never in the statistics."""
    label: str = ""
    """The method and the hyperparameters that tell it apart from the method's other arms."""
    curves: dict[int, list[float]] = field(default_factory=dict)
    """Test accuracy per epoch, by seed."""
    versus_base: Interval | None = None
    versus_reference: Interval | None = None
    passes_ratio: float = math.nan
    time_ratio: float = math.nan
    sharpness: dict[int, SharpnessRecord] = field(default_factory=dict)
    """The sharpness measured from the final weights with one measurement's settings, by seed
    (only the measured seeds); see :func:`measurement_views`."""
    measurements: dict[str, dict[int, SharpnessRecord]] = field(default_factory=dict)
    """Every sharpness row of the arm, by measurement settings (``settings_key``), then seed."""

    @property
    def settings(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.hyperparameters.items())

    @property
    def final_accuracy(self) -> dict[int, float]:
        """Final test accuracy by seed."""
        return {run.config["seed"]: run.final["final_test_accuracy"] for run in self.runs}

    @property
    def accuracy(self) -> Interval:
        """Mean final test accuracy and its 95% interval, clipped to ``ACCURACY_RANGE``."""
        return Interval.of(list(self.final_accuracy.values())).clipped(*ACCURACY_RANGE)

    @property
    def std(self) -> float:
        values = list(self.final_accuracy.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    @property
    def attempted(self) -> int:
        """How many seeds were tried (finished or failed; running ones are not counted)."""
        return len(self.runs) + len(self.failed)

    @property
    def diverged(self) -> dict[int, int | None]:
        """The epoch at which each diverged finished run stopped, by seed (``None`` where a
        database older than that record only shows a non-finite final loss: such a run trained
        every epoch). A diverged run is finished: its accuracy is that of its last (non-finite)
        weights and counts in the mean."""
        return {
            run.config["seed"]: run.final.get("diverged_at_epoch")
            for run in self.runs
            if run.diverged
        }

    @property
    def completed(self) -> list[RunRecord]:
        """The finished runs that trained every epoch (did not diverge)."""
        diverged = self.diverged
        return [run for run in self.runs if run.config["seed"] not in diverged]

    def mean_cost(self, column: str) -> float:
        """Mean of a cost (``passes``, ``train_time_s``) over the runs that trained every epoch:
        a diverged run stopped early, so its cost is not that of the full budget."""
        completed = self.completed
        return float(np.mean([run.final[column] for run in completed])) if completed else math.nan

    def sharpness_of(self, metric: str) -> dict[int, float]:
        """One sharpness measure (a key of ``measure_sharpness``'s result) by measured seed."""
        return {seed: row.metrics[metric] for seed, row in self.sharpness.items()}


@dataclass
class Setting:
    """Runs that differ only in method, hyperparameters and seed."""

    config: dict[str, Any]
    arms: list[Arm]
    slug: str
    distinguishing: tuple[str, ...] = ()
    """Training fields not in the headline whose values differ between the settings of the
    report: the subtitle names them, so that no two settings read the same."""
    sharpness_settings: dict[str, Any] | None = None
    """The measurement settings of the arms' ``sharpness`` rows (one measurement's)."""

    @property
    def headline(self) -> str:
        c = self.config
        # Label noise with every digit it has (not rounded to a whole percent), so that two
        # noise levels never print the same.
        return (
            f"{c['dataset']} · {c['model']} · {100 * c['label_noise']:g}% label noise · "
            f"{c['train_size']} training examples · {c['epochs']} epochs"
        )

    @property
    def subtitle(self) -> str:
        """The distinguishing fields and their values here, e.g. ``lr 0.1 · momentum 0.9``."""
        return " · ".join(
            _describe_field(name, self.config.get(name)) for name in self.distinguishing
        )

    @property
    def title(self) -> str:
        """One line: the headline, then the subtitle where there is one."""
        return " · ".join(part for part in (self.headline, self.subtitle) if part)

    @property
    def plot_title(self) -> str:
        """The title on two lines (the subtitle under the headline), to fit a figure."""
        return "\n".join(part for part in (self.headline, self.subtitle) if part)

    @property
    def training(self) -> str:
        c = self.config
        momentum = f", momentum {c['momentum']}" if c.get("momentum") is not None else ""
        return (
            f"base optimizer {c['optimizer']} (lr {c['lr']}{momentum}, weight decay "
            f"{c['weight_decay']}, {c['schedule']} schedule), batch size {c['batch_size']}"
        )

    def arms_of(self, method: str) -> list[Arm]:
        return [arm for arm in self.arms if arm.method == method]

    @property
    def finished_arms(self) -> list[Arm]:
        """The arms with at least one finished run (those that have numbers to plot)."""
        return [arm for arm in self.arms if arm.runs]

    @property
    def measured(self) -> bool:
        """Whether any run of the setting has a sharpness row."""
        return any(arm.sharpness for arm in self.arms)


def _paired(arm: Arm, other: Arm) -> Interval | None:
    """Mean and 95% interval of ``arm − other`` over the seeds both ran."""
    mine, theirs = arm.final_accuracy, other.final_accuracy
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    return Interval.of([mine[seed] - theirs[seed] for seed in common])


def _matching_reference(arm: Arm, references: list[Arm]) -> Arm | None:
    """The SAM arm to pair ``arm`` with: the one agreeing on every hyperparameter both take
    (the same ρ in a ρ sweep), else the only SAM arm, else none."""
    if len(references) == 1:
        return references[0]
    agreeing = [
        reference
        for reference in references
        if all(
            reference.hyperparameters[name] == value
            for name, value in arm.hyperparameters.items()
            if name in reference.hyperparameters
        )
    ]
    return agreeing[0] if len(agreeing) == 1 else None


def _in_registry_order(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The stored hyperparameters (sorted by name in JSON) in the order the method declares."""
    declared = list(METHODS[method].hyperparameters) if method in METHODS else []
    return dict(
        sorted(
            hyperparameters.items(),
            key=lambda item: declared.index(item[0]) if item[0] in declared else len(declared),
        )
    )


def _numeric_first(arm: Arm) -> list[tuple[int, float, str]]:
    """A sort key that puts ρ = 0.05 before 0.1 before 1.0 (not in text order)."""
    return [
        (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))
        for value in arm.hyperparameters.values()
    ]


def _label(arms: list[Arm]) -> None:
    """Name each arm by its method and the hyperparameters that vary among that method's arms."""
    by_method: dict[str, list[Arm]] = defaultdict(list)
    for arm in arms:
        by_method[arm.method].append(arm)
    for siblings in by_method.values():
        varying = [
            name
            for name in siblings[0].hyperparameters
            if len({json.dumps(arm.hyperparameters.get(name)) for arm in siblings}) > 1
        ]
        for arm in siblings:
            shown = " ".join(f"{name}={arm.hyperparameters.get(name)}" for name in varying)
            arm.label = f"{arm.method} {shown}" if shown else arm.method


HEADLINE_FIELDS = ("dataset", "model", "label_noise", "train_size", "epochs")
"""Setting fields every title shows."""

SUBTITLE_ORDER = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "batch_size")
"""The order of the other training fields in a subtitle (fields not listed come after these,
by name)."""


def _describe_field(name: str, value: Any) -> str:
    """A training field and its value in words, as the subtitle shows it."""
    if name == "optimizer":
        return f"base optimizer {value}"
    if name == "momentum" and value is None:
        return "no momentum"
    if name == "schedule":
        return f"{value} schedule"
    return f"{name.replace('_', ' ')} {value}"


def _distinguishing_fields(configs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The fields outside the headline that take more than one value among ``configs``."""
    names = {name for config in configs for name in config} - set(HEADLINE_FIELDS)
    varying = {
        name
        for name in names
        if len({json.dumps(c.get(name), sort_keys=True) for c in configs}) > 1
    }
    order = {name: index for index, name in enumerate(SUBTITLE_ORDER)}
    return tuple(sorted(varying, key=lambda name: (order.get(name, len(order)), name)))


def _slug(config: dict[str, Any], index: int) -> str:
    text = f"{index + 1}-{config['dataset']}-{config['model']}-noise{config['label_noise']:g}"
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text)


def summarize(store: Store) -> list[Setting]:
    """Every setting with its arms, statistics and costs, from the finished runs; the failed
    runs are counted in their arms (a setting or an arm whose runs all failed is kept, so the
    report shows that it was tried). Running runs are left out."""
    grouped: dict[str, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    setting_configs: dict[str, dict[str, Any]] = {}
    sharpness: dict[str, dict[str, SharpnessRecord]] = defaultdict(dict)
    for record in store.sharpness_records():
        sharpness[record.config_hash][settings_key(record.settings)] = record
    for run in store.runs():
        if run.status not in ("finished", "failed"):
            continue
        setting = {k: v for k, v in run.config.items() if k not in ARM_KEYS}
        setting_key = json.dumps(setting, sort_keys=True)
        arm_key = json.dumps([run.config["method"], run.config["hyperparameters"]])
        grouped[setting_key][arm_key].append(run)
        setting_configs[setting_key] = setting
    order = {name: index for index, name in enumerate(method_names())}
    settings = []
    for index, setting_key in enumerate(sorted(grouped)):
        arms = []
        for arm_key, runs in grouped[setting_key].items():
            method, hyperparameters = json.loads(arm_key)
            by_seed = sorted(runs, key=lambda r: r.config["seed"])
            arm = Arm(
                method,
                _in_registry_order(method, hyperparameters),
                runs=[run for run in by_seed if run.status == "finished"],
                failed=[run for run in by_seed if run.status == "failed"],
            )
            arm.curves = {
                run.config["seed"]: [row["test_accuracy"] for row in store.epochs(run.id)]
                for run in arm.runs
            }
            for run in arm.runs:
                for key, record in sharpness[run.config_hash].items():
                    arm.measurements.setdefault(key, {})[run.config["seed"]] = record
            arms.append(arm)
        kinds = {key for arm in arms for key in arm.measurements}
        if len(kinds) == 1:  # one measurement: the arms carry it (see measurement_views)
            [key] = kinds
            for arm in arms:
                arm.sharpness = arm.measurements.get(key, {})
        _label(arms)
        arms.sort(key=lambda a: (order.get(a.method, len(order)), a.method, _numeric_first(a)))
        setting = Setting(
            setting_configs[setting_key],
            arms,
            _slug(setting_configs[setting_key], index),
            sharpness_settings=json.loads(kinds.pop()) if len(kinds) == 1 else None,
        )
        _compare(setting)
        settings.append(setting)
    distinguishing = _distinguishing_fields([setting.config for setting in settings])
    for setting in settings:
        setting.distinguishing = distinguishing
    return settings


def measurement_views(setting: Setting) -> list[Setting]:
    """The setting once per sharpness measurement settings its runs were measured with, each
    view's arms carrying that measurement's rows only: measurements with different settings
    (another ρ, other examples) are never averaged or ranked together. ``[setting]`` itself
    when they all share one; ``[]`` when none was measured. Several views write their plots
    into ``<slug>/sharpness-<i>``."""
    kinds = sorted({key for arm in setting.arms for key in arm.measurements})
    if len(kinds) <= 1:
        return [setting] if setting.measured else []
    return [
        replace(
            setting,
            arms=[replace(arm, sharpness=arm.measurements.get(key, {})) for arm in setting.arms],
            slug=f"{setting.slug}/sharpness-{index + 1}",
            sharpness_settings=json.loads(key),
        )
        for index, key in enumerate(kinds)
    ]


def _measurement_differences(views: list[Setting]) -> dict[str, str]:
    """For each view of several, the measurement settings that tell it from the others."""
    if len(views) < 2:
        return {}
    settings = [view.sharpness_settings or {} for view in views]
    names = sorted({name for values in settings for name in values})
    varying = [name for name in names if len({json.dumps(s.get(name)) for s in settings}) > 1]
    return {
        view.slug: ", ".join(f"{name}={values.get(name)}" for name in varying)
        for view, values in zip(views, settings, strict=True)
    }


def _compare(setting: Setting) -> None:
    """Fill in each arm's paired differences and cost ratios (costs over the runs of both arms
    that trained every epoch; ``nan`` where either has none)."""
    bases = [arm for arm in setting.arms_of(BASE_OPTIMIZER) if arm.runs]
    base = bases[0] if bases else None
    references = [arm for arm in setting.arms_of(REFERENCE_METHOD) if arm.runs]
    for arm in setting.arms:
        if base is not None:
            arm.passes_ratio = arm.mean_cost("passes") / base.mean_cost("passes")
            arm.time_ratio = arm.mean_cost("train_time_s") / base.mean_cost("train_time_s")
            if arm is not base:
                arm.versus_base = _paired(arm, base)
        if arm.method != REFERENCE_METHOD:
            reference = _matching_reference(arm, references)
            if reference is not None:
                arm.versus_reference = _paired(arm, reference)


# --- tables ----------------------------------------------------------------------------------

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

SHARPNESS_CORRELATED = (
    ("hessian_top_eigenvalue", "top Hessian eigenvalue λ_max"),
    ("hessian_trace", "Hessian trace tr(H)"),
    ("worst_case_sharpness", "worst-case sharpness"),
    ("average_sharpness", "average-case sharpness"),
    ("adaptive_worst_case_sharpness", "adaptive worst-case sharpness"),
    ("adaptive_average_sharpness", "adaptive average-case sharpness"),
)
"""Every scalar sharpness measure, each rank-correlated with test accuracy."""


def _mean_and_std(values: Sequence[float]) -> str:
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
            _mean_and_std([arm.sharpness[seed].metrics[key] for seed in seeds])
            for key, _ in SHARPNESS_SHOWN
        ]
        rows.append([arm.label, str(len(seeds)), accuracy, *measures])
    return rows


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (as Spearman's ρ needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and values[order[stop]] == values[order[start]]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 … stop
        start = stop
    return ranks


EXACT_SPEARMAN_UP_TO = 8
"""Up to this many pairs the p-value is exact, over all n! pairings (40,320 at n = 8): the
Student-t approximation is poor for few runs (it gives p = 0 to a perfect ranking of 4 runs,
whose exact p is 2/24)."""


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` and its two-sided p-value: exact (the
    share of all pairings of x with y whose |ρ| is at least the observed one) up to
    ``EXACT_SPEARMAN_UP_TO`` pairs, beyond that the Student-t approximation with n − 2 degrees
    of freedom, as ``scipy.stats.spearmanr``. NaN when it is undefined (fewer than three
    pairs, or a constant sequence)."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return math.nan, math.nan
    rx, ry = _average_ranks(np.asarray(x, dtype=float)), _average_ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denominator == 0:
        return math.nan, math.nan
    coefficient = float(rx @ ry) / denominator
    if len(x) <= EXACT_SPEARMAN_UP_TO:
        pairings = np.array(list(itertools.permutations(range(len(x)))))
        null = (ry[pairings] @ rx) / denominator
        # A small tolerance: the observed pairing must count itself despite rounding.
        return coefficient, float(np.mean(np.abs(null) >= abs(coefficient) - 1e-12))
    if abs(coefficient) >= 1.0:
        return coefficient, 0.0
    t = coefficient * math.sqrt((len(x) - 2) / (1 - coefficient**2))
    return coefficient, float(2 * stdtr(len(x) - 2, -abs(t)))


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's ρ between one sharpness measure and final test accuracy over runs."""

    metric: str
    name: str
    coefficient: float
    p_value: float
    n: int


def sharpness_correlations(setting: Setting) -> list[RankCorrelation]:
    """For every sharpness measure, its rank correlation with test accuracy over the measured
    runs of the setting, every arm and seed pooled (runs where the measure is not finite are
    left out)."""
    correlations = []
    for key, name in SHARPNESS_CORRELATED:
        pairs = [
            (row.metrics[key], arm.final_accuracy[seed])
            for arm in setting.arms
            for seed, row in sorted(arm.sharpness.items())
            if key in row.metrics and math.isfinite(row.metrics[key])
        ]
        measure = [pair[0] for pair in pairs]
        accuracy = [pair[1] for pair in pairs]
        coefficient, p_value = spearman(measure, accuracy)
        correlations.append(RankCorrelation(key, name, coefficient, p_value, len(pairs)))
    return correlations


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


# --- plots -----------------------------------------------------------------------------------


def plot_curves(setting: Setting, path: Path) -> None:
    """Mean ± std test accuracy per epoch over the seeds that trained every epoch; each
    diverged seed dotted on its own, up to the epoch it stopped at (marked ×), in its arm's
    colour, rather than cutting the arm's other curves short."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for arm in setting.finished_arms:
        diverged = arm.diverged
        full = [curve for seed, curve in arm.curves.items() if seed not in diverged]
        label = f"{arm.label}, n={len(full)}"
        if diverged:
            label += f" (+{len(diverged)} diverged, dotted)"
        color = None
        if full:
            length = min(len(curve) for curve in full)
            curves = 100 * np.array([curve[:length] for curve in full], dtype=float)
            epochs = np.arange(1, length + 1)
            mean = curves.mean(axis=0)
            (line,) = axes.plot(epochs, mean, label=label)
            color = line.get_color()
            if len(curves) > 1:
                spread = curves.std(axis=0, ddof=1)
                axes.fill_between(epochs, mean - spread, mean + spread, color=color, alpha=0.2)
        for seed in diverged:
            curve = 100 * np.array(arm.curves[seed], dtype=float)
            (line,) = axes.plot(
                np.arange(1, len(curve) + 1),
                curve,
                linestyle=":",
                marker="x",
                markevery=[len(curve) - 1],
                color=color,
                label=None if color is not None else label,  # one legend entry per arm
            )
            color = line.get_color()
    axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=setting.plot_title)
    _finish_and_save(figure, axes, path)


def plot_final_distribution(setting: Setting, path: Path) -> None:
    """A box per arm over its finished seeds, each seed a point (× for a diverged one)."""
    arms = setting.finished_arms
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(arms)), 5))
    values = [100 * np.array(list(arm.final_accuracy.values())) for arm in arms]
    positions = np.arange(1, len(values) + 1)
    axes.boxplot(values, positions=positions, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed, so the same database draws the same figure
    for index, (position, points, arm) in enumerate(zip(positions, values, arms, strict=True)):
        offsets = jitter.uniform(-0.12, 0.12, size=len(points))
        diverged = np.array([seed in arm.diverged for seed in arm.final_accuracy])
        color = f"C{index % 10}"  # the arm's colour from the default cycle, for both markers
        axes.scatter(
            position + offsets[~diverged], points[~diverged], s=18, alpha=0.8, color=color, zorder=3
        )
        if diverged.any():
            axes.scatter(
                position + offsets[diverged],
                points[diverged],
                s=30,
                marker="x",
                color=color,
                zorder=3,
            )
    axes.set_xticks(positions, [arm.label for arm in arms], rotation=30, ha="right", fontsize=7)
    title = setting.plot_title
    if any(arm.diverged for arm in arms):
        title += "  (× diverged run)"
    axes.set(ylabel="final test accuracy (%)", title=title)
    _finish_and_save(figure, axes, path, legend=False, grid_axis="y")


def swept_hyperparameters(setting: Setting) -> dict[str, dict[str, list[Arm]]]:
    """For each hyperparameter that takes several numeric values within one method while its
    other hyperparameters stay fixed: line label → the arms of that line, sorted by value."""
    sweeps: dict[str, dict[str, list[Arm]]] = defaultdict(dict)
    names = {name for arm in setting.arms for name in arm.hyperparameters}
    for name in sorted(names):
        lines: dict[str, list[Arm]] = defaultdict(list)
        for arm in setting.finished_arms:
            value = arm.hyperparameters.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            others = {k: v for k, v in arm.hyperparameters.items() if k != name}
            line = arm.method + "".join(f", {k}={v}" for k, v in others.items())
            lines[line].append(arm)
        for line, arms in lines.items():
            if len(arms) > 1:
                sweeps[name][line] = sorted(arms, key=lambda a: a.hyperparameters[name])
    return dict(sweeps)


def _error_bars(intervals: Sequence[Interval]) -> np.ndarray:
    """``yerr`` for ``errorbar`` in percent: the distance from each mean down to its low bound
    and up to its high bound (apart, since clipping makes them unequal); 0 without bounds."""
    return np.array(
        [
            [
                0.0 if interval.n < 2 else 100 * (interval.mean - interval.low)
                for interval in intervals
            ],
            [
                0.0 if interval.n < 2 else 100 * (interval.high - interval.mean)
                for interval in intervals
            ],
        ]
    )


def plot_sweep(setting: Setting, name: str, lines: dict[str, list[Arm]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    all_values = []
    for line, arms in lines.items():
        values = [arm.hyperparameters[name] for arm in arms]
        all_values += values
        intervals = [arm.accuracy for arm in arms]  # clipped to [0, 100] %
        means = np.array([100 * interval.mean for interval in intervals])
        axes.errorbar(values, means, yerr=_error_bars(intervals), marker="o", capsize=3, label=line)
    for base in setting.arms_of(BASE_OPTIMIZER):
        if not base.runs:
            continue
        axes.axhline(
            100 * base.accuracy.mean,
            color="black",
            linestyle="--",
            label=f"{BASE_OPTIMIZER} (mean)",
        )
    if min(all_values) > 0:
        axes.set_xscale("log")
    axes.set(
        xlabel=name, ylabel="final test accuracy (%, mean and 95% CI)", title=setting.plot_title
    )
    _finish_and_save(figure, axes, path)


def plot_accuracy_vs_sharpness(
    setting: Setting, path: Path, metric: str = "hessian_top_eigenvalue"
) -> None:
    """Final test accuracy against one sharpness measure: a point per measured run, a colour
    per arm."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for arm in setting.arms:
        seeds = sorted(arm.sharpness)
        if not seeds:
            continue
        measure = [arm.sharpness[seed].metrics[metric] for seed in seeds]
        accuracy = [100 * arm.final_accuracy[seed] for seed in seeds]
        axes.scatter(measure, accuracy, s=30, alpha=0.85, label=f"{arm.label}, n={len(seeds)}")
    name = dict(SHARPNESS_CORRELATED)[metric]
    correlation = next(c for c in sharpness_correlations(setting) if c.metric == metric)
    summary = (
        ""
        if math.isnan(correlation.coefficient)
        else f"\nSpearman ρ_s = {correlation.coefficient:+.2f} over {correlation.n} runs"
    )
    axes.set(
        xlabel=f"{name} (training loss, final weights)",
        ylabel="final test accuracy (%)",
        title=setting.plot_title + summary,
    )
    _finish_and_save(figure, axes, path)


def first_seed_landscapes(setting: Setting) -> dict[str, dict[str, Any]]:
    """Each arm's 1-D landscape from its lowest measured seed that has one, by arm label."""
    lines = {}
    for arm in setting.arms:
        seeds = sorted(seed for seed, row in arm.sharpness.items() if row.landscape)
        if seeds:
            lines[arm.label] = {"seed": seeds[0], **arm.sharpness[seeds[0]].landscape}
    return lines


LANDSCAPE_NUMBERS = "landscape_1d.json"
"""The one non-PNG file the report writes into a setting's directory (beside its plot)."""


def write_landscape(setting: Setting, directory: Path) -> list[Path]:
    """The setting's landscapes as one PNG (a curve per arm) and their numbers as JSON beside
    it; nothing when no run of the setting has a landscape."""
    from flatminima.sharpness import Landscape1D, plot_landscape_1d

    lines = first_seed_landscapes(setting)
    if not lines:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    curves = {
        f"{label} (seed {line['seed']})": Landscape1D(
            torch.tensor(line["alphas"], dtype=torch.float64),
            torch.tensor(line["losses"], dtype=torch.float64),
            line["axis_label"],
        )
        for label, line in lines.items()
    }
    png, numbers = directory / "landscape_1d.png", directory / LANDSCAPE_NUMBERS
    examples = sorted({line["examples"] for line in lines.values()})
    write_atomically(
        png,
        lambda path: plot_landscape_1d(
            curves,
            path,
            title=f"training loss on {', '.join(map(str, examples))} examples, final weights",
        ),
    )
    write_text_atomically(numbers, json.dumps(lines, indent=1) + "\n")
    return [png, numbers]


def remove_earlier_plots(directory: Path) -> list[Path]:
    """Delete the files an earlier report wrote into a setting's directory, before it is
    written again: every ``*.png`` directly in it and the landscape numbers. Without this a
    plot the new report no longer draws (a sweep since removed, a setting now at another
    place in the order) would stay, and the landscape JSON would still be linked. Nothing
    else is touched: other files, subdirectories, and everything outside the directory stay."""
    if not directory.is_dir():
        return []
    owned = [*directory.glob("*.png"), directory / LANDSCAPE_NUMBERS]
    for view in directory.glob("sharpness-*"):  # the views of measurement_views
        owned += [*view.glob("*.png"), view / LANDSCAPE_NUMBERS]
    removed = [path for path in owned if path.is_file()]
    for path in removed:
        path.unlink()
    return removed


def write_plots(setting: Setting, directory: Path) -> list[Path]:
    """The setting's plots, in ``directory`` after clearing the earlier ones out of it
    (:func:`remove_earlier_plots`); none for a setting whose runs all failed."""
    remove_earlier_plots(directory)
    if not setting.finished_arms:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "test_accuracy_curves.png", directory / "final_accuracy.png"]
    plot_curves(setting, paths[0])
    plot_final_distribution(setting, paths[1])
    for name, lines in swept_hyperparameters(setting).items():
        path = directory / f"accuracy_vs_{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png"
        plot_sweep(setting, name, lines, path)
        paths.append(path)
    if setting.measured:
        paths += write_sharpness_plots(setting, directory)
    return paths


def write_sharpness_plots(setting: Setting, directory: Path) -> list[Path]:
    """Accuracy against λ_max and the landscapes of one measurement (a view of
    :func:`measurement_views`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "accuracy_vs_top_eigenvalue.png"
    plot_accuracy_vs_sharpness(setting, path)
    return [path, *(path for path in write_landscape(setting, directory) if path.suffix == ".png")]


# --- the report ------------------------------------------------------------------------------

NOTES = f"""\
Final test accuracy is the last epoch's, on the clean test set. The 95% CI is Student-t over
seeds, clipped to [0, 100] % (with few seeds the interval can reach past what an accuracy can
be). Δ columns are paired over the seeds both arms finished (same initialisation, data subset,
label noise and batch order), in percentage points; Δ vs {REFERENCE_METHOD} pairs with the
{REFERENCE_METHOD} arm that has the same ρ when several were run. "passes ×" is the measured
number of forward/backward passes relative to {BASE_OPTIMIZER}; "time ×" the training wall time
(evaluation excluded) relative to {BASE_OPTIMIZER}: with several worker processes on a busy
machine it is noisier than the pass count. "seeds" counts the finished runs in the statistics,
"2 of 3" when a run failed; a failed run is in no statistic, and an arm whose runs all failed
keeps a row that says so. A diverged run (its weights became non-finite and training stopped
at that epoch) is finished: its final test accuracy, that of the model when it stopped, counts
in the mean, the CI and the Δ columns, and its note gives the epoch. Its passes and time cover
fewer epochs than the budget, so the cost ratios leave out diverged runs, of the arm and of
{BASE_OPTIMIZER} alike."""

SHARPNESS_NOTES = """\
Sharpness (`flatminima sharpness`) is measured from each run's final weights on its own training
examples with the labels it was trained on (noisy ones included), in eval mode: λ_max is the
largest Hessian eigenvalue of the training loss (Lanczos), tr(H) its trace (Hutchinson, the
probes' standard error is in the database), worst-case sharpness the mean over batches of
max over ‖ε‖₂ ≤ ρ of L(w + ε) − L(w) (projected ascent); all are in the database's `sharpness`
table with the settings used. The Spearman coefficient ranks every measured run of the setting
together, whatever its method or seed: negative means the sharper runs had the lower test
accuracy. Its p-value (exact over all pairings up to 8 runs, Student-t beyond) is per
measure and not corrected for testing six of them; with a handful of runs, and methods that
differ in more than flatness, it describes these runs, it does not show that flatness causes
accuracy. The landscape is the
training loss along one random filter-normalised direction (Li et al., 2018) through each
arm's first measured seed, the same random draw for every arm."""


@dataclass
class Report:
    settings: list[Setting]
    markdown_path: Path
    plots: list[Path]
    text: str
    """The tables as plain text, for the terminal."""
    unfinished: dict[str, int]
    """Runs in the database that are not finished, by status."""


def _sharpness_section(setting: Setting, out_dir: Path) -> tuple[list[str], list[str]]:
    """The setting's sharpness table and rank correlations, as markdown and as text lines."""
    headers, rows = sharpness_headers(setting), sharpness_rows(setting)
    correlations = correlation_rows(setting)
    correlation_title = (
        "Spearman rank correlation with final test accuracy, over the setting's measured runs "
        "(all methods and seeds pooled):"
    )
    markdown = [
        "### Sharpness beside test accuracy",
        "",
        measured_on(setting),
        "",
        markdown_table(headers, rows),
        "",
        correlation_title,
        "",
        markdown_table(CORRELATION_HEADERS, correlations),
        "",
    ]
    numbers = out_dir / setting.slug / LANDSCAPE_NUMBERS
    if numbers.exists():
        markdown += [f"Landscape numbers: [{numbers.name}]({numbers.relative_to(out_dir)}).", ""]
    text = [
        "sharpness beside test accuracy: " + measured_on(setting),
        "",
        text_table(headers, rows),
        "",
        correlation_title,
        text_table(CORRELATION_HEADERS, correlations),
        "",
    ]
    return markdown, text


def write_report(db_path: str | Path, out_dir: str | Path) -> Report:
    """Summarise ``db_path`` into ``out_dir/report.md`` and its plots."""
    db_path, out_dir = Path(db_path), Path(out_dir)
    with Store(db_path, create=False) as store:  # a missing file: FileNotFoundError
        settings = summarize(store)
        unfinished: dict[str, int] = defaultdict(int)
        for run in store.runs():
            if run.status != "finished":
                unfinished[run.status] += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = [
        "# flatminima report",
        "",
        f"Database `{db_path}`, {sum(len(a.runs) for s in settings for a in s.arms)} finished "
        f"runs, written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
    ]
    if unfinished:
        counts = ", ".join(f"{count} {status}" for status, count in sorted(unfinished.items()))
        where_failed = (
            " (failed runs are counted in their setting's table)" if "failed" in unfinished else ""
        )
        markdown.append(f"Not in the statistics: {counts}{where_failed}.")
    text = []
    plots: list[Path] = []
    for setting in settings:
        rows = table_rows(setting)
        setting_plots = write_plots(setting, out_dir / setting.slug)
        plots += setting_plots
        hyperparameters = [f"{arm.label}: {arm.settings}" for arm in setting.arms if arm.settings]
        markdown += ["", f"## {setting.title}", "", f"{setting.training}.", ""]
        markdown += [markdown_table(TABLE_HEADERS, rows), "", "Hyperparameters:", ""]
        markdown += [f"- {line}" for line in hyperparameters] + [""]
        text += [setting.title, setting.training, "", text_table(TABLE_HEADERS, rows), ""]
        text += ["hyperparameters:", *(f"  {line}" for line in hyperparameters), ""]
        if len(setting.arms_of(REFERENCE_METHOD)) > 1:
            # Several SAM arms (a ρ sweep): say which one each Δ is against, here and not
            # only in the notes at the end of the markdown.
            pairing = (
                f"Δ vs {REFERENCE_METHOD}: against the {REFERENCE_METHOD} arm with the same "
                f"values of the hyperparameters both take (the same ρ); — where none matches."
            )
            markdown += [pairing, ""]
            text += [pairing, ""]
        failures = failure_lines(setting)
        if failures:
            markdown += ["Failed runs (in no statistic):", ""]
            markdown += [f"- {line}" for line in failures] + [""]
            text += ["failed runs:", *(f"  {line}" for line in failures), ""]
        views = measurement_views(setting)
        differences = _measurement_differences(views)
        for view in views:
            if view is not setting:
                view_plots = write_sharpness_plots(view, out_dir / view.slug)
                setting_plots += view_plots
                plots += view_plots
            markdown_part, text_part = _sharpness_section(view, out_dir)
            if view.slug in differences:
                heading = f"measured with {differences[view.slug]}"
                markdown_part[0] += f" ({heading})"
                text_part[0] = text_part[0].replace(
                    "sharpness beside test accuracy", f"sharpness ({heading}) beside test accuracy"
                )
            markdown += markdown_part
            text += text_part
        markdown += [f"![{path.stem}]({path.relative_to(out_dir)})" for path in setting_plots]
    if not settings:
        markdown += ["", "No finished or failed runs yet."]
        text.append("No finished or failed runs yet.")
    markdown += ["", NOTES.replace("\n", " "), ""]
    if any(setting.measured for setting in settings):
        markdown += [SHARPNESS_NOTES.replace("\n", " "), ""]
    markdown_path = out_dir / "report.md"
    write_text_atomically(markdown_path, "\n".join(markdown))
    return Report(settings, markdown_path, plots, "\n".join(text).rstrip(), dict(unfinished))


def _finish_and_save(
    figure: Any, axes: Any, path: Path, *, legend: bool = True, grid_axis: str = "both"
) -> None:
    """The report's common figure style (small title, light grid, legend), written as PNG."""
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3, axis=grid_axis)
    if legend:
        axes.legend(fontsize=7)
    figure.tight_layout()
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110))
    finally:
        plt.close(figure)
