"""Tables and plots from the experiment database.

Finished runs are grouped by *setting* (everything in the configuration except the method,
its hyperparameters and the seed: dataset, model, label noise, training budget, base
optimizer...) and, inside a setting, by *arm* (a method with one set of hyperparameters). For
each arm the report gives the final test accuracy over seeds (mean ± sample standard deviation,
Student-t 95% interval), the paired difference to the base optimizer and to SAM over the seeds
both ran (same seed = same initialisation, data subset, label noise and batch order), and the
cost relative to the base optimizer: measured forward/backward passes and training wall time.

Plots per setting: mean test-accuracy curves (± one std over seeds), the distribution of final
accuracies per arm, and, for every hyperparameter that takes several values within a method
(a ρ sweep), final accuracy against it.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display

import matplotlib.pyplot as plt
import numpy as np
from scipy.special import stdtrit

from flatminima.experiments.store import RunRecord, Store
from flatminima.registry import BASE_OPTIMIZER, METHODS, method_names

REFERENCE_METHOD = "sam"
"""The second reference of the paired comparison: plain SAM."""

ARM_KEYS = ("method", "hyperparameters", "seed")
"""Configuration keys that distinguish runs within one setting."""


@dataclass(frozen=True)
class Interval:
    """A mean with its Student-t 95% confidence interval (``nan`` bounds for one sample)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        array = np.asarray(values, dtype=float)
        mean = float(array.mean())
        if len(array) < 2:
            return cls(mean, math.nan, math.nan, len(array))
        # stdtrit is Student's t quantile function (scipy.special: far lighter than scipy.stats).
        quantile = float(stdtrit(len(array) - 1, 0.975))
        half_width = quantile * float(array.std(ddof=1)) / math.sqrt(len(array))
        return cls(mean, mean - half_width, mean + half_width, len(array))


@dataclass
class Arm:
    """One method with one set of hyperparameters, over the seeds it ran in a setting."""

    method: str
    hyperparameters: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    label: str = ""
    """The method and the hyperparameters that tell it apart from the method's other arms."""
    curves: dict[int, list[float]] = field(default_factory=dict)
    """Test accuracy per epoch, by seed."""
    versus_base: Interval | None = None
    versus_reference: Interval | None = None
    passes_ratio: float = math.nan
    time_ratio: float = math.nan

    @property
    def settings(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.hyperparameters.items())

    @property
    def final_accuracy(self) -> dict[int, float]:
        """Final test accuracy by seed."""
        return {run.config["seed"]: run.final["final_test_accuracy"] for run in self.runs}

    @property
    def accuracy(self) -> Interval:
        return Interval.of(list(self.final_accuracy.values()))

    @property
    def std(self) -> float:
        values = list(self.final_accuracy.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    def mean_of(self, column: str) -> float:
        return float(np.mean([run.final[column] for run in self.runs]))


@dataclass
class Setting:
    """Runs that differ only in method, hyperparameters and seed."""

    config: dict[str, Any]
    arms: list[Arm]
    slug: str

    @property
    def title(self) -> str:
        c = self.config
        return (
            f"{c['dataset']} · {c['model']} · {c['label_noise']:.0%} label noise · "
            f"{c['train_size']} training examples · {c['epochs']} epochs"
        )

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


def _slug(config: dict[str, Any], index: int) -> str:
    text = f"{index + 1}-{config['dataset']}-{config['model']}-noise{config['label_noise']:g}"
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text)


