"""The saddle study's figure (:mod:`flatminima.experiments.saddle`): median escape step against
ρ, one panel per loss scale, in the report's style and method colours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from flatminima.experiments.plots import STYLE, method_color
from flatminima.experiments.saddle import METHOD_TITLES, ScaleSummary


def plot_escape_steps(summaries: Sequence[ScaleSummary], budget: int, path: Path) -> None:
    """Median escape step with its bootstrap interval for SAM and Monge SAM against ρ (log-log),
    SGD's as a band; a median beyond the budget is drawn on the budget line, a triangle where
    most runs were held by the saddle, a cross where most diverged."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.6 * len(summaries), 3.3), layout="constrained")
        panels = figure.subplots(1, len(summaries), squeeze=False, sharey=True)[0]
        for axes, summary in zip(panels, summaries, strict=True):
            sgd = next(arm for arm in summary.arms if arm.method == "base")
            axes.axhspan(sgd.median.low, min(sgd.median.high, budget), color="#444444", alpha=0.15)
            axes.axhline(sgd.median.value, color=method_color("base"), lw=1.2, label="SGD")
            axes.axhline(budget, color="#999999", ls="--", lw=0.8, label=f"budget ({budget})")
            for method, offset in (("sam", 0.96), ("monge-sam", 1.04)):
                arms = [arm for arm in summary.arms if arm.method == method]
                rhos = [arm.rho * offset for arm in arms]  # side by side, not on top
                medians = [min(arm.median.value, budget) for arm in arms]
                lows = [min(arm.median.low, budget) for arm in arms]
                highs = [min(arm.median.high, budget) for arm in arms]
                color = method_color(method)
                axes.errorbar(
                    rhos,
                    medians,
                    yerr=[
                        [m - lo for m, lo in zip(medians, lows, strict=True)],
                        [h - m for m, h in zip(medians, highs, strict=True)],
                    ],
                    color=color,
                    marker="o",
                    capsize=2,
                    label=METHOD_TITLES[method],
                )
                # Beyond the budget: held by the saddle (triangle) or diverged (cross).
                for marker, label, diverged in (("^", "held", False), ("X", "diverged", True)):
                    points = [
                        (rho, budget)
                        for rho, arm in zip(rhos, arms, strict=True)
                        if math.isinf(arm.median.value)
                        and (2 * arm.diverged > arm.runs) == diverged
                    ]
                    if points:
                        axes.plot(
                            *zip(*points, strict=True),
                            marker,
                            color=color,
                            markersize=8,
                            label=f"{METHOD_TITLES[method]}: median > budget, {label}",
                        )
            axes.set_xscale("log")
            axes.set_yscale("log")
            # Plain numbers; minor ticks labelled at 2 and 5 × 10^k only, as in the report.
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.yaxis.set_minor_formatter(
                FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.1e}"[0] in "25" else "")
            )
            axes.set(xlabel="ρ", title=f"loss scale k = {summary.loss_scale:g}")
        panels[0].set_ylabel("median escape step")
        legend = {}
        for axes in panels:  # one entry per label over all panels
            for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        legend = {("SGD median, 95% interval" if k == "SGD" else k): h for k, h in legend.items()}
        figure.legend(legend.values(), legend.keys(), loc="outside right upper")
        figure.savefig(path, format="png")
