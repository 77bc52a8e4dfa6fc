"""The report's figures: one function per figure, each writing one PNG and returning what it
drew (:class:`Plot`: the numbers of every series and a caption saying what is shown).

The only module of the package that imports matplotlib. Figures are built with its
object-oriented API (``matplotlib.figure.Figure``, never ``pyplot``): no backend is selected,
no global figure state is touched, so importing the report leaves a notebook's inline plots
alone. One style for every figure: the sizes and fonts of ``STYLE`` (applied only while a
figure is drawn) and one colour per method, the same in every figure (:func:`method_color`);
arms of one method (a ρ sweep) share its colour and differ in line style and marker.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from flatminima.experiments.labels import SYMBOLS
from flatminima.experiments.statistics import Interval, pareto_front
from flatminima.experiments.summary import (
    SHARPNESS_CORRELATED,
    Arm,
    Setting,
    landscapes,
    measured_pairs,
    sharpness_correlations,
    tracked_sharpness,
)
from flatminima.experiments.tracking import stability_threshold
from flatminima.registry import BASE_OPTIMIZER, method_names

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "savefig.dpi": 150,
}
"""matplotlib settings of every report figure, in force only while one is drawn."""

PANEL_SIZE = (4.6, 3.4)
"""Width and height of one panel, inches (a figure of n panels in a row is n × as wide)."""

BASE_COLOR = "#333333"
METHOD_PALETTE = (
    "#1f77b4",  # blue
    "#d62728",  # red
    "#2ca02c",  # green
    "#ff7f0e",  # orange
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#17becf",  # cyan
    "#bcbd22",  # olive
    "#7f7f7f",  # grey
    # Lighter shades of the same hues: fifteen methods need more than ten colours.
    "#aec7e8",
    "#ff9896",
    "#98df8a",
    "#ffbb78",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
    "#dbdb8d",
)
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure: the base optimizer dark grey, the others by
    their place in the registry (so a method keeps its colour from one report to the next)."""
    if method == BASE_OPTIMIZER:
        return BASE_COLOR
    others = [name for name in method_names() if name != BASE_OPTIMIZER]
    index = others.index(method) if method in others else len(others) + sum(map(ord, method))
    return METHOD_PALETTE[index % len(METHOD_PALETTE)]


@dataclass(frozen=True)
class ArmStyle:
    color: str
    linestyle: str
    marker: str


def arm_styles(setting: Setting) -> dict[str, ArmStyle]:
    """Each arm's colour (its method's), line style and marker (by its rank among the
    method's arms), by label."""
    styles = {}
    for arm in setting.arms:
        rank = [a.label for a in setting.arms_of(arm.method)].index(arm.label)
        styles[arm.label] = ArmStyle(
            method_color(arm.method),
            LINE_STYLES[rank % len(LINE_STYLES)],
            MARKERS[rank % len(MARKERS)],
        )
    return styles


@dataclass
class Plot:
    """One figure written: where, what it shows in words, and the numbers it drew."""

    path: Path
    caption: str
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``"panel: arm label"`` → the arrays drawn for it (x values, means, interval bounds...)."""


@contextmanager
def _figure(panels: int, rows: int = 1, *, width: float | None = None) -> Iterator[Figure]:
    with matplotlib.rc_context(STYLE):
        columns = math.ceil(panels / rows)
        size = (width or PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.5)
        yield Figure(figsize=size, layout="constrained")


def _save(figure: Figure, path: Path) -> None:
    """Write the PNG atomically: a reader (or a killed report) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _log_axis(axes: Axes) -> None:
    """A logarithmic y-axis labelled in plain numbers (0.5, 1, 2), not powers of ten."""
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    # Minor ticks labelled at 2 and 5 × 10^k only: every one of them would crowd the axis.
    axes.yaxis.set_minor_formatter(
        FuncFormatter(lambda value, _: f"{value:.3g}" if f"{value:.1e}"[0] in "25" else "")
    )
    axes.tick_params(axis="y", which="minor", labelsize=7)


def _error(interval: Interval) -> list[list[float]]:
    """``yerr``/``xerr`` of one interval: the distances down to its low and up to its high
    bound (apart, since clipping makes them unequal); 0 without bounds."""
    if not interval.has_bounds:
        return [[0.0], [0.0]]
    return [[interval.mean - interval.low], [interval.high - interval.mean]]


