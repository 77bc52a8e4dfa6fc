"""Worst-case and average m-sharpness, Euclidean and adaptive, against closed forms."""

from __future__ import annotations

import itertools
import math
from collections import namedtuple

import pytest
import torch
from sharpness_support import (
    QUADRATIC_BATCHES,
    Quadratic,
    classification_batches,
    cross_entropy,
    mlp,
    quadratic_loss,
    symmetric_with_spectrum,
)
from torch import nn

from flatminima.sharpness import average_sharpness, split_batch, worst_case_sharpness

SPECTRUM = [4.0, 1.5, 1.0, 0.5, 0.1, 0.0]  # convex: its minimum is a minimum
RHO = 0.3


def convex_quadratic(center: torch.Tensor | None = None) -> tuple[Quadratic, torch.Tensor]:
    matrix = symmetric_with_spectrum(SPECTRUM, seed=8)
    return Quadratic(matrix, center=center), matrix


def test_split_batch_structures() -> None:
    x, y = torch.arange(14.0).reshape(7, 2), torch.arange(7)
    parts = split_batch((x, y), 3)
    assert [len(p[0]) for p in parts] == [3, 3, 1] and isinstance(parts[0], tuple)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    parts = split_batch({"x": x, "y": [y, "label"], "scale": torch.tensor(2.0)}, 4)
    assert [len(p["x"]) for p in parts] == [4, 3]
    assert parts[1]["y"][1] == "label" and parts[1]["scale"].item() == 2.0
    Pair = namedtuple("Pair", "inputs targets")
    parts = split_batch(Pair(x, y), 7)
    assert len(parts) == 1 and isinstance(parts[0], Pair) and torch.equal(parts[0].targets, y)
    assert [len(p) for p in split_batch(x, 2)] == [2, 2, 2, 1]


@pytest.mark.parametrize(
    ("batch", "m", "message"),
    [
        ((torch.zeros(4), torch.zeros(5)), 2, "lengths"),
        ({"a": "text"}, 2, "no tensor"),
        (torch.zeros(4), 0, "m must be"),
    ],
)
def test_split_batch_rejects(batch, m: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_batch(batch, m)


def test_worst_case_at_a_minimum_is_half_rho_squared_lambda_max() -> None:
    model, _ = convex_quadratic()
    # At the exact minimum the gradient vanishes: the ascent starts from a random direction
    # and, with long steps, climbs to the top eigenvector.
    value = worst_case_sharpness(
        model, quadratic_loss, QUADRATIC_BATCHES, rho=RHO, steps=60, step_size=10 * RHO
    )
    expected = 0.5 * RHO**2 * max(SPECTRUM)
    assert value == pytest.approx(expected, rel=1e-9)


def test_worst_case_is_a_lower_bound_that_grows_with_steps() -> None:
    model, _ = convex_quadratic()
    values = [
        worst_case_sharpness(model, quadratic_loss, QUADRATIC_BATCHES, rho=RHO, steps=s)
        for s in (0, 1, 3, 10)
    ]
    bound = 0.5 * RHO**2 * max(SPECTRUM)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]
    assert values[-1] <= bound * (1 + 1e-12)
    assert values[-1] >= 0.9 * bound  # the default step size gets close in a few steps


