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
from flatminima.step import Cost


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
    passes: float
    """Forward/backward passes per optimizer step in whole-batch units, averaged over the
    timed steps: the compute the optimizer counted (a backward weighs two forwards, see
    :class:`flatminima.step.Cost`) where it counts it, else the contender's closure calls."""
    forward: float | None = None
    """Forward passes per step in whole batches, as the optimizer counted them (or ``None``)."""
    backward: float | None = None
    """Backward passes per step in whole batches, as the optimizer counted them (or ``None``)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "step_s": self.step.as_dict(),
            "ratio_to_base": self.ratio_to_base.as_dict(),
            "overhead_s": self.overhead.as_dict(),
            "beyond_base_s": self.beyond_base.as_dict(),
            "samples": self.samples,
            "passes": self.passes,
            "forward": self.forward,
            "backward": self.backward,
        }


def _counted(prepared: Prepared) -> tuple[float, float] | None:
    """(forward, backward) the optimizer counted so far, or ``None`` if it does not count."""
    if prepared.cost is None:
        return None
    cost = prepared.cost()
    return cost.forward, cost.backward


def time_interleaved(
    workload: Workload,
    contenders: Sequence[Contender],
    *,
    rounds: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, TimingResult]:
    """Times ``rounds`` interleaved steps of every contender after ``warmup`` untimed rounds.

    ``contenders`` must include the ``passes`` and ``base`` rows: every other row is measured
    against them. ``clock``: wall time by default (what a user waits); ``time.thread_time``
    (this thread's CPU time) moves far less on a machine shared with other work, for
    comparisons during development.
    """
    keys = [c.key for c in contenders]
    if "passes" not in keys or "base" not in keys:
        raise ValueError("the contenders must include 'passes' and 'base'")
    prepared: list[Prepared] = [c.build(workload, NoHooks()) for c in contenders]
    times: dict[str, list[float]] = {key: [] for key in keys}
    counted_before: list[tuple[float, float] | None] = [None] * len(prepared)
    for round_index in range(warmup + rounds):
        if round_index == warmup:
            counted_before = [_counted(p) for p in prepared]
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
    for contender, built, before in zip(contenders, prepared, counted_before, strict=True):
        own = times[contender.key]
        rounds_ = list(zip(own, base, passes, strict=True))
        forward = backward = None
        per_step = contender.passes
        after = _counted(built)
        if before is not None and after is not None and rounds > 0:
            steps = rounds * built.steps_per_call
            forward = (after[0] - before[0]) / steps
            backward = (after[1] - before[1]) / steps
            per_step = Cost(forward, backward).passes
        results[contender.key] = TimingResult(
            step=Spread.of(own),
            ratio_to_base=Spread.of([t / b for t, b, _ in rounds_]),
            overhead=Spread.of([t - per_step * p for t, _, p in rounds_]),
            beyond_base=Spread.of([(t - per_step * p) - (b - p) for t, b, p in rounds_]),
            samples=len(own),
            passes=per_step,
            forward=forward,
            backward=backward,
        )
    return results