def _base_band(axes: Axes, base: Arm | None, *, vertical: bool = False) -> dict[str, float]:
    """The base optimizer's mean final test accuracy as a reference line, its 95% interval a
    shaded band; the numbers drawn (empty without a base arm)."""
    if base is None:
        return {}
    interval = base.accuracy.scaled(100)
    line = axes.axvline if vertical else axes.axhline
    span = axes.axvspan if vertical else axes.axhspan
    line(
        interval.mean, color=BASE_COLOR, linestyle="--", linewidth=1,
        label=f"{base.label}: mean, 95% interval (band)",
    )  # fmt: skip
    if interval.has_bounds:
        span(interval.low, interval.high, color=BASE_COLOR, alpha=0.1, linewidth=0)
    return {"mean": interval.mean, "low": interval.low, "high": interval.high}


def _seeds_phrase(setting: Setting) -> str:
    counts = sorted({len(arm.runs) for arm in setting.finished_arms})
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


INTERVAL_WORDS = "95% interval of the mean over seeds (Student-t)"


# --- curves ----------------------------------------------------------------------------------


CURVE_PANELS = (
    # (panel, column, y label, scale, drawn only when some run stored the column)
    ("test accuracy", "test_accuracy", "test accuracy (%)", 100.0, False),
    ("training loss", "train_loss", "training loss (noisy labels)", 1.0, False),
    ("training accuracy", "train_accuracy_noisy", "training accuracy on its labels (%)", 100.0,
     True),
    ("validation accuracy", "validation_accuracy", "validation accuracy (%)", 100.0, True),
)  # fmt: skip
"""The panels of the curves figure; the optional ones appear when the database has them."""


def _stored(arm: Arm, column: str) -> dict[int, list[float]]:
    """The seeds of ``arm`` that stored ``column`` at every epoch (older runs stored none)."""
    return {
        seed: columns[column]
        for seed, columns in arm.epochs.items()
        if all(math.isfinite(value) for value in columns[column])
    }


def plot_curves(setting: Setting, path: Path) -> Plot:
    """Per epoch: test accuracy, training loss, and where stored the accuracy on the training
    labels as trained on (the memorisation curve under label noise) and on the validation
    split. Each arm: the mean over the seeds that trained every epoch with ±1 standard
    deviation as a band; each diverged seed dotted on its own up to the epoch it stopped at
    (marked ×), in its arm's colour."""
    styles = arm_styles(setting)
    plot = Plot(path, "")
    panels = [
        panel
        for panel in CURVE_PANELS
        if not panel[4] or any(_stored(arm, panel[1]) for arm in setting.finished_arms)
    ]
    noise = setting.config.get("label_noise") or 0
    rows = 1 if len(panels) <= 3 else 2
    with _figure(len(panels), rows) as figure:
        axes_grid = np.atleast_1d(figure.subplots(rows, math.ceil(len(panels) / rows))).ravel()
        for axes, (panel, column, ylabel, scale, optional) in zip(axes_grid, panels, strict=True):
            for arm in setting.finished_arms:
                style = styles[arm.label]
                diverged = arm.diverged
                stored = _stored(arm, column) if optional else {}
                full = [
                    columns[column]
                    for seed, columns in arm.epochs.items()
                    if seed not in diverged and (not optional or seed in stored)
                ]
                label = f"{arm.label} (n={len(full)})"
                if diverged:
                    label += f", +{len(diverged)} diverged (dotted)"
                if full:
                    length = min(len(curve) for curve in full)
                    values = scale * np.array([curve[:length] for curve in full], dtype=float)
                    epochs = np.arange(1, length + 1)
                    mean = values.mean(axis=0)
                    spread = values.std(axis=0, ddof=1) if len(values) > 1 else 0 * mean
                    low, high = mean - spread, mean + spread
                    if scale == 100.0:  # an accuracy
                        low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
                    axes.plot(
                        epochs, mean, color=style.color, linestyle=style.linestyle, label=label
                    )
                    axes.fill_between(epochs, low, high, color=style.color, alpha=0.15, lw=0)
                    plot.series[f"{panel}: {arm.label}"] = {
                        "epoch": epochs,
                        "mean": mean,
                        "low": low,
                        "high": high,
                        "seeds": [
                            s
                            for s in arm.epochs
                            if s not in diverged and (not optional or s in stored)
                        ],
                    }
                for seed in diverged:
                    curve = scale * np.array(arm.epochs[seed][column], dtype=float)
                    axes.plot(
                        np.arange(1, len(curve) + 1),
                        curve,
                        linestyle=":",
                        marker="x",
                        markevery=[len(curve) - 1],
                        color=style.color,
                        label=None if full else label,  # one legend entry per arm
                    )
                    plot.series[f"{panel}: {arm.label}, diverged seed {seed}"] = {"values": curve}
            if column in ("train_accuracy_noisy", "validation_accuracy") and noise:
                # Above this line a network fits labels that are wrong.
                axes.axhline(
                    100 * (1 - noise), color="#888888", linestyle=":", linewidth=1,
                    label=f"{100 * (1 - noise):g}%: the share of correct labels",
                )  # fmt: skip
                axes.legend(loc="lower right", handles=[axes.get_lines()[-1]])
            axes.set(xlabel="epoch", ylabel=ylabel, title=panel)
            if column == "train_loss":
                _log_axis(axes)
        for axes in axes_grid[len(panels) :]:
            axes.set_visible(False)
        handles, labels = axes_grid[0].get_legend_handles_labels()
        band = Patch(color="#888888", alpha=0.3, label="band: ±1 std over seeds")
        axes_grid[0].legend([*handles, band], [*labels, band.get_label()], loc="lower right")
        figure.suptitle(setting.plot_title, fontsize=9)
        _save(figure, path)
    memorising = (
        f" With {100 * noise:g}% of the training labels flipped, a training loss falling far "
        "below its early plateau means the network is fitting the wrong labels: the point "
        "where test accuracy turns down."
        if noise
        else ""
    )
    shown = {panel[1] for panel in panels}
    extra = ""
    if "train_accuracy_noisy" in shown:
        extra += (
            " Training accuracy: on the labels trained on (noisy ones included), in eval mode "
            "after each epoch"
            + (
                f"; above the dotted line at {100 * (1 - noise):g}% (the share of labels that "
                "are correct) the network has memorised wrong labels: the memorisation curve."
                if noise
                else "."
            )
        )
    if "validation_accuracy" in shown:
        extra += (
            " Validation accuracy: on the held-out split of the training pool, whose labels "
            "are as noisy as the training labels."
        )
    plot.caption = (
        "Test accuracy (clean test set) after each epoch and training loss on the labels "
        "trained on (each step's loss as its optimizer returned it, mean over the epoch; log "
        f"scale).{extra} Lines: mean over seeds ({_seeds_phrase(setting)} per arm); bands: ±1 "
        "sample standard deviation over those seeds (the spread of single runs, not an "
        f"interval of the mean).{memorising}"
    )
    return plot


