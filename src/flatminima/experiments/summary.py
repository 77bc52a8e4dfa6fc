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
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flatminima.experiments.config import ConfigError
from flatminima.experiments.labels import arm_labels, describe_hyperparameter
from flatminima.experiments.statistics import Interval, paired_difference, sample_std, spearman
from flatminima.experiments.store import RunRecord, SharpnessRecord, Store, settings_key
from flatminima.experiments.tracking import sam_edge_of_stability, stability_threshold
from flatminima.registry import BASE_OPTIMIZER, METHODS, canonical_method_name, method_names

REFERENCE_METHOD = "sam"
"""The second reference of the paired comparison: plain SAM."""

ARM_KEYS = ("method", "hyperparameters", "seed")
"""Configuration keys that distinguish runs within one setting."""

ACCURACY_RANGE = (0.0, 1.0)
"""The values an accuracy (a fraction) can take: its confidence intervals are clipped to it."""

CURVE_COLUMNS = (
    "test_accuracy",
    "train_loss",
    "train_accuracy_noisy",
    "validation_accuracy",
    "learning_rate",
    "top_eigenvalue",
    "gradient_norm",
)
"""The per-epoch columns of the database the report draws (``nan`` where a run stored none:
no validation split, sharpness not tracked at that epoch, a database older than the column)."""


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