@pytest.mark.parametrize("relative_step", [0.01, 1.0, 10.0])
def test_two_ascent_points_follow_the_definition(relative_step: float) -> None:
    # Away from the minimum the start is the gradient direction, so both points are known:
    # δ₀ = ρ ĝ(w), δ₁ = Π_ρ(δ₀ + s ĝ(w + δ₀)); the result is the better of the two.
    matrix = symmetric_with_spectrum(SPECTRUM, seed=8)
    start = torch.tensor([0.2, -0.1, 0.05, 0.3, -0.2, 0.1], dtype=torch.float64)
    model = Quadratic(matrix, start=start)

    def loss(w: torch.Tensor) -> float:
        return float(0.5 * w @ matrix @ w)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm()

    delta0 = RHO * unit(matrix @ start)
    delta1 = delta0 + relative_step * RHO * unit(matrix @ (start + delta0))
    delta1 = delta1 * min(1.0, RHO / float(delta1.norm()))
    expected = max(loss(start + delta0), loss(start + delta1)) - loss(start)
    value = worst_case_sharpness(
        model, quadratic_loss, QUADRATIC_BATCHES, rho=RHO, steps=1, step_size=relative_step * RHO
    )
    assert value == pytest.approx(expected, rel=1e-12)
    assert value > loss(start + delta0) - loss(start)  # the step did climb


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_adaptive_worst_case_closed_form(eta: float) -> None:
    center = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.5, 0.75], dtype=torch.float64)
    model, matrix = convex_quadratic(center)
    # With ε = T δ, T = diag(|w| + η), the problem is Euclidean in δ with Hessian TAT.
    t = torch.diag(center.abs() + eta)
    expected = 0.5 * RHO**2 * float(torch.linalg.eigvalsh(t @ matrix @ t).max())
    value = worst_case_sharpness(
        model,
        quadratic_loss,
        QUADRATIC_BATCHES,
        rho=RHO,
        metric="adaptive",
        eta=eta,
        steps=80,
        step_size=10 * RHO,
    )
    assert value == pytest.approx(expected, rel=1e-9)


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def rescaled(model: nn.Module, scale: torch.Tensor) -> nn.Module:
    """Hidden unit i scaled by scale_i in, 1/scale_i out: the same function (ReLU)."""
    other = relu_net()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(scale[:, None])
        other[0].bias.mul_(scale)
        other[2].weight.div_(scale[None, :])
    return other


def test_adaptive_sharpness_is_invariant_to_relu_rescaling() -> None:
    model, batches = relu_net(), classification_batches()
    other = rescaled(model, torch.linspace(0.2, 5.0, 8, dtype=torch.float64))
    x, _ = batches[0]
    torch.testing.assert_close(model(x), other(x))
    kwargs = {"rho": 0.5, "steps": 3, "metric": "adaptive"}
    adaptive = [worst_case_sharpness(n, cross_entropy, batches, **kwargs) for n in (model, other)]
    assert adaptive[0] == pytest.approx(adaptive[1], rel=1e-9)
    average = [
        average_sharpness(n, cross_entropy, batches, rho=0.5, metric="adaptive")
        for n in (model, other)
    ]
    assert average[0] == pytest.approx(average[1], rel=1e-9)
    euclidean = [worst_case_sharpness(n, cross_entropy, batches, rho=0.5) for n in (model, other)]
    assert abs(euclidean[0] - euclidean[1]) > 0.01 * euclidean[0]


def linear_regression(n: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=generator, dtype=torch.float64))
        model.bias.fill_(0.3)
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    return model, x, y


def squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square().mean()


def test_one_sharpness_closed_form_and_larger_than_full_batch() -> None:
    model, x, y = linear_regression()
    # One example: max_{‖ε‖≤ρ} ½(r + ε·z)² − ½r² = ρ|r|‖z‖ + ½ρ²‖z‖², z = (x, 1), reached
    # exactly by the first (gradient-direction) point.
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        r = model(x).squeeze(-1) - y
    norms = z.norm(dim=1)
    expected = float((RHO * r.abs() * norms + 0.5 * RHO**2 * norms**2).mean())
    for steps in (0, 4):
        one = worst_case_sharpness(model, squared_error, [(x, y)], rho=RHO, m=1, steps=steps)
        assert one == pytest.approx(expected, rel=1e-12)
    pre_split = worst_case_sharpness(
        model, squared_error, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))], rho=RHO
    )
    assert pre_split == pytest.approx(expected, rel=1e-12)
    # One perturbation for the whole batch cannot do better than one per example.
    whole = worst_case_sharpness(model, squared_error, [(x, y)], rho=RHO, steps=20)
    four = worst_case_sharpness(model, squared_error, [(x, y)], rho=RHO, m=4, steps=20)
    assert whole < four < expected