# --- final accuracy --------------------------------------------------------------------------


def plot_final_accuracy(setting: Setting, path: Path) -> Plot:
    """Per arm, a row: each seed's final accuracy as a point, and beside the points the mean
    with its 95% interval; the base optimizer's mean and interval as a reference band. A
    second panel: final accuracy on the training set, on the labels trained on (noisy) and on
    the true labels."""
    arms = setting.finished_arms
    styles = arm_styles(setting)
    plot = Plot(path, "")
    rows = np.arange(len(arms))[::-1]  # the first arm on top
    height = max(2.4, 0.42 * len(arms) + 1.2)
    with _figure(2) as figure:
        figure.set_size_inches(2 * PANEL_SIZE[0] + 0.6, height)
        test_axes, train_axes = figure.subplots(1, 2, sharey=True)
        plot.series["base reference"] = _base_band(test_axes, setting.base, vertical=True)
        for row, arm in zip(rows, arms, strict=True):
            style = styles[arm.label]
            accuracy = arm.final_accuracy
            seeds = sorted(accuracy)
            values = np.array([100 * accuracy[seed] for seed in seeds])
            diverged = np.array([seed in arm.diverged for seed in seeds], dtype=bool)
            test_axes.scatter(
                values[~diverged], np.full((~diverged).sum(), row + 0.15), s=14,
                color=style.color, alpha=0.7, linewidths=0,
            )  # fmt: skip
            if diverged.any():
                test_axes.scatter(
                    values[diverged], np.full(diverged.sum(), row + 0.15), s=22, marker="x",
                    color=style.color,
                )  # fmt: skip
            interval = arm.accuracy.scaled(100)
            test_axes.errorbar(
                interval.mean, row - 0.15, xerr=_error(interval), marker="D", markersize=5,
                color=style.color, capsize=3, linewidth=1.4,
            )  # fmt: skip
            text = f"{interval.mean:.1f}"
            if interval.has_bounds:
                text += f" [{interval.low:.1f}, {interval.high:.1f}]"
            test_axes.annotate(
                text, (interval.high if interval.has_bounds else interval.mean, row - 0.15),
                xytext=(4, 0), textcoords="offset points", va="center", fontsize=7,
                color=style.color,
            )  # fmt: skip
            plot.series[f"test accuracy: {arm.label}"] = {
                "seeds": seeds,
                "values": values,
                "mean": interval.mean,
                "low": interval.low,
                "high": interval.high,
            }
            for offset, column, marker, fill, words in (
                (0.15, "final_train_accuracy_noisy", "o", style.color, "noisy labels"),
                (-0.15, "final_train_accuracy_clean", "s", "white", "true labels"),
            ):
                train = {s: v for s, v in arm.final(column).items() if v is not None}
                if not train:
                    continue
                train_interval = Interval.of(list(train.values())).clipped(0, 1).scaled(100)
                train_axes.errorbar(
                    train_interval.mean, row + offset, xerr=_error(train_interval),
                    marker=marker, markersize=5, color=style.color, markerfacecolor=fill,
                    capsize=3, linewidth=1.2,
                )  # fmt: skip
                plot.series[f"training accuracy, {words}: {arm.label}"] = {
                    "seeds": sorted(train),
                    "mean": train_interval.mean,
                    "low": train_interval.low,
                    "high": train_interval.high,
                }
        test_axes.set_yticks(rows, [arm.label for arm in arms])
        test_axes.margins(x=0.15)
        test_axes.set_ylim(-0.6, len(arms) - 0.4)
        test_axes.set(xlabel="final test accuracy (%)", title="test accuracy")
        test_axes.grid(axis="y", visible=False)
        train_axes.set(
            xlabel="final training accuracy (%)",
            title="training set: ● labels trained on (noisy)   □ true labels",
        )
        train_axes.grid(axis="y", visible=False)
        if setting.base is not None:
            test_axes.legend(loc="lower left")
        figure.suptitle(setting.plot_title, fontsize=9)
        _save(figure, path)
    diverged_words = (
        " × marks a run that diverged (its accuracy counts in the mean)."
        if any(arm.diverged for arm in arms)
        else ""
    )
    base_words = (
        f" Dashed line and grey band: the base optimizer alone ({setting.base.label}), its mean "
        "and 95% interval."
        if setting.base is not None
        else ""
    )
    plot.caption = (
        "Left: final test accuracy of each seed (small points) and, beside them, the mean with "
        f"its {INTERVAL_WORDS} (diamond, bar and numbers).{base_words}{diverged_words} Right: "
        "final accuracy on the training set, on the labels trained on (filled) and on the true "
        "labels (open), mean and 95% interval: near 100% on the noisy labels means the flipped "
        "labels were memorised."
    )
    return plot


