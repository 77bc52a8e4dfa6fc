"""GSAM's properties (ALGORITHMS.md §8.5 and §17 row 12), in float64 on a quadratic whose
gradients are known in closed form."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch

import flatminima
import flatminima.methods.gsam
from support import (
    assert_bitwise_equal,
    batches,
    compiled_step_matches_eager,
    parameter_copies_held,
    run,
    snapshot,
    tiny_mlp,
)

XI = 1e-12


def quadratic(seed: int = 0, sizes=(3, 5)):
    """Two parameter tensors and L(w) = ½ wᵀAw + bᵀw over their concatenation."""
    generator = torch.Generator().manual_seed(seed)
    dim = sum(sizes)
    q = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = q @ q.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    params = [
        torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes
    ]

    def loss_fn():
        w = torch.cat(params)
        return 0.5 * w @ a @ w + b @ w

    def gradient_at(w):
        return a @ w + b

    return params, loss_fn, gradient_at


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def one_step(optimizer, params, loss_fn):
    """(w, g, ε, d) of one manual step: the weights, the gradient at w, the perturbation, and
    the update the base optimizer received."""
    optimizer.zero_grad()
    loss_fn().backward()
    w = flat(params).clone()
    g = flat(p.grad for p in params).clone()
    optimizer.first_step()
    eps = flat(params) - w
    loss_fn().backward()
    optimizer.second_step()
    d = flat(p.grad for p in params)
    return w, g, eps, d


def frozen(params_or_groups):
    return torch.optim.SGD(params_or_groups, lr=0.0)


def test_update_keeps_sams_descent_and_adds_only_the_orthogonal_part():
    params, loss_fn, gradient_at = quadratic()
    rho, alpha = 0.3, 0.7
    w, g, eps, d = one_step(flatminima.GSAM(frozen(params), rho=rho, alpha=alpha), params, loss_fn)
    g_tilde = gradient_at(w + eps)
    assert torch.allclose(eps, rho * g / (g.norm() + XI), rtol=1e-13, atol=0)
    # ⟨d, g̃⟩ = ‖g̃‖²: the correction is orthogonal to the perturbed gradient.
    assert float(d @ g_tilde) == pytest.approx(float(g_tilde @ g_tilde), rel=1e-12)
    orthogonal = (g_tilde - d) / alpha  # g⊥
    assert abs(float(orthogonal @ g_tilde)) < 1e-12 * float(g.norm() * g_tilde.norm())
    parallel = g - orthogonal  # g∥ = (⟨g, g̃⟩/‖g̃‖²)·g̃
    expected = float(g @ g_tilde) / float(g_tilde @ g_tilde) * g_tilde
    assert torch.allclose(parallel, expected, rtol=0, atol=1e-12)
    assert float(orthogonal.norm()) > 1e-3  # the correction is not trivially zero here


def test_alpha_is_read_per_group_and_the_projection_is_global():
    params, loss_fn, gradient_at = quadratic()
    base = frozen([{"params": [params[0]], "alpha": 0.2}, {"params": [params[1]], "alpha": 1.5}])
    w, g, eps, d = one_step(flatminima.GSAM(base, rho=0.3), params, loss_fn)
    g_tilde = gradient_at(w + eps)
    orthogonal = g - float(g @ g_tilde) / float(g_tilde @ g_tilde) * g_tilde
    alphas = torch.tensor([0.2] * 3 + [1.5] * 5, dtype=torch.float64)
    assert torch.allclose(d, g_tilde - alphas * orthogonal, rtol=0, atol=1e-13)


@pytest.mark.parametrize("rho_min", [None, 0.1], ids=["fixed-radius", "rho_min=rho"])
def test_alpha_zero_is_sam_bit_for_bit(rho_min):
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    gsam = flatminima.GSAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        rho=0.1,
        alpha=0.0,
        rho_min=rho_min,
    )
    sam = flatminima.SAM(
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        rho=0.1,
    )
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (gsam, sam)]
    for batch in data:
        run(gsam, model, [batch])
        run(sam, reference, [batch])
        for scheduler in schedulers:
            scheduler.step()
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def perturbation_norm(optimizer, params, loss_fn) -> float:
    """‖ε‖ of the step ``optimizer`` would take now (the step is then aborted)."""
    optimizer.zero_grad()
    loss_fn().backward()
    before = flat(params).clone()
    optimizer.first_step()
    norm = float((flat(params) - before).norm())
    optimizer.abort_step()
    assert torch.equal(flat(params), before)
    return norm


def test_radius_follows_the_learning_rate_between_its_endpoints():
    params, loss_fn, _ = quadratic()
    base = torch.optim.SGD(params, lr=0.1)
    optimizer = flatminima.GSAM(base, rho=0.3, alpha=0.4, rho_min=0.1, lr_min=0.01)
    assert base.param_groups[0]["lr_max"] == 0.1  # the learning rate at construction
    expected = {0.1: 0.3, 0.01: 0.1, 0.055: 0.2, 0.0325: 0.15}
    for lr, rho_t in expected.items():
        base.param_groups[0]["lr"] = lr
        assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(rho_t, rel=1e-12)
    # Below lr_min the line is extrapolated, as in the authors' codes (a warm-up from 0).
    base.param_groups[0]["lr"] = 0.0
    below = 0.1 + 0.2 * (0.0 - 0.01) / (0.1 - 0.01)
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(below, rel=1e-12)


def test_radius_is_rho_max_when_lr_max_equals_lr_min():
    params, loss_fn, _ = quadratic()
    base = torch.optim.SGD(params, lr=0.1)
    optimizer = flatminima.GSAM(base, rho=0.3, alpha=0.4, rho_min=0.1, lr_min=0.1)
    base.param_groups[0]["lr"] = 0.02
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(0.3, rel=1e-12)


def test_explicit_lr_max_sets_where_the_radius_is_rho():
    params, loss_fn, _ = quadratic()
    base = torch.optim.SGD(params, lr=0.004)  # OneCycleLR-style: the peak comes later
    optimizer = flatminima.GSAM(base, rho=0.3, alpha=0.4, rho_min=0.1, lr_max=0.1)
    assert base.param_groups[0]["lr_max"] == 0.1
    base.param_groups[0]["lr"] = 0.1
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(0.3, rel=1e-12)
    base.param_groups[0]["lr"] = 0.05
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(0.2, rel=1e-12)


def test_without_rho_min_the_radius_is_whatever_the_group_holds():
    params, loss_fn, _ = quadratic()
    base = torch.optim.SGD(params, lr=0.1)
    optimizer = flatminima.GSAM(base, rho=0.3, alpha=0.4)
    base.param_groups[0]["lr"] = 0.01  # no effect on ρ without rho_min
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(0.3, rel=1e-12)
    base.param_groups[0]["rho"] = 0.25  # a user's own ρ scheduler
    assert perturbation_norm(optimizer, params, loss_fn) == pytest.approx(0.25, rel=1e-12)


def test_adaptive_is_the_ports_elementwise_form():
    params, loss_fn, _ = quadratic()
    rho = 0.5
    w, g, eps, _ = one_step(
        flatminima.GSAM(frozen(params), rho=rho, alpha=0.4, adaptive=True), params, loss_fn
    )
    t = w.abs()
    expected = rho * t * t * g / ((t * g).norm() + XI)
    assert torch.allclose(eps, expected, rtol=1e-13, atol=0)
    assert float((eps / t).norm()) == pytest.approx(rho, rel=1e-12)  # ‖T⁻¹ε‖ = ρ


def test_lr_max_survives_the_state_dict_and_the_step_continues_bit_for_bit():
    data = batches(6)

    def build(model, lr):
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        optimizer = flatminima.GSAM(base, rho=0.2, alpha=0.5, rho_min=0.05)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)

    model = tiny_mlp()
    optimizer, scheduler = build(model, 0.1)
    for batch in data[:3]:
        run(optimizer, model, [batch])
        scheduler.step()
    saved = copy.deepcopy(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    )
    weights = snapshot(model)
    for batch in data[3:]:
        run(optimizer, model, [batch])
        scheduler.step()

    resumed_model = tiny_mlp(seed=5)
    resumed_model.load_state_dict(weights)
    resumed, resumed_scheduler = build(resumed_model, 0.7)  # another rate at construction
    resumed.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert resumed.param_groups[0]["lr_max"] == 0.1
    for batch in data[3:]:
        run(resumed, resumed_model, [batch])
        resumed_scheduler.step()
    assert_bitwise_equal(snapshot(resumed_model), snapshot(model))


def test_groups_added_later_take_their_own_learning_rate_as_lr_max():
    model = tiny_mlp()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    optimizer = flatminima.GSAM(base, rho=0.2, alpha=0.5, rho_min=0.05)
    optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.3})
    assert [g["lr_max"] for g in base.param_groups] == [0.1, 0.3]
    # A group added to the base optimizer behind the wrapper's back: its rate at its first step.
    extra = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    base.add_param_group({"params": [extra], "lr": 0.2})
    x, y = batches(1)[0]

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y) + (extra * extra).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert base.param_groups[2]["lr_max"] == 0.2


def test_a_parameter_without_a_clean_gradient_counts_as_g_equal_to_zero():
    """Unused on the clean pass, used on the perturbed one: g = 0 there, so its update is
    g̃ − α·(0 − c·g̃) with the global projection coefficient c."""
    used = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    late = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    alpha = 0.5
    recorded: list[list[torch.Tensor | None]] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            recorded.append([None if p.grad is None else p.grad.clone() for p in (used, late)])
            return super().step(closure)

    optimizer = flatminima.GSAM(Recording([used, late], lr=0.0), rho=0.2, alpha=alpha)
    passes: list[list[torch.Tensor | None]] = []

    def closure():
        loss = (used * used).sum() + (late.sum() * used.sum() if passes else 0.0)
        loss.backward()
        passes.append([None if p.grad is None else p.grad.clone() for p in (used, late)])
        return loss

    optimizer.step(closure)
    (g_used, g_late), (tilde_used, tilde_late) = passes
    assert g_late is None
    c = float((g_used * tilde_used).sum()) / float(
        (tilde_used * tilde_used).sum() + (tilde_late * tilde_late).sum()
    )
    d_used, d_late = recorded[0]
    assert torch.allclose(d_used, tilde_used - alpha * (g_used - c * tilde_used), atol=1e-15)
    assert torch.allclose(d_late, tilde_late + alpha * c * tilde_late, atol=1e-15)


def test_two_passes_and_at_most_two_parameter_copies():
    assert flatminima.GSAM.passes_per_step() == 2
    for hyperparameters in ({}, {"rho_min": 0.01, "adaptive": True}):
        held = parameter_copies_held("gsam", hyperparameters)
        assert held.peak < 2.05, held
        assert held.between_steps == 0.0, held


def test_docstring_example_runs():
    result = doctest.testmod(flatminima.methods.gsam, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_a_group_whose_learning_rate_is_below_lr_min_is_refused_before_it_is_added():
    model = tiny_mlp()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    optimizer = flatminima.GSAM(base, rho=0.2, alpha=0.5, rho_min=0.05, lr_min=0.01)
    with pytest.raises(ValueError, match=r"lr_min must be in \[0, lr_max\] = \[0, 0.001\]"):
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.001})
    assert len(base.param_groups) == 1


def test_adaptive_accepts_python_and_numpy_booleans_only():
    numpy = pytest.importorskip("numpy")  # the fresh-venv check runs these tests without it
    model = tiny_mlp()
    for value in (True, numpy.bool_(True)):
        flatminima.GSAM(torch.optim.SGD(model.parameters(), lr=0.1), adaptive=value)
    for value in (1, "true", None):
        with pytest.raises(ValueError, match="adaptive must be True or False"):
            flatminima.GSAM(torch.optim.SGD(model.parameters(), lr=0.1), adaptive=value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "hyperparameters",
    [{"rho": 0.1, "alpha": 0.4}, {"rho": 0.5, "alpha": 0.6, "adaptive": True, "rho_min": 0.1}],
    ids=["plain", "adaptive-following-lr"],
)
def test_a_compiled_step_keeps_one_graph(hyperparameters):
    compiled_step_matches_eager(flatminima.GSAM, hyperparameters)
