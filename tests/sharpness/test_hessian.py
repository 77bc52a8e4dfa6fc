"""Hessian-vector products, top eigenpairs, Hutchinson's trace and SLQ against exact answers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from sharpness_support import (
    QUADRATIC_BATCHES,
    Quadratic,
    classification_batches,
    cross_entropy,
    full_hessian,
    mlp,
    quadratic_loss,
    rademacher_std,
    symmetric_with_spectrum,
)

from flatminima.sharpness import (
    hessian_eigenpairs,
    hessian_eigenvalues,
    hessian_trace,
    hessian_trace_estimate,
    hessian_vector_product,
    spectral_density,
)

# An indefinite spectrum: a saddle, with the largest magnitude on the negative side.
INDEFINITE = [3.0, 2.0, 1.0, 0.5, 0.0, -0.25, -10.0]


def exact_top(matrix: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]


def test_hvp_on_quadratic_is_the_matrix_product() -> None:
    matrix = symmetric_with_spectrum(INDEFINITE)
    model = Quadratic(matrix, start=torch.linspace(-1, 1, 7, dtype=torch.float64))
    v = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (hv,) = hessian_vector_product(model, quadratic_loss, QUADRATIC_BATCHES, [v])
    torch.testing.assert_close(hv, matrix @ v, rtol=1e-13, atol=1e-13)


def test_hvp_on_mlp_matches_full_hessian_and_averages_batches() -> None:
    model, batches = mlp(), classification_batches()
    hessian = full_hessian(model, batches)
    generator = torch.Generator().manual_seed(4)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    result = hessian_vector_product(model, cross_entropy, batches, vector)
    flat = torch.cat([t.reshape(-1) for t in result])
    expected = hessian @ torch.cat([v.reshape(-1) for v in vector])
    torch.testing.assert_close(flat, expected, rtol=1e-10, atol=1e-12)
    assert [t.shape for t in result] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_lanczos_on_quadratic_is_exact_and_algebraic(k: int) -> None:
    matrix = symmetric_with_spectrum(INDEFINITE)
    model = Quadratic(matrix)
    values = hessian_eigenvalues(model, quadratic_loss, QUADRATIC_BATCHES, k=k, tol=1e-12)
    assert values.dtype == torch.float64 and values.shape == (k,)
    # Exact to float64 precision relative to the spectral scale (10): the algebraically
    # largest first, so -10 (the largest magnitude) comes last.
    torch.testing.assert_close(values, exact_top(matrix, k), rtol=0, atol=1e-13)
    assert torch.all(values[:-1] >= values[1:])


def test_lanczos_eigenvectors_are_orthonormal_eigenvectors() -> None:
    matrix = symmetric_with_spectrum(INDEFINITE, seed=5)
    model = Quadratic(matrix)
    pairs = hessian_eigenpairs(model, quadratic_loss, QUADRATIC_BATCHES, k=3, tol=1e-12)
    vectors = torch.stack([v[0] for v in pairs.eigenvectors])
    torch.testing.assert_close(
        vectors @ vectors.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    residual = matrix @ vectors.T - vectors.T * pairs.eigenvalues
    assert residual.abs().max() < 1e-11
    assert pairs.converged and pairs.residuals.max() < 1e-10
    assert 3 <= pairs.products <= 7


def test_lanczos_restarts_to_find_repeated_eigenvalues() -> None:
    # A Krylov space holds one copy of each distinct eigenvalue: the restart finds the others.
    spectrum = [5.0, 5.0, 5.0, 2.0, 1.0, 1.0, 0.0, -1.0]
    model = Quadratic(symmetric_with_spectrum(spectrum, seed=2))
    values = hessian_eigenvalues(model, quadratic_loss, QUADRATIC_BATCHES, k=5, tol=0.0)
    torch.testing.assert_close(
        values, torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_power_iteration_finds_largest_magnitude_and_lanczos_the_largest() -> None:
    model = Quadratic(symmetric_with_spectrum(INDEFINITE, seed=1))
    power = hessian_eigenvalues(
        model, quadratic_loss, QUADRATIC_BATCHES, k=2, method="power", max_iter=500, tol=1e-12
    )
    # |-10| and 3 are the two largest magnitudes, returned in descending order.
    torch.testing.assert_close(
        power, torch.tensor([3.0, -10.0], dtype=torch.float64), atol=1e-10, rtol=0
    )
    lanczos = hessian_eigenvalues(model, quadratic_loss, QUADRATIC_BATCHES, k=2)
    torch.testing.assert_close(
        lanczos, torch.tensor([3.0, 2.0], dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_power_iteration_with_deflation_on_a_positive_definite_hessian() -> None:
    matrix = symmetric_with_spectrum([8.0, 4.0, 1.0, 0.5, 0.1], seed=6)
    pairs = hessian_eigenpairs(
        Quadratic(matrix),
        quadratic_loss,
        QUADRATIC_BATCHES,
        k=3,
        method="power",
        max_iter=500,
        tol=1e-12,
    )
    torch.testing.assert_close(pairs.eigenvalues, exact_top(matrix, 3), atol=1e-10, rtol=0)
    assert pairs.converged


def test_top_eigenvalues_of_mlp_match_the_full_hessian() -> None:
    model, batches = mlp(), classification_batches()
    exact = exact_top(full_hessian(model, batches), 3)
    values = hessian_eigenvalues(model, cross_entropy, batches, k=3, tol=1e-10)
    torch.testing.assert_close(values, exact, rtol=1e-6, atol=0)


def test_float32_model_is_accurate_to_its_precision() -> None:
    model64, batches64 = mlp(), classification_batches()
    exact = exact_top(full_hessian(model64, batches64), 1)
    model32 = mlp(dtype=torch.float32)
    batches32 = [(x.float(), y) for x, y in batches64]
    values = hessian_eigenvalues(model32, cross_entropy, batches32)
    torch.testing.assert_close(values, exact, rtol=1e-4, atol=0)


def test_unconverged_solver_warns_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model = Quadratic(symmetric_with_spectrum([float(i) for i in range(20)], seed=3))
    with caplog.at_level(logging.WARNING, logger="flatminima.sharpness.hessian"):
        pairs = hessian_eigenpairs(model, quadratic_loss, QUADRATIC_BATCHES, max_iter=3, tol=1e-12)
    assert not pairs.converged and pairs.products == 3
    assert "max_iter=3" in caplog.text


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    diagonal = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    model = Quadratic(torch.diag(diagonal))
    estimate = hessian_trace_estimate(model, quadratic_loss, QUADRATIC_BATCHES, num_probes=5)
    # Rademacher z has z_i² = 1: zᵀDz = tr(D) for every probe, zero variance.
    assert estimate.value == pytest.approx(float(diagonal.sum()), rel=1e-15)
    assert estimate.standard_error == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_on_quadratic_within_five_sigma(seed: int) -> None:
    matrix = symmetric_with_spectrum(INDEFINITE, seed=seed)
    num_probes = 50
    value = hessian_trace(
        Quadratic(matrix), quadratic_loss, QUADRATIC_BATCHES, num_probes=num_probes, seed=seed
    )
    sigma = rademacher_std(matrix, num_probes)
    assert sigma > 0.1  # the bound is not vacuous
    assert abs(value - float(matrix.trace())) <= 5 * sigma


def test_hutchinson_on_mlp_within_five_sigma_and_honest_error() -> None:
    model, batches = mlp(), classification_batches()
    hessian = full_hessian(model, batches)
    num_probes = 40
    estimate = hessian_trace_estimate(model, cross_entropy, batches, num_probes=num_probes)
    sigma = rademacher_std(hessian, num_probes)
    assert abs(estimate.value - float(hessian.trace())) <= 5 * sigma
    # The reported standard error estimates that same σ from the samples.
    assert 0.5 * sigma < estimate.standard_error < 2.0 * sigma
    assert estimate.samples.shape == (num_probes,)


def test_hutchinson_uses_the_same_probes_for_every_batch() -> None:
    model, batches = mlp(), classification_batches()
    whole = hessian_trace_estimate(model, cross_entropy, batches, num_probes=3, seed=7)
    parts = [
        hessian_trace_estimate(model, cross_entropy, [batch], num_probes=3, seed=7).samples
        for batch in batches
    ]
    torch.testing.assert_close(whole.samples, torch.stack(parts).mean(0), rtol=1e-12, atol=1e-12)


def test_seeds_reproduce_and_differ() -> None:
    model, batches = mlp(), classification_batches()
    first = hessian_trace(model, cross_entropy, batches, num_probes=3, seed=1)
    assert hessian_trace(model, cross_entropy, batches, num_probes=3, seed=1) == first
    assert hessian_trace(model, cross_entropy, batches, num_probes=3, seed=2) != first


def test_slq_nodes_are_the_eigenvalues_with_full_krylov_space() -> None:
    spectrum = [4.0, 2.5, 1.0, 0.0, -0.5, -3.0]
    matrix = symmetric_with_spectrum(spectrum, seed=4)
    density = spectral_density(
        Quadratic(matrix), quadratic_loss, QUADRATIC_BATCHES, num_iter=6, num_probes=3
    )
    assert density.dim == 6
    assert density.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    nodes = density.nodes.reshape(3, 6)
    expected = torch.tensor(sorted(spectrum), dtype=torch.float64)
    for probe_nodes in nodes:
        torch.testing.assert_close(probe_nodes, expected, atol=1e-10, rtol=0)
    # The smoothed density is a probability density.
    grid = density.grid(4000, sigma=0.05)
    integral = torch.trapezoid(density.evaluate(grid, sigma=0.05), grid)
    assert integral.item() == pytest.approx(1.0, abs=1e-6)


def test_slq_quadrature_reproduces_rayleigh_quotient_of_a_diagonal_hessian() -> None:
    diagonal = torch.tensor([5.0, 1.0, 1.0, 0.25, -2.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    density = spectral_density(
        Quadratic(torch.diag(diagonal)), quadratic_loss, QUADRATIC_BATCHES, num_iter=3, num_probes=4
    )
    # Σ τθ = v̂ᵀHv̂ per probe; with Rademacher v, v̂ᵀDv̂ = tr(D)/d exactly, even after 3 steps.
    assert density.dim * float(density.weights @ density.nodes) == pytest.approx(
        float(diagonal.sum()), rel=1e-12
    )


def test_slq_stops_at_an_invariant_subspace() -> None:
    # Four distinct eigenvalues: each probe's Krylov space is at most four-dimensional.
    diagonal = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0], dtype=torch.float64)
    density = spectral_density(
        Quadratic(torch.diag(diagonal)), quadratic_loss, QUADRATIC_BATCHES, num_iter=8
    )
    assert density.nodes.numel() == 4
    torch.testing.assert_close(
        density.nodes, torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(density.weights, torch.full((4,), 0.25, dtype=torch.float64))


def test_batchnorm_is_measured_in_eval_mode_by_default() -> None:
    model, batches = mlp(batchnorm=True), classification_batches()
    with torch.no_grad():  # running statistics unlike any batch's, so the two modes differ
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    default = hessian_eigenvalues(model, cross_entropy, batches, k=2, tol=1e-10)
    trained = hessian_eigenvalues(model, cross_entropy, batches, k=2, tol=1e-10, train_mode=True)
    eval_exact = exact_top(full_hessian(model.eval(), batches), 2)
    train_exact = exact_top(full_hessian(model.train(), batches), 2)
    assert not torch.allclose(eval_exact, train_exact, rtol=1e-3)
    torch.testing.assert_close(default, eval_exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(trained, train_exact, rtol=1e-6, atol=0)


def test_frozen_and_unused_parameters() -> None:
    model, batches = mlp(), classification_batches()
    model[0].weight.requires_grad_(False)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(2, dtype=torch.float64)))
    values = hessian_eigenvalues(model, cross_entropy, batches, k=2, tol=1e-10)
    # The unused parameter adds zero rows and columns; the frozen one is a constant.
    exact = exact_top(full_hessian(model, batches), 2)
    torch.testing.assert_close(values, exact, rtol=1e-6, atol=0)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hv = hessian_vector_product(
        model, cross_entropy, batches, [torch.ones_like(p) for _, p in trainable]
    )
    unused = [name for name, _ in trainable].index("unused")
    assert torch.equal(hv[unused], torch.zeros(2, dtype=torch.float64))


def test_loss_linear_in_a_parameter_has_zero_curvature_there() -> None:
    model = torch.nn.Linear(3, 1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = hessian_eigenvalues(model, lambda m, b: m(b).sum(), [x], k=2)
    torch.testing.assert_close(values, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, k=0), "k must be"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, k=76), r"k must be in \[1, 75\]"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, k=4, max_iter=3), "max_iter"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, max_iter=0), "max_iter"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, tol=-1.0), "tol"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, method="qr"), "method"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, []), "batches"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b[0][0]), "batches"),
        (lambda m, b: hessian_eigenvalues(m, cross_entropy, b, seed=1.5), "seed"),
        (lambda m, b: hessian_trace(m, cross_entropy, b, num_probes=0), "num_probes"),
        (lambda m, b: spectral_density(m, cross_entropy, b, num_iter=0), "num_iter"),
        (lambda m, b: spectral_density(m, cross_entropy, b, num_probes=0), "num_probes"),
        (lambda m, b: hessian_vector_product(m, cross_entropy, b, [torch.ones(2)]), "vector"),
        (lambda m, b: hessian_trace(m, lambda model, batch: model(batch[0]), b), "scalar"),
    ],
)
def test_bad_arguments_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(mlp(), classification_batches(1))


def test_model_without_trainable_parameters_raises() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_trace(model, cross_entropy, classification_batches(1))


def test_density_rejects_bad_sigma() -> None:
    density = spectral_density(mlp(), cross_entropy, classification_batches(1), num_iter=3)
    for sigma in (0.0, -1.0, math.inf, "wide"):
        with pytest.raises(ValueError, match="sigma"):
            density.evaluate(torch.zeros(3), sigma=sigma)