# --- accuracy against cost -------------------------------------------------------------------


def plot_accuracy_vs_cost(setting: Setting, path: Path) -> Plot | None:
    """Mean final test accuracy (95% interval) against the cost relative to the base
    optimizer, in passes and in time, one point per arm, the Pareto front drawn; ``None``
    unless the base arm and another have cost ratios."""
    arms = [arm for arm in setting.finished_arms if math.isfinite(arm.passes_ratio)]
    if setting.base is None or len(arms) < 2:
        return None
    styles = arm_styles(setting)
    plot = Plot(path, "")
    panels = (
        ("passes", "passes_ratio", "forward/backward passes ×"),
        ("time", "time_ratio", "training time ×"),
    )
    with _figure(2) as figure:
        axes_row = figure.subplots(1, 2, sharey=True)
        for axes, (panel, attribute, xlabel) in zip(axes_row, panels, strict=True):
            points = [(getattr(arm, attribute), 100 * arm.accuracy.mean) for arm in arms]
            shifts = _side_by_side([cost for cost, _ in points], axes_row[0] is axes)
            for arm, (cost, _), shift in zip(arms, points, shifts, strict=True):
                style = styles[arm.label]
                interval = arm.accuracy.scaled(100)
                axes.errorbar(
                    cost + shift, interval.mean, yerr=_error(interval), marker=style.marker,
                    color=style.color, capsize=3, markersize=6, linewidth=1.2, label=arm.label,
                )  # fmt: skip
            front = pareto_front(points)
            front_x = [points[i][0] for i in front]
            front_y = [points[i][1] for i in front]
            axes.plot(
                front_x, front_y, color="#888888", linestyle="--", linewidth=1, zorder=0,
                drawstyle="steps-post", label="Pareto front",
            )  # fmt: skip
            plot.series[panel] = {
                "labels": [arm.label for arm in arms],
                "cost": np.array([p[0] for p in points]),
                "mean": np.array([p[1] for p in points]),
                "front": [arms[i].label for i in front],
            }
            axes.set(xlabel=f"{xlabel} (vs {BASE_OPTIMIZER})", title=f"accuracy against {panel}")
            axes.margins(x=0.25)
        axes_row[0].set_ylabel("final test accuracy (%)")
        handles, labels = axes_row[0].get_legend_handles_labels()
        figure.legend(
            handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
            title="bars: 95% interval", title_fontsize=7.5,
        )  # fmt: skip
        figure.suptitle(setting.plot_title, fontsize=9)
        _save(figure, path)
    plot.caption = (
        f"Mean final test accuracy of each arm, with its {INTERVAL_WORDS}, against its cost "
        f"relative to the base optimizer: forward/backward passes counted (left) and training "
        "wall time measured (right; noisier on a busy machine). Arms of the same pass count are "
        "drawn side by side around it. The dashed line is the Pareto front: the arms no other "
        "arm beats on both accuracy and cost. Diverged runs are left out of the costs."
    )
    return plot


