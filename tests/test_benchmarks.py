"""The benchmark's bookkeeping on a tiny workload: which rows run, the passes a row is
credited with (the optimizer's own compute accounting, not its closure calls), the memory of
a method's persistent state, and how the report judges the targets. No timing is asserted."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report
from benchmarks.__main__ import FULL, QUICK, _method_names, estimate_seconds
from benchmarks.contenders import contenders, memory_contenders, select
from benchmarks.memory import measure
from benchmarks.timing import time_interleaved
from benchmarks.workloads import Workload

BATCH = 16


def tiny_workload() -> Workload:
    def build_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
        )

    def build_batch() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, 32, generator=generator)
        return x, torch.randint(0, 10, (BATCH,), generator=generator)

    return Workload("tiny", "tiny MLP", build_model, build_batch, F.cross_entropy)


def test_a_method_filter_keeps_the_reference_rows_and_the_methods_peers():
    rows = select(contenders(), {"sam", "looksam"})
    kinds = {row.key: row.kind for row in rows}
    assert kinds["passes"] == "passes" and kinds["base"] == "base"
    assert {row.method for row in rows} == {"passes", "sgd", "sam", "looksam"}
    assert "flatminima:sam" in kinds and "naive:sam" in kinds and "flatminima:looksam" in kinds
    assert select(contenders(), None) == contenders()


def test_an_unknown_method_name_is_a_one_line_error_listing_the_accepted():
    assert _method_names("gsam, wsam") == {"gsam", "wsam"}
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown method\(s\) nope; accepted: "):
        _method_names("sam,nope")


def test_the_estimate_grows_with_rows_and_rounds():
    full = estimate_seconds(FULL, ["W1-resnet20", "W2-wide"], None)
    assert estimate_seconds(FULL, ["W1-resnet20", "W2-wide"], {"sam"}) < full
    assert estimate_seconds(QUICK, ["W1-resnet20", "W2-wide"], None) < full


def test_passes_are_the_compute_the_optimizer_counted_not_its_closure_calls():
    keys = {"passes", "base", "flatminima:msam", "flatminima:looksam", "flatminima:esam"}
    rows = [row for row in contenders(peers=False) if row.key in keys]
    timings = time_interleaved(tiny_workload(), rows, rounds=2, warmup=1)
    assert timings["base"].passes == 1.0 and timings["base"].forward is None
    # Micro-batch SAM: 8 closure calls, each on a quarter of the batch: 2 passes.
    msam = timings["flatminima:msam"]
    assert (msam.forward, msam.backward, msam.passes) == pytest.approx((2.0, 2.0, 2.0))
    # LookSAM (k = 5): one SAM step and four single-pass steps per timed cycle.
    assert timings["flatminima:looksam"].passes == pytest.approx(1.2)
    # ESAM (γ = 0.5): a full pass, a forward-only probe, and the perturbed pass on the
    # k − 1 = 7 examples of 16 whose loss rose most (the authors' strict selection).
    esam = timings["flatminima:esam"]
    selected = (BATCH // 2 - 1) / BATCH
    assert esam.forward == pytest.approx(2.0 + selected)
    assert esam.backward == pytest.approx(1.0 + selected)
    assert esam.passes == pytest.approx((2.0 + selected + 2 * (1.0 + selected)) / 3)
    assert esam.as_dict()["passes"] == esam.passes


def test_the_memory_report_counts_a_mask_learnt_before_the_measured_steps():
    (row,) = [c for c in memory_contenders() if c.key == "flatminima:sparse-sam"]
    result = measure(row, tiny_workload(), steps=2)
    # The mask is learnt when the row is built (outside the tracker): the tracker does not see
    # it, the state measure does: at most a byte per float32 weight (less when bit-packed).
    assert result.between_steps == pytest.approx(0.0, abs=1e-3)
    assert 0.0 < result.state <= 1 / 4 + 1e-9
    assert report._peak_with_state(asdict(result)) == pytest.approx(result.peak + result.state)


def _results(ratios: dict[str, float], memory: dict[str, dict[str, float]]) -> dict:
    def timing(ratio: float) -> dict:
        spread = {"median": ratio, "q1": ratio, "q3": ratio}
        return {
            "ratio_to_base": spread,
            "step_s": spread,
            "overhead_s": spread,
            "beyond_base_s": spread,
            "samples": 1,
            "passes": 2.0,
        }

    keys = set(ratios) | set(memory)
    return {
        "contenders": {key: {"label": key, "kind": "flatminima", "passes": 2} for key in keys},
        "workloads": {
            "W1-resnet20": {
                "timing": {key: timing(r) for key, r in ratios.items()},
                "memory": memory,
            },
        },
    }


def test_the_report_judges_the_step_and_state_targets_and_only_reports_esam():
    results = _results(
        {"flatminima:momentum-sam": 1.03, "flatminima:bilateral-sam": 3.2, "flatminima:esam": 1.52},
        {
            "flatminima:sparse-sam": {
                "peak": 1.0,
                "during_passes": 1.0,
                "between_steps": 0.0,
                "state": 0.25,
            }
        },
    )
    rows = {target: verdict for target, _, verdict in report._targets(results)}
    verdicts = {
        key: v
        for target, v in rows.items()
        for key in results["contenders"]
        if target.startswith(f"W1: {key} ")
    }
    assert verdicts["flatminima:momentum-sam"] == "met"
    assert verdicts["flatminima:bilateral-sam"].startswith("**not met**")
    assert verdicts["flatminima:esam"] == "measured"
    state = [v for t, v in rows.items() if t.startswith("persistent state of flatminima:sparse")]
    assert state == ["**not met** (+0.125 P)"]
    # The mask learnt before the tracker started is added to the tracker's peak.
    peak = [v for t, v in rows.items() if t.startswith("extra memory of flatminima:sparse")]
    assert len(peak) == 1
