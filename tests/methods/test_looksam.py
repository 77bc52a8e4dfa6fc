"""LookSAM's properties (spec §15, §19), in float64 on a quadratic and the tiny MLP."""

from __future__ import annotations

import copy

import pytest
import torch

import flatminima
from flatminima.methods.looksam import LOOKSAM_DIRECTION
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    make_base,
    max_abs_difference,
    run,
    snapshot,
    tiny_mlp,
)

XI = 1e-12


def quadratic(seed: int = 0, sizes=(3, 5)):
    """Two parameter tensors and L = ½ wᵀAw + bᵀw over their concatenation."""
    generator = torch.Generator().manual_seed(seed)
    dim = sum(sizes)
    q = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = q @ q.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    params = [
        torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True) for n in sizes
    ]

    def closure():
        w = torch.cat(params)
        loss = 0.5 * w @ a @ w + b @ w
        loss.backward()
        return loss

    return params, a, b, closure


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def stored_direction(optimizer, params) -> torch.Tensor:
    return flat(optimizer.state[p][LOOKSAM_DIRECTION] for p in params)


def test_refresh_steps_are_the_multiples_of_k_and_take_two_passes():
    model = tiny_mlp()
    optimizer = flatminima.LookSAM(make_base("sgd", model.parameters()), k=3)
    passes = []
    for batch in batches(7):
        calls: list[int] = []
        optimizer.step(closure_for(model, batch, calls))
        passes.append(len(calls))
    assert passes == [2, 1, 1, 2, 1, 1, 2]
    assert passes == [flatminima.LookSAM.passes_per_step({"k": 3}, step) for step in range(7)]


def test_k_one_is_sam_whatever_alpha():
    data = batches(6)
    for alpha in (0.0, 0.7, 5.0):
        model, reference = tiny_mlp(), tiny_mlp()
        run(
            flatminima.LookSAM(make_base("sgd", model.parameters()), rho=0.1, k=1, alpha=alpha),
            model,
            data,
        )
        run(flatminima.SAM(make_base("sgd", reference.parameters()), rho=0.1), reference, data)
        assert_bitwise_equal(snapshot(model), snapshot(reference))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_alpha_zero_is_sam_on_refresh_steps_and_the_base_optimizer_in_between(foreach):
    data = batches(7)
    model, reference = tiny_mlp(), tiny_mlp()
    run(
        flatminima.LookSAM(
            make_base("sgd", model.parameters()), rho=0.1, k=3, alpha=0.0, foreach=foreach
        ),
        model,
        data,
    )
    base = make_base("sgd", reference.parameters())
    sam = flatminima.SAM(base, rho=0.1, foreach=foreach)  # the same base: one momentum
    for step, batch in enumerate(data):
        if step % 3 == 0:
            sam.step(closure_for(reference, batch))
        else:
            base.zero_grad(set_to_none=True)
            base.step(closure_for(reference, batch))
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_refresh_stores_the_unit_component_of_the_sam_gradient_orthogonal_to_g():
    params, a, b, closure = quadratic()
    rho = 0.3
    optimizer = flatminima.LookSAM(torch.optim.SGD(params, lr=0.0), rho=rho, k=2, alpha=0.5)
    w = flat(params)
    g = a @ w + b
    g_tilde = a @ (w + rho * g / (g.norm() + XI)) + b  # the SAM gradient, in closed form
    optimizer.step(closure)
    direction = stored_direction(optimizer, params)
    assert float(direction.norm()) == pytest.approx(1.0, rel=1e-12)
    assert abs(float(direction @ g)) < 1e-10 * float(g.norm())
    g_v = g_tilde - (g_tilde @ g) / (g @ g) * g
    assert torch.allclose(direction, g_v / g_v.norm(), rtol=0, atol=1e-12)