def _side_by_side(costs: Sequence[float], exact: bool) -> list[float]:
    """Horizontal shifts that set apart the points of arms at the same cost (every two-pass
    method costs exactly 2 passes), so that neither their bars nor their markers hide each
    other; none where costs differ (``exact=False``: measured times never tie)."""
    if not exact:
        return [0.0] * len(costs)
    span = (max(costs) - min(costs)) or 1.0
    shifts = []
    for index, cost in enumerate(costs):
        tied = [i for i, other in enumerate(costs) if other == cost]
        rank = tied.index(index)
        shifts.append((rank - (len(tied) - 1) / 2) * 0.025 * span)
    return shifts


# --- hyperparameter sweeps -------------------------------------------------------------------


def _symbol(name: str) -> str:
    return SYMBOLS.get(name, name)


def plot_sweep(
    setting: Setting,
    name: str,
    lines: dict[str, list[Arm]],
    path: Path,
    chosen: Collection[str] = (),
) -> Plot:
    """Final test accuracy (mean, 95% interval) against a swept hyperparameter, a line per
    group of arms swept together; ticks at the swept values; the base optimizer's mean and
    interval as a band; arms of other methods that take this hyperparameter at a single value,
    a point each. The arms labelled in ``chosen`` (the settings chosen on validation data) are
    ringed: every value run stays visible beside the one the report's main table gives."""
    styles = arm_styles(setting)
    plot = Plot(path, "")
    swept_labels = {arm.label for arms in lines.values() for arm in arms}
    singles = [
        arm
        for arm in setting.finished_arms
        if arm.label not in swept_labels
        and isinstance(arm.hyperparameters.get(name), (int, float))
        and not isinstance(arm.hyperparameters.get(name), bool)
    ]
    ticks: set[float] = set()
    ringed: list[str] = []
    with _figure(1) as figure:
        figure.set_size_inches(PANEL_SIZE[0] + 1.6, PANEL_SIZE[1] + 0.5)
        axes = figure.subplots()
        plot.series["base reference"] = _base_band(axes, setting.base)
        for line, arms in lines.items():
            style = styles[arms[0].label]
            values = [float(arm.hyperparameters[name]) for arm in arms]
            ticks.update(values)
            intervals = [arm.accuracy.scaled(100) for arm in arms]
            means = np.array([i.mean for i in intervals])
            errors = np.array([np.ravel(_error(i)) for i in intervals]).T
            axes.errorbar(
                values, means, yerr=errors, marker=style.marker, capsize=3, color=style.color,
                label=_line_label(line, name), linestyle=style.linestyle,
            )  # fmt: skip
            plot.series[line] = {
                "x": np.array(values),
                "mean": means,
                "low": np.array([i.low for i in intervals]),
                "high": np.array([i.high for i in intervals]),
            }
            for arm, value, mean in zip(arms, values, means, strict=True):
                if arm.label in chosen:
                    axes.plot(
                        [value], [mean], marker="o", markersize=13, markerfacecolor="none",
                        markeredgecolor=style.color, markeredgewidth=1.4, linestyle="none",
                    )  # fmt: skip
                    ringed.append(arm.label)
                    plot.series[f"chosen: {arm.label}"] = {
                        "x": np.array([value]),
                        "mean": np.array([mean]),
                    }
        if ringed:  # one legend entry for every ring, in a neutral colour
            axes.plot(
                [], [], marker="o", markersize=13, markerfacecolor="none",
                markeredgecolor=BASE_COLOR, markeredgewidth=1.4, linestyle="none",
                label="chosen on validation",
            )  # fmt: skip
        for arm in singles:
            style = styles[arm.label]
            value = float(arm.hyperparameters[name])
            ticks.add(value)
            interval = arm.accuracy.scaled(100)
            axes.errorbar(
                [value], [interval.mean], yerr=_error(interval), marker=style.marker,
                linestyle="none", capsize=3, color=style.color, label=arm.label,
            )  # fmt: skip
            plot.series[f"single: {arm.label}"] = {
                "x": np.array([value]),
                "mean": np.array([interval.mean]),
                "low": np.array([interval.low]),
                "high": np.array([interval.high]),
            }
        if min(ticks) > 0 and max(ticks) / min(ticks) > 3:
            axes.set_xscale("log")
        axes.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([f"{value:g}" for value in sorted(ticks)])
        axes.set(
            xlabel=_symbol(name),
            ylabel="final test accuracy (%)",
            title=setting.plot_title,
        )
        axes.legend(loc="best")
        _save(figure, path)
    base_words = (
        " Dashed line and grey band: the base optimizer alone, its mean and 95% interval."
        if setting.base is not None
        else ""
    )
    single_words = (
        f" Single points: methods run at one value of {_symbol(name)}." if singles else ""
    )
    chosen_words = (
        f" Ringed: the value of {_symbol(name)} chosen on validation data for each method (the "
        "report's main table gives its test accuracy)."
        if ringed
        else ""
    )
    plot.caption = (
        f"Final test accuracy against {_symbol(name)} ({name}), ticks at the values run: mean "
        f"and {INTERVAL_WORDS} for each value.{base_words}{single_words}{chosen_words}"
    )
    plot.series["ticks"] = {"x": np.array(sorted(ticks))}
    return plot


