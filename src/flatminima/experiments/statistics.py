"""The statistics of a report: means with their intervals, paired differences, rank
correlations. Pure NumPy and ``scipy.special`` (far lighter than ``scipy.stats``): nothing here
knows about runs, arms or plots.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtr, stdtrit

CONFIDENCE = 0.95
"""The level of every interval the report gives."""


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
        # stdtrit is Student's t quantile function.
        quantile = float(stdtrit(len(array) - 1, 0.5 + CONFIDENCE / 2))
        half_width = quantile * float(array.std(ddof=1)) / math.sqrt(len(array))
        return cls(mean, mean - half_width, mean + half_width, len(array))

    @property
    def has_bounds(self) -> bool:
        return self.n >= 2

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

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. a fraction in percent)."""
        return Interval(factor * self.mean, factor * self.low, factor * self.high, self.n)


def interval_per_column(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the rows of ``values`` (seeds × epochs, say) and its Student-t 95% interval,
    column by column; with one row the bounds are the mean."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    if len(values) < 2:
        return mean, mean.copy(), mean.copy()
    quantile = float(stdtrit(len(values) - 1, 0.5 + CONFIDENCE / 2))
    half = quantile * values.std(axis=0, ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(mine: Mapping[int, float], theirs: Mapping[int, float]) -> Interval | None:
    """Mean and 95% interval of ``mine − theirs`` over the keys (seeds) both have; ``None``
    when they share none."""
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    return Interval.of([mine[key] - theirs[key] for key in common])


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (``ddof=1``); ``nan`` for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has a cost at most as high and an
    accuracy at least as high with one of them strictly better. ``points`` are ``(cost,
    accuracy)``; points with a ``nan`` are never on the front. Sorted by cost."""
    finite = [i for i, (cost, value) in enumerate(points) if math.isfinite(cost + value)]
    front = [
        i
        for i in finite
        if not any(
            points[j][0] <= points[i][0]
            and points[j][1] >= points[i][1]
            and (points[j][0] < points[i][0] or points[j][1] > points[i][1])
            for j in finite
        )
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))