def summarize(store: Store) -> list[Setting]:
    """Every setting with its arms, statistics and costs, from the finished runs."""
    grouped: dict[str, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    setting_configs: dict[str, dict[str, Any]] = {}
    for run in store.runs(status="finished"):
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
            arm = Arm(
                method,
                _in_registry_order(method, hyperparameters),
                sorted(runs, key=lambda r: r.config["seed"]),
            )
            arm.curves = {
                run.config["seed"]: [row["test_accuracy"] for row in store.epochs(run.id)]
                for run in arm.runs
            }
            arms.append(arm)
        _label(arms)
        arms.sort(key=lambda a: (order.get(a.method, len(order)), a.method, _numeric_first(a)))
        setting = Setting(
            setting_configs[setting_key], arms, _slug(setting_configs[setting_key], index)
        )
        _compare(setting)
        settings.append(setting)
    return settings


def _compare(setting: Setting) -> None:
    """Fill in each arm's paired differences and cost ratios."""
    bases = setting.arms_of(BASE_OPTIMIZER)
    base = bases[0] if bases else None
    references = setting.arms_of(REFERENCE_METHOD)
    for arm in setting.arms:
        if base is not None:
            arm.passes_ratio = arm.mean_of("passes") / base.mean_of("passes")
            arm.time_ratio = arm.mean_of("train_time_s") / base.mean_of("train_time_s")
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


def table_rows(setting: Setting) -> list[list[str]]:
    """The report table of one setting, as strings (``TABLE_HEADERS`` columns)."""
    rows = []
    for arm in setting.arms:
        accuracy = arm.accuracy
        spread = "" if math.isnan(arm.std) else f" ± {100 * arm.std:.2f}"
        interval = (
            "—" if accuracy.n < 2 else f"[{_percent(accuracy.low)}, {_percent(accuracy.high)}]"
        )
        rows.append(
            [
                arm.label,
                str(accuracy.n),
                f"{_percent(accuracy.mean)}{spread}",
                interval,
                "—" if arm.method == BASE_OPTIMIZER else _difference(arm.versus_base),
                _difference(arm.versus_reference),
                "—" if math.isnan(arm.passes_ratio) else f"{arm.passes_ratio:.2f}",
                "—" if math.isnan(arm.time_ratio) else f"{arm.time_ratio:.2f}",
            ]
        )
    return rows


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
    figure, axes = plt.subplots(figsize=(8, 5))
    for arm in setting.arms:
        length = min(len(curve) for curve in arm.curves.values())
        curves = 100 * np.array([curve[:length] for curve in arm.curves.values()], dtype=float)
        epochs = np.arange(1, length + 1)
        mean = curves.mean(axis=0)
        (line,) = axes.plot(epochs, mean, label=f"{arm.label}, n={len(curves)}")
        if len(curves) > 1:
            spread = curves.std(axis=0, ddof=1)
            axes.fill_between(
                epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2
            )
    axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=setting.title)
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_final_distribution(setting: Setting, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(setting.arms)), 5))
    values = [100 * np.array(list(arm.final_accuracy.values())) for arm in setting.arms]
    positions = np.arange(1, len(values) + 1)
    axes.boxplot(values, positions=positions, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed, so the same database draws the same figure
    for position, points in zip(positions, values, strict=True):
        offsets = jitter.uniform(-0.12, 0.12, size=len(points))
        axes.scatter(position + offsets, points, s=18, alpha=0.8, zorder=3)
    axes.set_xticks(
        positions, [arm.label for arm in setting.arms], rotation=30, ha="right", fontsize=7
    )
    axes.set(ylabel="final test accuracy (%)", title=setting.title)
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def swept_hyperparameters(setting: Setting) -> dict[str, dict[str, list[Arm]]]:
    """For each hyperparameter that takes several numeric values within one method while its
    other hyperparameters stay fixed: line label → the arms of that line, sorted by value."""
    sweeps: dict[str, dict[str, list[Arm]]] = defaultdict(dict)
    names = {name for arm in setting.arms for name in arm.hyperparameters}
    for name in sorted(names):
        lines: dict[str, list[Arm]] = defaultdict(list)
        for arm in setting.arms:
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


def plot_sweep(setting: Setting, name: str, lines: dict[str, list[Arm]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    all_values = []
    for line, arms in lines.items():
        values = [arm.hyperparameters[name] for arm in arms]
        all_values += values
        intervals = [arm.accuracy for arm in arms]
        means = np.array([100 * interval.mean for interval in intervals])
        errors = np.array(
            [
                0.0 if interval.n < 2 else 100 * (interval.high - interval.mean)
                for interval in intervals
            ]
        )
        axes.errorbar(values, means, yerr=errors, marker="o", capsize=3, label=line)
    for base in setting.arms_of(BASE_OPTIMIZER):
        axes.axhline(
            100 * base.accuracy.mean,
            color="black",
            linestyle="--",
            label=f"{BASE_OPTIMIZER} (mean)",
        )
    if min(all_values) > 0:
        axes.set_xscale("log")
    axes.set(xlabel=name, ylabel="final test accuracy (%, mean and 95% CI)", title=setting.title)
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(setting: Setting, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "test_accuracy_curves.png", directory / "final_accuracy.png"]
    plot_curves(setting, paths[0])
    plot_final_distribution(setting, paths[1])
    for name, lines in swept_hyperparameters(setting).items():
        path = directory / f"accuracy_vs_{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png"
        plot_sweep(setting, name, lines, path)
        paths.append(path)
    return paths


# --- the report ------------------------------------------------------------------------------

NOTES = f"""\
Final test accuracy is the last epoch's, on the clean test set. The 95% CI is Student-t over
seeds. Δ columns are paired over the seeds both arms ran (same initialisation, data subset,
label noise and batch order), in percentage points; Δ vs {REFERENCE_METHOD} pairs with the
{REFERENCE_METHOD} arm that has the same ρ when several were run. "passes ×" is the measured
number of forward/backward passes relative to {BASE_OPTIMIZER}; "time ×" the training wall time
(evaluation excluded) relative to {BASE_OPTIMIZER}: with several worker processes on a busy
machine it is noisier than the pass count."""


@dataclass
class Report:
    settings: list[Setting]
    markdown_path: Path
    plots: list[Path]
    text: str
    """The tables as plain text, for the terminal."""
    unfinished: dict[str, int]
    """Runs in the database that are not finished, by status."""


def write_report(db_path: str | Path, out_dir: str | Path) -> Report:
    """Summarise ``db_path`` into ``out_dir/report.md`` and its plots."""
    db_path, out_dir = Path(db_path), Path(out_dir)
    if not db_path.exists():
        raise FileNotFoundError(f"no database at {db_path}")
    with Store(db_path) as store:
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
        markdown.append(f"Not included: {counts}.")
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
        markdown += [f"![{path.stem}]({path.relative_to(out_dir)})" for path in setting_plots]
        text += [setting.title, setting.training, "", text_table(TABLE_HEADERS, rows), ""]
        text += ["hyperparameters:", *(f"  {line}" for line in hyperparameters), ""]
    if not settings:
        markdown += ["", "No finished runs yet."]
        text.append("No finished runs yet.")
    markdown += ["", NOTES.replace("\n", " "), ""]
    markdown_path = out_dir / "report.md"
    markdown_path.write_text("\n".join(markdown))
    return Report(settings, markdown_path, plots, "\n".join(text).rstrip(), dict(unfinished))
