"""Same-process A/B of a method's step on W2-wide: its fast path against the parts it had
before (Friendly SAM, :mod:`flatminima.methods.friendly_sam`: the EMA committed by the ball,
against ``FriendlyDirection`` then ``EuclideanBall``), and both against the base SGD step.
A new fast path adds its method and original parts to :data:`ORIGINAL_PARTS`.

    python -m benchmarks.perf_ab --method friendly-sam --rounds 100

Interleaved rounds in a rotating order, one step of each per round; ratios are paired within
a round, then the median is taken. Thread CPU time (``time.thread_time``) by default: on a
shared machine it moves far less than wall time, though memory-bandwidth contention from
other processes still reaches it. Also checks that both models' weights stay bit for bit
equal, which is the point of the fast path. For development, not for publication.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.contenders import BASE_HYPERPARAMETERS, NoHooks, Prepared, _build_base, setup
from benchmarks.workloads import WORKLOADS, Workload
from flatminima.directions import FriendlyDirection
from flatminima.neighborhoods import EuclideanBall
from flatminima.registry import METHODS

ORIGINAL_PARTS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "friendly-sam": lambda: (FriendlyDirection(), EuclideanBall()),
}


def _build(method: str, workload: Workload, *, original_parts: bool = False) -> Prepared:
    """The method at its defaults on the workload, as the benchmark builds it; with
    ``original_parts``, stepping with the parts it had before its fast path."""
    built = setup(workload, NoHooks())
    base = torch.optim.SGD(built.params, **BASE_HYPERPARAMETERS, foreach=True)
    optimizer: Any = METHODS[method].build(base, model=built.model)
    if original_parts:
        optimizer.direction, optimizer.neighborhood = ORIGINAL_PARTS[method]()
    closure = built.closure
    return Prepared(lambda: optimizer.step(closure) and None, built.params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_ab", description=__doc__)
    parser.add_argument("--method", choices=sorted(ORIGINAL_PARTS), default="friendly-sam")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--wall", action="store_true", help="wall time instead of thread time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    clock = time.perf_counter if args.wall else time.thread_time

    workload = WORKLOADS["W2-wide"]
    original = _build(args.method, workload, original_parts=True)
    fast = _build(args.method, workload)
    base = _build_base(workload, NoHooks())
    steps = {"original": original.step, "fast": fast.step, "base": base.step}
    times: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    warmup = 3
    for round_index in range(warmup + args.rounds):
        gc.collect()
        gc.disable()
        try:
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                start = clock()
                steps[key]()
                elapsed = clock() - start
                if round_index >= warmup:
                    times[key].append(elapsed)
        finally:
            gc.enable()

    equal = all(torch.equal(a, b) for a, b in zip(original.params, fast.params, strict=True))
    print(f"{args.method}: weights bit for bit equal after {warmup + args.rounds} steps: {equal}")
    for key in keys:
        ratios = [t / b for t, b in zip(times[key], times["base"], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        step_ms = statistics.median(times[key]) * 1e3
        print(f"  {key:9s} step {step_ms:7.2f} ms  / base {median:.3f} [{q1:.3f}-{q3:.3f}]")
    paired = [f / o for f, o in zip(times["fast"], times["original"], strict=True)]
    q1, median, q3 = statistics.quantiles(paired, n=4, method="inclusive")
    print(f"  fast / original, paired: {median:.4f} [{q1:.4f}-{q3:.4f}]")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
