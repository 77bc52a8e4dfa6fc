"""Interleaved step timing: every contender steps once per round, in a rotating order.

Timing on a shared two-core machine drifts (other processes, frequency changes, the memory
bus). Two things keep that drift out of the comparisons:

* **interleaving** — one round runs one step of every contender, so slow stretches hit all of
  them alike; the order rotates from round to round so no contender always follows the same
  neighbour (cache state) or sits first after a pause;
* **pairing** — ratios and overheads are formed *within* a round (this contender's step
  against the base step and the pass timed alone in the same round) before the median is
  taken across rounds, instead of dividing two medians taken at different moments.

Python's garbage collector is paused during a round and run between rounds, so a collection
lands on no contender's clock.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.contenders import Contender, NoHooks, Prepared
from benchmarks.workloads import Workload


@dataclass
class Spread:
    """Median and interquartile range of a sample."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, q1, q3)

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3}


@dataclass
class TimingResult:
    """One contender's timings on one workload (seconds, and ratios)."""

    step: Spread
    ratio_to_base: Spread
    """This step / the base optimizer's step of the same round."""
    overhead: Spread
    """This step − passes × the pass timed alone in the same round: the optimizer's own time,
    the base optimizer's step included."""
    beyond_base: Spread
    """The overhead minus the base step's own overhead in the same round: what the
    sharpness-aware part adds to the base optimizer's arithmetic."""
    samples: int


def time_interleaved(
    workload: Workload,
    contenders: Sequence[Contender],
    *,
    rounds: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, TimingResult]:
    """Times ``rounds`` interleaved steps of every contender after ``warmup`` untimed rounds.

    ``contenders`` must include the ``passes`` and ``base`` rows: every other row is measured
    against them.
    """
    keys = [c.key for c in contenders]
    if "passes" not in keys or "base" not in keys:
        raise ValueError("the contenders must include 'passes' and 'base'")
    prepared: list[Prepared] = [c.build(workload, NoHooks()) for c in contenders]
    times: dict[str, list[float]] = {key: [] for key in keys}
    clock = time.perf_counter
    for round_index in range(warmup + rounds):
        shift = round_index % len(contenders)
        order = list(range(shift, len(contenders))) + list(range(shift))
        measured: dict[str, float] = {}
        gc.collect()
        gc.disable()
        try:
            for index in order:
                step = prepared[index].step
                start = clock()
                step()
                measured[keys[index]] = (clock() - start) / prepared[index].steps_per_call
        finally:
            gc.enable()
        if round_index >= warmup:
            for key, value in measured.items():
                times[key].append(value)
        if progress is not None:
            if round_index < warmup:
                progress(f"{workload.name}: warm-up round {round_index + 1}/{warmup}")
            else:
                progress(f"{workload.name}: round {round_index - warmup + 1}/{rounds}")

    passes, base = times["passes"], times["base"]
    results = {}
    for contender in contenders:
        own = times[contender.key]
        rounds_ = list(zip(own, base, passes, strict=True))
        results[contender.key] = TimingResult(
            step=Spread.of(own),
            ratio_to_base=Spread.of([t / b for t, b, _ in rounds_]),
            overhead=Spread.of([t - contender.passes * p for t, _, p in rounds_]),
            beyond_base=Spread.of(
                [(t - contender.passes * p) - (b - p) for t, b, p in rounds_]
            ),
            samples=len(own),
        )
    return results