def summarize(store: Store, only: Collection[str] | None = None) -> list[Setting]:
    """Every setting with its arms, statistics and costs, from the finished runs; the failed
    runs are counted in their arms (a setting or an arm whose runs all failed is kept, so the
    report shows that it was tried). Running and interrupted runs are left out (see
    :func:`unfinished_runs`). ``only``: the configuration hashes to summarise (a study's runs,
    in a database other studies share); ``None``, every run."""
    grouped: dict[str, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    setting_configs: dict[str, dict[str, Any]] = {}
    sharpness: dict[str, dict[str, SharpnessRecord]] = defaultdict(dict)
    for record in store.sharpness_records():
        sharpness[record.config_hash][settings_key(record.settings)] = record
    for run in store.runs():
        if run.status not in ("finished", "failed"):
            continue
        if only is not None and run.config_hash not in only:
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


def unfinished_runs(store: Store, only: Collection[str] | None = None) -> dict[str, int]:
    """Runs in no statistic, by state: ``failed`` (also counted in their arms' rows),
    ``running`` (its process is alive) and ``interrupted`` (left running by a process that is
    gone: the next ``compare`` redoes it). ``only`` as in :func:`summarize`."""
    live = store.live_runs()
    counts: dict[str, int] = defaultdict(int)
    for run in store.runs():
        if only is not None and run.config_hash not in only:
            continue
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


# --- hyperparameters chosen on validation data ------------------------------------------------

SELECTION_RULES = ("validation",)
"""How ``--select-by`` may choose each method's hyperparameters (``None``: no choice, every
arm shown as run)."""


class SelectionError(ConfigError):
    """A selection that cannot be made (no validation split, no seed shared by a sweep)."""


@dataclass
class Selection:
    """One method's sweep in a setting and the setting of it chosen on validation data.

    The choice reads nothing but the runs' final validation accuracy: ``chosen`` is the
    candidate with the highest mean over ``seeds``, the seeds every candidate finished with a
    validation accuracy (so each mean is over the same seeds, the comparison paired); exact
    ties go to the candidate first in the report's order (smaller values of the swept
    hyperparameters first). Test accuracy enters only afterwards, as what is reported of the
    choice: ``versus_base`` and ``versus_reference`` are its paired test-accuracy differences
    to the base optimizer's and SAM's own chosen settings."""

    method: str
    candidates: list[Arm]
    """The method's arms with at least one finished run, in the report's order."""
    seeds: tuple[int, ...]
    validation: dict[str, float]
    """Mean final validation accuracy over ``seeds``, by candidate label."""
    chosen: Arm
    versus_base: Interval | None = None
    versus_reference: Interval | None = None

    @property
    def swept(self) -> list[str]:
        """The hyperparameters whose values differ among the candidates."""
        names = [name for arm in self.candidates for name in arm.hyperparameters]
        return [
            name
            for name in dict.fromkeys(names)
            if len({json.dumps(arm.hyperparameters.get(name)) for arm in self.candidates}) > 1
        ]

    @property
    def choice(self) -> str:
        """The chosen values of the swept hyperparameters, e.g. ``ρ=0.1``; ``""`` when the
        method ran with one setting only."""
        return " ".join(
            describe_hyperparameter(name, self.chosen.hyperparameters.get(name))
            for name in self.swept
        )


def _validation_accuracy(arm: Arm) -> dict[int, float]:
    """Final validation accuracy by seed, over the finished runs that recorded one."""
    return {
        run.config["seed"]: float(value)
        for run in arm.runs
        if (value := run.final.get("final_validation_accuracy")) is not None
    }


def select_by_validation(setting: Setting) -> list[Selection]:
    """For each method of the setting (in the report's order), its hyperparameters chosen on
    validation data (see :class:`Selection`). :class:`SelectionError` when the setting's runs
    hold out no validation split, or a method's candidates share no seed with a validation
    accuracy (their means would not be comparable)."""
    if not setting.config.get("validation_size"):
        raise SelectionError(
            f"--select-by validation needs runs with a validation split; those of "
            f"{setting.title} have none (train them with a validation size above 0)"
        )
    if not any(_validation_accuracy(arm) for arm in setting.arms):
        raise SelectionError(
            f"--select-by validation: no run of {setting.title} recorded a validation accuracy "
            "(trained before the validation split was evaluated?)"
        )
    selections = []
    for method in dict.fromkeys(arm.method for arm in setting.finished_arms):
        candidates = [arm for arm in setting.arms_of(method) if arm.runs]
        scores = [_validation_accuracy(arm) for arm in candidates]
        seeds = tuple(sorted(set.intersection(*(set(score) for score in scores))))
        if not seeds:
            raise SelectionError(
                f"--select-by validation: the {len(candidates)} setting(s) of {method} in "
                f"{setting.title} share no seed finished with a validation accuracy; finish "
                "the grid (or forget the runs that break it) first"
            )
        means = [float(np.mean([score[seed] for seed in seeds])) for score in scores]
        best = means.index(max(means))  # the first of equal means: report order breaks ties
        selections.append(
            Selection(
                method,
                candidates,
                seeds,
                {arm.label: mean for arm, mean in zip(candidates, means, strict=True)},
                candidates[best],
            )
        )
    chosen = {selection.method: selection.chosen for selection in selections}
    base, reference = chosen.get(BASE_OPTIMIZER), chosen.get(REFERENCE_METHOD)
    for selection in selections:
        if base is not None and selection.method != BASE_OPTIMIZER:
            selection.versus_base = paired_difference(
                selection.chosen.final_accuracy, base.final_accuracy
            )
        if reference is not None and selection.method != REFERENCE_METHOD:
            selection.versus_reference = paired_difference(
                selection.chosen.final_accuracy, reference.final_accuracy
            )
    return selections


def check_selection_rule(rule: str | None) -> None:
    """A one-line error for a rule ``--select-by`` does not know."""
    if rule is not None and rule not in SELECTION_RULES:
        raise SelectionError(f"--select-by takes {', '.join(SELECTION_RULES)}, got {rule!r}")


# --- sharpness tracked during training --------------------------------------------------------


@dataclass(frozen=True)
class TrackedSharpness:
    """λ_max during training of one arm's seeds, at the epochs every one of them measured, with
    the stability thresholds at those epochs (from each run's stored learning rate)."""

    arm: Arm
    seeds: list[int]
    epochs: np.ndarray
    values: np.ndarray
    """λ_max, seeds × epochs."""
    learning_rate: np.ndarray
    """seeds × epochs (the same for every seed: one schedule per setting)."""
    threshold: np.ndarray | None
    """2(1 + β)/η per seed and epoch for SGD (β its momentum); ``None`` for AdamW, whose
    preconditioned step has no such threshold in λ_max."""
    sam_edge: np.ndarray | None
    """Normalised SAM's predicted edge of stability per seed and epoch (the ‖g‖ measured with
    λ_max; see :func:`~flatminima.experiments.tracking.sam_edge_of_stability`); ``None`` but
    for plain SAM with SGD."""

    def last(self, array: np.ndarray) -> Interval:
        """The mean over seeds at the last measured epoch, with its 95% interval."""
        return Interval.of(list(array[:, -1]))


def tracked_sharpness(setting: Setting) -> list[TrackedSharpness]:
    """Every arm of the setting with λ_max tracked during training (over its finished runs that
    did not diverge and measured it), in the setting's arm order."""
    momentum = setting.config.get("momentum") or 0.0
    sgd = setting.config.get("optimizer", "sgd") == "sgd"
    tracked = []
    for arm in setting.finished_arms:
        diverged = arm.diverged
        curves = {
            seed: columns
            for seed, columns in arm.epochs.items()
            if seed not in diverged and any(math.isfinite(v) for v in columns["top_eigenvalue"])
        }
        if not curves:
            continue
        common = set.intersection(
            *(
                {i for i, v in enumerate(columns["top_eigenvalue"]) if math.isfinite(v)}
                for columns in curves.values()
            )
        )
        if not common:
            continue
        positions = sorted(common)
        seeds = sorted(curves)

        values, learning_rate, gradient_norm = (
            _per_seed(curves, seeds, positions, column)
            for column in ("top_eigenvalue", "learning_rate", "gradient_norm")
        )
        threshold = (
            np.array([[stability_threshold(lr, momentum) for lr in row] for row in learning_rate])
            if sgd
            else None
        )
        sam_edge = None
        if sgd and arm.method == REFERENCE_METHOD and "rho" in arm.hyperparameters:
            rho = float(arm.hyperparameters["rho"])
            sam_edge = np.array(
                [
                    [
                        sam_edge_of_stability(lr, rho, momentum, gradient_norm=norm)
                        for lr, norm in zip(lr_row, norm_row, strict=True)
                    ]
                    for lr_row, norm_row in zip(learning_rate, gradient_norm, strict=True)
                ]
            )
        tracked.append(
            TrackedSharpness(
                arm, seeds, np.array(positions) + 1, values, learning_rate, threshold, sam_edge
            )
        )
    return tracked


def _per_seed(
    curves: dict[int, dict[str, list[float]]], seeds: list[int], positions: list[int], column: str
) -> np.ndarray:
    """``column`` at the epoch ``positions`` (from 0), a row per seed."""
    return np.array([[curves[seed][column][i] for i in positions] for seed in seeds], dtype=float)
