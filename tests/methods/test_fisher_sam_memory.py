"""Fisher SAM's extra memory on a model made only of small tensors, in copies of its parameters
(P), measured with the benchmarks' allocation tracker (every ATen allocation, exactly): the
engine's backup, 1 P, and nothing of the same order beside it. Issue 9's target is 1 P; with
one foreach list over every small tensor the preconditioning held 3 P (f, u and g·u at once)."""

from __future__ import annotations

import itertools

import pytest

from flatminima import FisherSAM, kernels
from support import parameter_copies_held

HIDDEN = (24,) * 11
"""An MLP 32 → 24 (×11) → 10: 7 k parameters in 24 tensors, the largest 768 entries (11 % of
the model), all on the kernels' small-tensor path."""

SCALARS = 0.05
"""Allowance for 0-d temporaries (norms, the sum gᵀF⁻¹g), in P, on this small model."""


def test_fisher_sam_holds_one_copy_on_a_model_of_small_tensors():
    held = parameter_copies_held("fisher-sam", {"rho": 0.1, "eta": 1.0}, steps=2, hidden=HIDDEN)
    assert FisherSAM.memory_copies == 1.0
    assert held.peak == pytest.approx(1.0, abs=SCALARS)
    assert held.during_passes == pytest.approx(1.0, abs=SCALARS)
    assert held.between_steps == 0.0


def test_the_probe_model_is_made_of_small_tensors():
    """Guards the test above: a tensor on the chunked path would not exercise the batches."""
    widths = [32, *HIDDEN, 10]
    sizes = [a * b for a, b in itertools.pairwise(widths)]
    assert max(sizes) < kernels.FUSED_MIN_NUMEL
