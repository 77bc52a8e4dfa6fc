"""measure_sharpness: the named scalars the runner stores, consistent with the parts."""

from __future__ import annotations

import math
import time

import pytest
import torch
from sharpness_support import (
    QUADRATIC_BATCHES,
    Quadratic,
    classification_batches,
    cross_entropy,
    mlp,
    quadratic_loss,
)
from torch import nn
from torch.nn import functional as F

from flatminima import sharpness

KEYS = {
    "loss",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_trace_stderr",
    "worst_case_sharpness",
    "average_sharpness",
    "adaptive_worst_case_sharpness",
    "adaptive_average_sharpness",
}


def test_keys_and_values_agree_with_the_individual_measurements() -> None:
    model, batches = mlp(), classification_batches()
    result = sharpness.measure_sharpness(
        model, cross_entropy, batches, rho=0.1, average_rho=0.1, m=8, seed=3
    )
    assert set(result) == KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
    common = {"seed": 3}
    with torch.no_grad():
        assert result["loss"] == sum(float(cross_entropy(model, b)) for b in batches) / 3
    assert result["hessian_top_eigenvalue"] == float(
        sharpness.hessian_eigenvalues(
            model, cross_entropy, batches, max_iter=30, tol=1e-3, **common
        )[0]
    )
    trace = sharpness.hessian_trace_estimate(model, cross_entropy, batches, num_probes=10, **common)
    assert result["hessian_trace"] == trace.value
    assert result["hessian_trace_stderr"] == trace.standard_error
    assert result["worst_case_sharpness"] == sharpness.worst_case_sharpness(
        model, cross_entropy, batches, rho=0.1, m=8, steps=5, **common
    )
    assert result["adaptive_average_sharpness"] == sharpness.average_sharpness(
        model, cross_entropy, batches, rho=5.0, m=8, metric="adaptive", num_samples=4, **common
    )
    assert result["adaptive_worst_case_sharpness"] == sharpness.worst_case_sharpness(
        model, cross_entropy, batches, rho=0.5, m=8, metric="adaptive", steps=5, **common
    )
    # The worst case over a ball dominates the average over the same radius.
    assert result["worst_case_sharpness"] > result["average_sharpness"]


def test_top_k_adds_numbered_eigenvalues_in_descending_order() -> None:
    diagonal = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    result = sharpness.measure_sharpness(
        Quadratic(torch.diag(diagonal)), quadratic_loss, QUADRATIC_BATCHES, top_k=3
    )
    assert set(result) == KEYS | {"hessian_eigenvalue_2", "hessian_eigenvalue_3"}
    values = [
        result[k]
        for k in ("hessian_top_eigenvalue", "hessian_eigenvalue_2", "hessian_eigenvalue_3")
    ]
    assert values == pytest.approx([5.0, 3.0, 2.0], rel=1e-10)
    assert result["hessian_trace"] == pytest.approx(11.5, rel=1e-14)
    # A lower bound of the true maximum ½ρ²λ_max, close to it after the default 5 steps.
    bound = 0.5 * 0.05**2 * 5.0
    assert 0.95 * bound < result["worst_case_sharpness"] <= bound * (1 + 1e-12)
    assert result["loss"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -1.0}, "rho"),
        ({"adaptive_rho": -1.0}, "adaptive_rho"),
        ({"average_rho": -1.0}, "average_rho"),
        ({"adaptive_average_rho": -1.0}, "adaptive_average_rho"),
        ({"top_k": 0}, "top_k"),
        ({"num_probes": 0}, "num_probes"),
        ({"num_samples": 0}, "num_samples"),
        ({"max_iter": 0}, "max_iter"),
        ({"m": 0}, "m must be"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sharpness.measure_sharpness(mlp(), cross_entropy, classification_batches(1), **kwargs)


@pytest.mark.slow
def test_default_budget_takes_seconds_on_a_20k_parameter_model() -> None:
    """The budget the runner relies on: ~20k parameters, 4,096 examples, one CPU thread."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 40), nn.ReLU(), nn.Linear(40, 10)
    )
    assert 18_000 < sum(p.numel() for p in model.parameters()) < 22_000
    x, y = torch.randn(4096, 40), torch.randint(0, 10, (4096,))
    batches = list(zip(x.split(512), y.split(512), strict=True))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        result = sharpness.measure_sharpness(model, loss_fn, batches, m=128)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert set(result) == KEYS
    assert elapsed < 30.0, f"measure_sharpness took {elapsed:.1f} s"