def _line_label(line: str, name: str) -> str:
    """``sam, eta=1.0`` → ``sam (η=1.0)``: the fixed hyperparameters of a sweep's line."""
    method, *fixed = line.split(", ")
    shown = [
        f"{_symbol(part.split('=')[0])}={part.split('=', 1)[1]}" for part in fixed if "=" in part
    ]
    return f"{method} ({', '.join(shown)})" if shown else method


# --- sharpness -------------------------------------------------------------------------------


def plot_sharpness(setting: Setting, path: Path) -> Plot | None:
    """Final test accuracy against every stored sharpness measure, a panel each: a point per
    measured run, each arm's mean marked, Spearman's ρ_s and its p-value in the panel."""
    styles = arm_styles(setting)
    correlations = {c.metric: c for c in sharpness_correlations(setting)}
    measures = [(key, name) for key, name in SHARPNESS_CORRELATED if measured_pairs(setting, key)]
    if not measures:
        return None
    plot = Plot(path, "")
    columns = min(3, len(measures))
    rows = math.ceil(len(measures) / columns)
    with _figure(columns * rows, rows) as figure:
        grid = np.atleast_1d(figure.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
        for axes, (key, name) in zip(grid, measures, strict=False):
            pairs = measured_pairs(setting, key)
            for arm in setting.arms:
                mine = [(x, y) for a, _, x, y in pairs if a is arm]
                if not mine:
                    continue
                style = styles[arm.label]
                xs = np.array([x for x, _ in mine])
                ys = 100 * np.array([y for _, y in mine])
                axes.scatter(
                    xs, ys, s=16, color=style.color, marker=style.marker, alpha=0.55,
                    linewidths=0, label=arm.label,
                )  # fmt: skip
                axes.scatter(
                    [xs.mean()], [ys.mean()], s=70, color=style.color, marker=style.marker,
                    edgecolors="black", linewidths=0.8, zorder=3,
                )  # fmt: skip
                plot.series[f"{key}: {arm.label}"] = {"x": xs, "y": ys}
            values = [x for _, _, x, _ in pairs]
            if min(values) > 0 and max(values) / min(values) > 20:
                axes.set_xscale("log")
            correlation = correlations[key]
            text = (
                "Spearman ρ_s undefined"
                if math.isnan(correlation.coefficient)
                else f"Spearman ρ_s = {correlation.coefficient:+.2f}, p = {correlation.p_value:.2g}"
            )
            axes.set(xlabel=name, title=f"{text} ({correlation.n} runs)")
        for axes in grid[len(measures) :]:
            axes.set_visible(False)
        for axes in grid[::columns]:
            axes.set_ylabel("final test accuracy (%)")
        handles, labels = grid[0].get_legend_handles_labels()
        figure.legend(
            handles, labels, loc="outside lower center", ncols=min(len(labels), 6),
            markerscale=2, title="small: one run · large, outlined: the arm's mean",
            title_fontsize=7.5,
        )  # fmt: skip
        figure.suptitle(setting.plot_title, fontsize=9)
        _save(figure, path)
    plot.caption = (
        "Final test accuracy against each sharpness measure stored for the setting's runs "
        "(measured from the final weights on the training loss): small markers one run each, "
        "large outlined markers each arm's mean. In each panel, Spearman's rank correlation "
        "over all the measured runs pooled, with its two-sided p-value (exact up to 8 runs; "
        "not corrected for testing several measures)."
    )
    return plot


# --- landscape -------------------------------------------------------------------------------

LANDSCAPE_ZOOM = 0.2
"""The right panel of the landscape shows |α| ≤ this: the neighbourhood the optimizers saw."""


def plot_landscape(setting: Setting, path: Path) -> Plot | None:
    """The 1-D loss landscape of every measured seed of every arm (thin lines) and each arm's
    mean (thick): the whole range on a log axis, and the region near α = 0 on a linear one."""
    lines = landscapes(setting)
    if not lines:
        return None
    styles = arm_styles(setting)
    plot = Plot(path, "")
    with _figure(2) as figure:
        full, zoom = figure.subplots(1, 2)
        for label, by_seed in lines.items():
            style = styles[label]
            alphas = np.array(next(iter(by_seed.values()))["alphas"])
            same_grid = [
                np.array(line["losses"])
                for line in by_seed.values()
                if line["alphas"] == list(alphas)
            ]
            mean = np.mean(same_grid, axis=0)
            near = np.abs(alphas) <= LANDSCAPE_ZOOM + 1e-12
            for axes, keep in ((full, slice(None)), (zoom, near)):
                for line in by_seed.values():
                    axes.plot(
                        np.array(line["alphas"])[keep], np.array(line["losses"])[keep],
                        color=style.color, linewidth=0.7, alpha=0.35,
                    )  # fmt: skip
                axes.plot(
                    alphas[keep], mean[keep], color=style.color, linestyle=style.linestyle,
                    linewidth=1.8, label=f"{label} (n={len(by_seed)})",
                    marker=style.marker if axes is zoom else None, markersize=4,
                )  # fmt: skip
            plot.series[label] = {
                "alphas": alphas,
                "mean": mean,
                "seeds": {seed: np.array(line["losses"]) for seed, line in by_seed.items()},
            }
        axis_label = next(iter(next(iter(lines.values())).values()))["axis_label"]
        _log_axis(full)
        full.set(xlabel=axis_label, ylabel="training loss", title="whole slice (log scale)")
        zoom.set(
            xlabel=axis_label,
            ylabel="training loss",
            title=f"near the weights, |α| ≤ {LANDSCAPE_ZOOM:g}",
        )
        full.legend(loc="upper center", title="thick: mean · thin: each seed", title_fontsize=7.5)
        figure.suptitle(setting.plot_title, fontsize=9)
        _save(figure, path)
    examples = sorted({line["examples"] for s in lines.values() for line in s.values()})
    plot.caption = (
        "Training loss along one random filter-normalised direction through the final weights "
        "(α = 0; Li et al., 2018), the same random draw for every run, on "
        f"{', '.join(map(str, examples))} training examples with the labels trained on: thin "
        "lines one seed each, thick lines each arm's mean. Left: the whole slice on a log "
        "axis; right: the region near the weights on a linear axis."
    )
    return plot


# --- sharpness during training ------------------------------------------------------------


def plot_sharpness_during_training(setting: Setting, path: Path) -> Plot | None:
    """λ_max tracked during training per arm (mean over seeds, ±1 std band) against epoch, the
    base optimizer's stability threshold 2(1 + β)/η from the stored learning rate, and plain
    SAM's predicted edge of stability; ``None`` when no run of the setting tracked it."""
    tracked = tracked_sharpness(setting)
    if not tracked:
        return None
    styles = arm_styles(setting)
    plot = Plot(path, "")
    with _figure(1) as figure:
        figure.set_size_inches(PANEL_SIZE[0] + 1.8, PANEL_SIZE[1] + 0.6)
        axes = figure.subplots()
        drawn_values = []
        for curve in tracked:
            style = styles[curve.arm.label]
            mean = curve.values.mean(axis=0)
            spread = curve.values.std(axis=0, ddof=1) if len(curve.values) > 1 else 0 * mean
            low, high = mean - spread, mean + spread
            label = f"{curve.arm.label} (n={len(curve.seeds)})"
            axes.plot(
                curve.epochs, mean, color=style.color, linestyle=style.linestyle,
                marker=style.marker, markersize=3.5, label=label,
            )  # fmt: skip
            axes.fill_between(curve.epochs, low, high, color=style.color, alpha=0.15, lw=0)
            plot.series[f"λ_max: {curve.arm.label}"] = {
                "epoch": curve.epochs, "mean": mean, "low": low, "high": high,
                "seeds": curve.seeds,
            }  # fmt: skip
            drawn_values += list(curve.values.ravel())
            if curve.sam_edge is not None:
                edge = curve.sam_edge.mean(axis=0)
                axes.plot(
                    curve.epochs, edge, color=style.color, linestyle=(0, (1, 1.5)), linewidth=1.3,
                    label=f"{curve.arm.label}: predicted SAM edge",
                )  # fmt: skip
                plot.series[f"SAM edge: {curve.arm.label}"] = {"epoch": curve.epochs, "mean": edge}
        first = tracked[0]
        if first.threshold is not None:
            # At every epoch, not only the measured ones: the learning rate of each is stored
            # (the same in every run of the setting: one schedule).
            rates = np.array(first.arm.epochs[first.seeds[0]]["learning_rate"], dtype=float)
            momentum = setting.config.get("momentum") or 0.0
            threshold = np.array([stability_threshold(rate, momentum) for rate in rates])
            every_epoch = np.arange(1, len(rates) + 1)
            axes.plot(
                every_epoch, threshold, color=BASE_COLOR, linestyle="--", linewidth=1.2,
                label="stability threshold 2(1+β)/η",
            )  # fmt: skip
            plot.series["threshold"] = {"epoch": every_epoch, "values": threshold}
        positive = [value for value in drawn_values if value > 0]
        if positive:
            _log_axis(axes)
            # Under a cosine schedule η → 0 and the thresholds leave for infinity: keep the
            # measured curves readable and the thresholds visible where they bind.
            top = max(positive) * 4
            if first.threshold is not None:
                top = max(top, 1.3 * float(np.min(first.threshold)))
            axes.set_ylim(min(positive) / 2, top)
        axes.set(xlabel="epoch", ylabel="λ_max (training loss)", title=setting.plot_title)
        handles, labels = axes.get_legend_handles_labels()
        band = Patch(color="#888888", alpha=0.3, label="band: ±1 std over seeds")
        axes.legend([*handles, band], [*labels, band.get_label()], loc="best")
        _save(figure, path)
    momentum = setting.config.get("momentum") or 0.0
    threshold_words = (
        f" Dashed: the base optimizer's stability threshold 2(1 + β)/η with β = {momentum:g} "
        "and η each epoch's stored learning rate (a curve under a cosine schedule): on a "
        "quadratic, SGD with momentum diverges along any direction whose curvature exceeds it."
        if first.threshold is not None
        else " No threshold is drawn: the base optimizer is AdamW, whose preconditioned step has "
        "none in terms of λ_max."
    )
    sam_words = (
        " Dotted, in SAM's colour: SAM's predicted edge of stability (Agarwala & Dauphin, 2023), "
        "the λ with ηλ(1 + ρλ/‖g‖) = 2(1 + β), ‖g‖ the mean mini-batch gradient norm measured "
        "with λ_max (see the notes)."
        if any(curve.sam_edge is not None for curve in tracked)
        else ""
    )
    plot.caption = (
        "Largest Hessian eigenvalue λ_max of the training loss during training (Lanczos, at "
        "most 20 products, on a fixed subset of 512 training examples with the labels trained "
        "on, in eval mode), measured every N epochs and at the last (--track-sharpness N): "
        "mean over the seeds that did not diverge, band ±1 sample standard deviation; log "
        f"scale.{threshold_words}{sam_words}"
    )
    return plot


def sweep_file_name(name: str) -> str:
    return f"accuracy_vs_{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png"


def draw_all(
    setting: Setting,
    directory: Path,
    sweeps: dict[str, dict[str, list[Arm]]],
    chosen: Collection[str] = (),
) -> list[Plot]:
    """Every figure of a setting that has numbers to draw, in the report's order; the arms
    labelled in ``chosen`` are marked in the sweep plots."""
    plots: list[Plot | None] = [
        plot_curves(setting, directory / "curves.png"),
        plot_final_accuracy(setting, directory / "final_accuracy.png"),
        plot_accuracy_vs_cost(setting, directory / "accuracy_vs_cost.png"),
    ]
    plots += [
        plot_sweep(setting, name, lines, directory / sweep_file_name(name), chosen)
        for name, lines in sweeps.items()
    ]
    plots += [
        plot_sharpness(setting, directory / "accuracy_vs_sharpness.png"),
        plot_landscape(setting, directory / "landscape_1d.png"),
        plot_sharpness_during_training(setting, directory / "sharpness_during_training.png"),
    ]
    return [plot for plot in plots if plot is not None]
