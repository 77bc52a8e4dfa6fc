"""Bilateral SAM's properties (spec §9, §19), in float64 on a quadratic and the tiny MLP."""

from __future__ import annotations

import copy

import pytest
import torch

import flatminima
from flatminima.methods.bilateral_sam import INITIAL_LR
from support import assert_bitwise_equal, batches, closure_for, make_base, run, snapshot, tiny_mlp

XI = 1e-12


def quadratic(seed: int = 0, sizes=(3, 5)):
    """Two parameter tensors and L = ½ wᵀAw + bᵀw over their concatenation; the closure
    records the weights of every pass."""
    generator = torch.Generator().manual_seed(seed)
    dim = sum(sizes)
    q = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = q @ q.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    params = [
        torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes
    ]
    points: list[torch.Tensor] = []

    def closure():
        w = torch.cat(params)
        points.append(w.detach().clone())
        loss = 0.5 * w @ a @ w + b @ w
        loss.backward()
        return loss

    return params, a, b, closure, points


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def descent_of_one_step(rho, rho_min, seed=0):
    """(w, a, b, d, points): with SGD at lr 1 and nothing else, the weights move by −d."""
    params, a, b, closure, points = quadratic(seed)
    optimizer = flatminima.BilateralSAM(torch.optim.SGD(params, lr=1.0), rho=rho, rho_min=rho_min)
    w = flat(params)
    optimizer.step(closure)
    return w, a, b, w - flat(params), points


def test_three_passes_at_w_then_w_plus_rho_g_hat_then_w_minus_rho_min_g_hat():
    rho, rho_min = 0.3, 0.2
    w, a, b, _, points = descent_of_one_step(rho, rho_min)
    g = a @ w + b
    unit = g / (g.norm() + XI)
    assert len(points) == 3
    assert torch.equal(points[0], w)
    assert torch.allclose(points[1], w + rho * unit, rtol=0, atol=1e-14)
    assert torch.allclose(points[2], w - rho_min * unit, rtol=0, atol=1e-14)


def test_update_is_g_max_plus_g_minus_the_rescaled_g_min():
    rho, rho_min = 0.3, 0.2
    w, a, b, descent, _ = descent_of_one_step(rho, rho_min)
    g = a @ w + b
    unit = g / (g.norm() + XI)
    g_max = a @ (w + rho * unit) + b
    g_min = a @ (w - rho_min * unit) + b
    expected = g_max + g - (g_max.norm() / g_min.norm()) * g_min
    assert torch.allclose(descent, expected, rtol=0, atol=1e-12)


def test_rho_min_zero_keeps_the_codes_residual_term():
    """Spec §9.4: ρ_min = 0 gives g_min = g and d = g_max + g·(1 − ‖g_max‖/‖g‖), which is
    not SAM's g_max."""
    w, a, b, descent, _ = descent_of_one_step(0.3, 0.0)
    g = a @ w + b
    g_max = a @ (w + 0.3 * g / (g.norm() + XI)) + b
    assert torch.allclose(descent, g_max + g * (1 - g_max.norm() / g.norm()), rtol=0, atol=1e-12)
    assert not torch.allclose(descent, g_max, rtol=0, atol=1e-6)


def test_both_radii_zero_is_the_base_optimizer_bit_for_bit():
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    run(
        flatminima.BilateralSAM(make_base("sgd", model.parameters()), rho=0.0, rho_min=0.0),
        model,
        data,
    )
    base = make_base("sgd", reference.parameters())
    for batch in data:
        base.zero_grad(set_to_none=True)
        base.step(closure_for(reference, batch))
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_min_side_radius_follows_the_learning_rate():
    params, a, b, closure, points = quadratic()
    base = torch.optim.SGD(params, lr=0.1)
    optimizer = flatminima.BilateralSAM(base, rho=0.3, rho_min=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.25)
    optimizer.step(closure)
    scheduler.step()  # lr 0.1 → 0.025
    w = flat(params)
    g = a @ w + b
    points.clear()
    optimizer.step(closure)
    radius = float((points[2] - w).norm())
    assert radius == pytest.approx(0.2 * 0.25 * float(g.norm()) / (float(g.norm()) + XI), rel=1e-12)
    assert float((points[1] - w).norm()) == pytest.approx(0.3, rel=1e-10)  # ρ does not follow


def test_initial_learning_rate_survives_a_checkpoint():
    data = batches(4)
    model = tiny_mlp()
    base = make_base("sgd", model.parameters())
    optimizer = flatminima.BilateralSAM(base, rho=0.1, rho_min=0.2)
    run(optimizer, model, data[:1])
    base.param_groups[0]["lr"] = 0.02  # a scheduler's work
    run(optimizer, model, data[1:2])
    weights, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    run(optimizer, model, data[2:])

    resumed_model = tiny_mlp(seed=4)
    resumed_model.load_state_dict(weights)
    # Built where the learning rate is already 0.02: lr₀ must come from the checkpoint.
    resumed_base = make_base("sgd", resumed_model.parameters(), lr=0.02)
    resumed = flatminima.BilateralSAM(resumed_base, rho=0.1, rho_min=0.2)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0][INITIAL_LR] == pytest.approx(0.1)
    run(resumed, resumed_model, data[2:])
    assert_bitwise_equal(snapshot(resumed_model), snapshot(model))


def test_descent_starts_from_w_not_from_the_min_side_point():
    """The authors' aliasing restore descends from w − ρ_min·ĝ; ours from w. With lr 0 the
    weights must not move at all."""
    params, _, _, closure, _ = quadratic()
    before = flat(params)
    optimizer = flatminima.BilateralSAM(torch.optim.SGD(params, lr=0.0), rho=0.3, rho_min=0.2)
    optimizer.step(closure)
    assert torch.equal(flat(params), before)


def test_a_zero_min_side_gradient_drops_the_term_instead_of_dividing_by_zero():
    model = tiny_mlp()
    optimizer = flatminima.BilateralSAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=0.1)
    x, y = batches(1)[0]
    calls: list[int] = []
    grads: list[list[torch.Tensor]] = []

    def closure():
        calls.append(1)
        scale = 0.0 if len(calls) == 3 else 1.0  # the min-side gradient is exactly zero
        loss = scale * torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step(closure)
    g, g_max, _ = grads
    for p, w, gi, mi in zip(model.parameters(), before, g, g_max, strict=True):
        assert torch.isfinite(p).all()
        assert torch.allclose(w - p.detach(), gi + mi, rtol=0, atol=1e-14)


def test_zero_gradient_keeps_every_pass_at_w():
    model = tiny_mlp()
    optimizer = flatminima.BilateralSAM(make_base("sgd", model.parameters()))
    seen: list[list[torch.Tensor]] = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = 0.0 * sum(p.sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    assert len(seen) == 3
    for point in seen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(point, seen[0], strict=True))