def average_bound(matrix: torch.Tensor, num_pairs: int) -> float:
    """5σ for the mean of N pairs of ½δᵀBδ, δ ~ N(0, ρ²/d I): Var = ½σ⁴tr(B²)."""
    sigma2 = RHO**2 / matrix.shape[0]
    variance = 0.5 * sigma2**2 * float((matrix @ matrix).trace())
    return 5 * math.sqrt(variance / num_pairs)


@pytest.mark.parametrize("metric", ["euclidean", "adaptive"])
def test_average_at_a_minimum_matches_closed_form_within_five_sigma(metric: str) -> None:
    center = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.5, 0.75], dtype=torch.float64)
    model, matrix = convex_quadratic(center)
    if metric == "adaptive":
        t = torch.diag(center.abs())
        matrix = t @ matrix @ t
    expected = 0.5 * RHO**2 * float(matrix.trace()) / matrix.shape[0]
    num_samples = 2000
    value = average_sharpness(
        model, quadratic_loss, QUADRATIC_BATCHES, rho=RHO, metric=metric, num_samples=num_samples
    )
    tolerance = average_bound(matrix, num_samples)
    assert tolerance < 0.2 * expected  # the bound is tight enough to mean something
    assert abs(value - expected) <= tolerance


def test_antithetic_pairs_cancel_the_gradient_term() -> None:
    # Away from the minimum: a plain average of L(w+δ) − L(w) would carry gᵀδ noise; the
    # pairs leave exactly ½δᵀAδ, so the estimate is as accurate as at the minimum.
    matrix = symmetric_with_spectrum(SPECTRUM, seed=8)
    far = Quadratic(matrix, start=torch.full((6,), 30.0, dtype=torch.float64))
    at_min = Quadratic(matrix)
    kwargs = {"rho": RHO, "num_samples": 5}
    assert average_sharpness(far, quadratic_loss, QUADRATIC_BATCHES, **kwargs) == pytest.approx(
        average_sharpness(at_min, quadratic_loss, QUADRATIC_BATCHES, **kwargs), rel=1e-9
    )


def test_sub_batches_are_averaged_with_equal_weight() -> None:
    model, batches = mlp(), classification_batches(num_batches=2, batch_size=8)
    halves = [half for batch in batches for half in split_batch(batch, 4)]
    for measure in (worst_case_sharpness, average_sharpness):
        by_m = measure(model, cross_entropy, batches, rho=0.1, m=4)
        assert by_m == pytest.approx(measure(model, cross_entropy, halves, rho=0.1), rel=1e-12)
        per_part = [measure(model, cross_entropy, [h], rho=0.1) for h in halves]
        if measure is worst_case_sharpness:  # deterministic: the mean of the parts exactly
            assert by_m == pytest.approx(sum(per_part) / 4, rel=1e-12)


def test_rho_zero_is_zero() -> None:
    model, batches = mlp(), classification_batches(1)
    assert worst_case_sharpness(model, cross_entropy, batches, rho=0.0) == 0.0
    assert average_sharpness(model, cross_entropy, batches, rho=0.0, metric="adaptive") == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": math.nan}, "rho"),
        ({"rho": 0.1, "m": 0}, "m must be"),
        ({"rho": 0.1, "metric": "l1"}, "metric"),
        ({"rho": 0.1, "metric": "adaptive", "eta": -1.0}, "eta"),
        ({"rho": 0.1, "eta": 0.1}, "eta applies"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    model, batches = mlp(), classification_batches(1)
    for measure in (worst_case_sharpness, average_sharpness):
        with pytest.raises(ValueError, match=message):
            measure(model, cross_entropy, batches, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": -1}, "steps"), ({"step_size": 0.0}, "step_size"), ({"steps": 1.5}, "steps")],
)
def test_bad_ascent_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        worst_case_sharpness(mlp(), cross_entropy, classification_batches(1), rho=0.1, **kwargs)


def test_bad_num_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        average_sharpness(mlp(), cross_entropy, classification_batches(1), rho=0.1, num_samples=0)