def test_steps_in_between_descend_with_g_plus_alpha_norm_g_times_the_direction():
    params, a, b, closure = quadratic()
    alpha = 0.7
    # SGD with lr 1 and nothing else: the weights move by exactly −d.
    optimizer = flatminima.LookSAM(torch.optim.SGD(params, lr=1.0), rho=0.2, k=2, alpha=alpha)
    optimizer.step(closure)  # a refresh
    direction = stored_direction(optimizer, params)
    w = flat(params)
    g = a @ w + b
    optimizer.step(closure)  # one pass, the stored direction
    descent = w - flat(params)
    expected = g + alpha * g.norm() * direction
    assert torch.allclose(descent, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(descent, g, rtol=0, atol=1e-6)  # the direction mattered


def test_a_checkpoint_between_refreshes_keeps_the_direction_and_the_step_number():
    """Saved after step 4 with k = 3: the resumed step is a reuse step, which needs ĝ_v and the
    counter (a counter restarted at 0 would refresh instead)."""
    data = batches(8)
    model = tiny_mlp()
    optimizer = flatminima.LookSAM(make_base("sgd", model.parameters()), k=3, alpha=0.7)
    run(optimizer, model, data[:4])
    weights, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    run(optimizer, model, data[4:])

    resumed_model = tiny_mlp(seed=5)
    resumed_model.load_state_dict(weights)
    resumed = flatminima.LookSAM(make_base("sgd", resumed_model.parameters()), k=3, alpha=0.7)
    resumed.load_state_dict(state)
    assert state["method"]["step"] == 4
    calls: list[int] = []
    resumed.step(closure_for(resumed_model, data[4], calls))
    assert len(calls) == 1
    run(resumed, resumed_model, data[5:])
    assert_bitwise_equal(snapshot(resumed_model), snapshot(model))

    forgetful_model = tiny_mlp(seed=5)
    forgetful_model.load_state_dict(weights)
    forgetful = flatminima.LookSAM(make_base("sgd", forgetful_model.parameters()), k=3, alpha=0.7)
    forgetful.load_state_dict(state, base_optimizer_only=True)  # no ĝ_v, counter at 0
    run(forgetful, forgetful_model, data[4:])
    assert max_abs_difference(snapshot(forgetful_model), snapshot(model)) > 1e-6


def test_zero_gradient_stores_a_zero_direction_not_nan():
    model = tiny_mlp()
    optimizer = flatminima.LookSAM(make_base("sgd", model.parameters()), k=2)

    def zero_closure():
        loss = 0.0 * sum(p.sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(zero_closure)
    for p in model.parameters():
        assert torch.equal(optimizer.state[p][LOOKSAM_DIRECTION], torch.zeros_like(p))


def test_global_not_per_tensor_projection():
    """The per-tensor form (pytorch_optimizer) would make each tensor's slice orthogonal to its
    own gradient; the global form only the whole vector."""
    params, a, b, closure = quadratic(seed=3)
    optimizer = flatminima.LookSAM(torch.optim.SGD(params, lr=0.0), rho=0.5, k=2)
    w = flat(params)
    g = a @ w + b
    optimizer.step(closure)
    direction = stored_direction(optimizer, params)
    slices = [slice(0, 3), slice(3, 8)]
    per_tensor = [abs(float(direction[s] @ g[s])) for s in slices]
    assert abs(float(direction @ g)) < 1e-10
    assert max(per_tensor) > 1e-3


def test_k_must_agree_across_groups_and_be_a_positive_integer():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "k": 2}, {"params": model[2].parameters(), "k": 3}],
        lr=0.1,
    )
    with pytest.raises(ValueError, match="k"):
        flatminima.LookSAM(base)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            flatminima.LookSAM(make_base("sgd", tiny_mlp().parameters()), k=bad)


def test_alpha_is_read_per_group():
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "alpha": 0.0}, {"params": model[2].parameters()}],
        lr=0.1,
    )
    run(flatminima.LookSAM(base, k=2, alpha=0.7), model, data)
    run(
        flatminima.LookSAM(torch.optim.SGD(reference.parameters(), lr=0.1), k=2, alpha=0.7),
        reference,
        data,
    )
    moved = max_abs_difference({"w": model[0].weight.detach()}, {"w": reference[0].weight.detach()})
    assert moved > 1e-8  # the first layer lost its α on the reuse steps
