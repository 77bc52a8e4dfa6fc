"""What a report says, as data: the database's runs grouped into settings and arms, with their
statistics, costs, sharpness and landscapes. No tables, no plots, no matplotlib: the tables,
the plots and ``flatminima sharpness`` all read this model.

Finished and failed runs are grouped by *setting* (everything in the configuration except the
method, its hyperparameters and the seed: dataset, model, label noise, training budget, base
optimizer...) and, inside a setting, by *arm* (a method with one set of hyperparameters). For
each arm: the final test accuracy over its finished seeds (mean, sample standard deviation,
Student-t 95% interval clipped to [0, 100] %), the paired difference to the base optimizer and
to SAM over the seeds both finished (same seed = same initialisation, data subset, label noise
and batch order), and the cost relative to the base optimizer (measured forward/backward
passes and training wall time, over the runs that trained every epoch). Runs stored under the
baseline's old name ``sgd`` are read as ``base``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flatminima.experiments.labels import arm_labels
from flatminima.experiments.statistics import Interval, paired_difference, sample_std, spearman
from flatminima.experiments.store import RunRecord, SharpnessRecord, Store, settings_key
from flatminima.registry import BASE_OPTIMIZER, METHODS, canonical_method_name, method_names

REFERENCE_METHOD = "sam"
"""The second reference of the paired comparison: plain SAM."""

ARM_KEYS = ("method", "hyperparameters", "seed")
"""Configuration keys that distinguish runs within one setting."""

ACCURACY_RANGE = (0.0, 1.0)
"""The values an accuracy (a fraction) can take: its confidence intervals are clipped to it."""

CURVE_COLUMNS = ("test_accuracy", "train_loss")
"""The per-epoch columns of the database the report draws."""


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
    """The method and its telling hyperparameters (:func:`~flatminima.experiments.labels.
    arm_labels`), e.g. ``sam ρ=0.1``."""
    epochs: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """Per seed, each of ``CURVE_COLUMNS`` per epoch."""
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
    def curves(self) -> dict[int, list[float]]:
        """Test accuracy per epoch, by seed."""
        return {seed: columns["test_accuracy"] for seed, columns in self.epochs.items()}

    def final(self, column: str) -> dict[int, float]:
        """A final metric (a key of ``RunRecord.final``) by seed of the finished runs."""
        return {run.config["seed"]: run.final[column] for run in self.runs}

    @property
    def final_accuracy(self) -> dict[int, float]:
        """Final test accuracy by seed."""
        return self.final("final_test_accuracy")

    @property
    def accuracy(self) -> Interval:
        """Mean final test accuracy and its 95% interval, clipped to ``ACCURACY_RANGE``."""
        return Interval.of(list(self.final_accuracy.values())).clipped(*ACCURACY_RANGE)

    @property
    def std(self) -> float:
        return sample_std(list(self.final_accuracy.values()))

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
            + (f" over {c['processes']} processes" if c.get("processes", 1) > 1 else "")
        )

    def arms_of(self, method: str) -> list[Arm]:
        return [arm for arm in self.arms if arm.method == method]

    @property
    def base(self) -> Arm | None:
        """The base optimizer's arm with finished runs, if the setting has one."""
        bases = [arm for arm in self.arms_of(BASE_OPTIMIZER) if arm.runs]
        return bases[0] if bases else None

    @property
    def finished_arms(self) -> list[Arm]:
        """The arms with at least one finished run (those that have numbers to plot)."""
        return [arm for arm in self.arms if arm.runs]

    @property
    def measured(self) -> bool:
        """Whether any run of the setting has a sharpness row."""
        return any(arm.sharpness for arm in self.arms)


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
    report shows that it was tried). Running and interrupted runs are left out (see
    :func:`unfinished_runs`)."""
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
        method = canonical_method_name(run.config["method"])
        arm_key = json.dumps([method, run.config["hyperparameters"]], sort_keys=True)
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
            for run in arm.runs:
                rows = store.epochs(run.id)
                arm.epochs[run.config["seed"]] = {
                    column: [_as_float(row[column]) for row in rows] for column in CURVE_COLUMNS
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
        for arm, label in zip(
            arms, arm_labels([(arm.method, arm.hyperparameters) for arm in arms]), strict=True
        ):
            arm.label = label
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


def _as_float(value: float | None) -> float:
    # A non-finite number is stored as NULL (a diverged run's loss).
    return math.nan if value is None else float(value)


def unfinished_runs(store: Store) -> dict[str, int]:
    """Runs in no statistic, by state: ``failed`` (also counted in their arms' rows),
    ``running`` (its process is alive) and ``interrupted`` (left running by a process that is
    gone: the next ``compare`` redoes it)."""
    live = store.live_runs()
    counts: dict[str, int] = defaultdict(int)
    for run in store.runs():
        if run.status == "running":
            counts["running" if run.config_hash in live else "interrupted"] += 1
        elif run.status != "finished":
            counts[run.status] += 1
    return dict(counts)


def measurement_views(setting: Setting) -> list[Setting]:
    """The setting once per sharpness measurement settings its runs were measured with, each
    view's arms carrying that measurement's rows only: measurements with different settings
    (another ρ, other examples) are never averaged or ranked together. ``[setting]`` itself
    when they all share one; ``[]`` when none was measured. Several views write their figures
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


def measurement_differences(views: list[Setting]) -> dict[str, str]:
    """For each view of several (by slug), the measurement settings that tell it from the
    others, e.g. ``examples=32, rho=0.5``."""
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
    base = setting.base
    references = [arm for arm in setting.arms_of(REFERENCE_METHOD) if arm.runs]
    for arm in setting.arms:
        if base is not None:
            arm.passes_ratio = arm.mean_cost("passes") / base.mean_cost("passes")
            arm.time_ratio = arm.mean_cost("train_time_s") / base.mean_cost("train_time_s")
            if arm is not base:
                arm.versus_base = paired_difference(arm.final_accuracy, base.final_accuracy)
        if arm.method != REFERENCE_METHOD:
            reference = _matching_reference(arm, references)
            if reference is not None:
                arm.versus_reference = paired_difference(
                    arm.final_accuracy, reference.final_accuracy
                )


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


# --- sharpness beside accuracy ----------------------------------------------------------------

SHARPNESS_CORRELATED = (
    ("hessian_top_eigenvalue", "top Hessian eigenvalue λ_max"),
    ("hessian_trace", "Hessian trace tr(H)"),
    ("worst_case_sharpness", "worst-case sharpness"),
    ("average_sharpness", "average-case sharpness"),
    ("adaptive_worst_case_sharpness", "adaptive worst-case sharpness"),
    ("adaptive_average_sharpness", "adaptive average-case sharpness"),
)
"""Every scalar sharpness measure, each rank-correlated with test accuracy."""


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's ρ between one sharpness measure and final test accuracy over runs."""

    metric: str
    name: str
    coefficient: float
    p_value: float
    n: int


def measured_pairs(setting: Setting, metric: str) -> list[tuple[Arm, int, float, float]]:
    """``(arm, seed, measure, final test accuracy)`` for each measured run of the setting where
    the measure is finite."""
    return [
        (arm, seed, row.metrics[metric], arm.final_accuracy[seed])
        for arm in setting.arms
        for seed, row in sorted(arm.sharpness.items())
        if metric in row.metrics and math.isfinite(row.metrics[metric])
    ]


def sharpness_correlations(setting: Setting) -> list[RankCorrelation]:
    """For every sharpness measure, its rank correlation with test accuracy over the measured
    runs of the setting, every arm and seed pooled (runs where the measure is not finite are
    left out)."""
    correlations = []
    for key, name in SHARPNESS_CORRELATED:
        pairs = measured_pairs(setting, key)
        coefficient, p_value = spearman([p[2] for p in pairs], [p[3] for p in pairs])
        correlations.append(RankCorrelation(key, name, coefficient, p_value, len(pairs)))
    return correlations


def landscapes(setting: Setting) -> dict[str, dict[int, dict[str, Any]]]:
    """Every measured 1-D landscape of the setting: arm label → seed → the stored line
    (``alphas``, ``losses``, ``axis_label``, ``examples``...)."""
    lines: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in setting.arms:
        by_seed = {seed: row.landscape for seed, row in sorted(arm.sharpness.items())}
        measured = {seed: line for seed, line in by_seed.items() if line}
        if measured:
            lines[arm.label] = measured
    return lines
