"""WSAM's properties (ALGORITHMS.md §16 and §17 row 17), in float64."""

from __future__ import annotations

import doctest

import pytest
import torch

import flatminima
import flatminima.methods.wsam
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


class Recording(torch.optim.SGD):
    """SGD that records the gradient it steps with, and its momentum buffers after the step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[list[torch.Tensor]] = []
        self.buffers: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.updates.append([p.grad.clone() for p in params])
        result = super().step(closure)
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        self.buffers.append([None if b is None else b.clone() for b in buffers])
        return result


def recording_closure(model, batch, passes):
    """Forward + backward on ``batch``; appends each pass's weights and gradients to
    ``passes`` (before the optimizer changes them)."""
    x, y = batch

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        passes.append(
            (
                [p.detach().clone() for p in model.parameters()],
                [p.grad.clone() for p in model.parameters()],
            )
        )
        return loss

    return closure


def norm(tensors) -> float:
    return sum(float((t * t).sum()) for t in tensors) ** 0.5


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
def test_gamma_zero_is_the_base_optimizer_bit_for_bit(decouple):
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    run(
        flatminima.WSAM(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            rho=0.1,
            gamma=0.0,
            decouple=decouple,
        ),
        model,
        data,
    )
    base = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in data:
        base.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        base.step()
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_coupled_gamma_one_half_is_sam_bit_for_bit():
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    run(
        flatminima.WSAM(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            rho=0.1,
            gamma=0.5,
            decouple=False,
        ),
        model,
        data,
    )
    run(
        flatminima.SAM(
            torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            rho=0.1,
        ),
        reference,
        data,
    )
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_coupled_update_is_the_weighted_gradient():
    model = tiny_mlp()
    base = Recording(model.parameters(), lr=0.1)
    rho, gamma = 0.1, 0.7
    optimizer = flatminima.WSAM(base, rho=rho, gamma=gamma, decouple=False)
    passes: list = []
    optimizer.step(recording_closure(model, batches(1)[0], passes))
    (w, g), (w_perturbed, g_tilde) = passes
    n = norm(g)
    for wi, gi, wp in zip(w, g, w_perturbed, strict=True):  # ε = ρ g/(‖g‖ + ξ)
        assert torch.allclose(wp - wi, rho * gi / (n + XI), rtol=0, atol=1e-15)
    alpha = gamma / (1 - gamma)
    for d, gi, gti in zip(base.updates[0], g, g_tilde, strict=True):
        assert torch.allclose(d, alpha * gti + (1 - alpha) * gi, rtol=0, atol=1e-14)


def test_decoupled_sharpness_bypasses_the_momentum_and_uses_the_current_learning_rate():
    """The base step (and its momentum buffer) sees g alone; the sharpness term moves the
    weights by −lr·α·(g̃ − g) after it, with the learning rate of that step."""
    model = tiny_mlp()
    base = Recording(model.parameters(), lr=0.1, momentum=0.9)
    gamma = 0.9
    alpha = gamma / (1 - gamma)
    optimizer = flatminima.WSAM(base, rho=0.1, gamma=gamma)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    buffers = None
    for step, batch in enumerate(batches(2)):
        lr = 0.1 * 0.5**step
        passes: list = []
        optimizer.step(recording_closure(model, batch, passes))
        scheduler.step()
        (w, g), (_, g_tilde) = passes
        for d, gi in zip(base.updates[step], g, strict=True):
            assert torch.equal(d, gi)  # the base optimizer steps with g itself
        buffers = (
            list(g) if buffers is None else [0.9 * b + gi for b, gi in zip(buffers, g, strict=True)]
        )
        for recorded, expected in zip(base.buffers[step], buffers, strict=True):
            assert torch.allclose(recorded, expected, rtol=0, atol=1e-15)
        for p, wi, b, gi, gti in zip(model.parameters(), w, buffers, g, g_tilde, strict=True):
            expected = wi - lr * b - lr * alpha * (gti - gi)
            assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
def test_clipping_acts_on_g_and_g_tilde_after_the_perturbation_is_built(decouple):
    """ε is built from the unclipped g (‖ε‖ = ρ however small max_norm is); then g and g̃
    are each clipped to max_norm as torch.nn.utils.clip_grad_norm_ does."""
    model = tiny_mlp()
    base = Recording(model.parameters(), lr=0.1, momentum=0.9)
    rho, gamma, max_norm = 0.1, 0.6, 0.05
    optimizer = flatminima.WSAM(base, rho=rho, gamma=gamma, decouple=decouple, max_norm=max_norm)
    passes: list = []
    optimizer.step(recording_closure(model, batches(1)[0], passes))
    (w, g), (w_perturbed, g_tilde) = passes
    assert norm([wp - wi for wp, wi in zip(w_perturbed, w, strict=True)]) == pytest.approx(
        rho, rel=1e-10
    )
    assert norm(g) > max_norm and norm(g_tilde) > max_norm  # the clipping bites
    clipped = [gi * (max_norm / (norm(g) + 1e-6)) for gi in g]
    clipped_tilde = [gi * (max_norm / (norm(g_tilde) + 1e-6)) for gi in g_tilde]
    alpha = gamma / (1 - gamma)
    for i, (d, c, ct) in enumerate(zip(base.updates[0], clipped, clipped_tilde, strict=True)):
        expected = c if decouple else alpha * ct + (1 - alpha) * c
        assert torch.allclose(d, expected, rtol=0, atol=1e-15)
        if decouple:
            after = w[i] - 0.1 * c - 0.1 * alpha * (ct - c)
            assert torch.allclose(list(model.parameters())[i].detach(), after, atol=1e-15)


def test_clipping_reproduces_torchs_clip_grad_norm():
    grads = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for foreach in (True, False):
        ours = [g.clone() for g in grads]
        flatminima.methods.wsam._clip_(ours, 0.5, foreach=foreach)
        for mine, theirs in zip(ours, (p.grad for p in params), strict=True):
            # The global norm may differ in its last bit (√(n²) against n).
            assert torch.allclose(mine, theirs, rtol=1e-15, atol=0)


def test_two_passes_and_at_most_two_parameter_copies():
    assert flatminima.WSAM.passes_per_step() == 2
    for hyperparameters in ({}, {"decouple": False, "max_norm": 0.1}, {"adaptive": True}):
        held = parameter_copies_held("wsam", hyperparameters)
        assert held.peak < 2.05, (hyperparameters, held)
        assert held.between_steps == 0.0, (hyperparameters, held)


def test_docstring_example_runs():
    result = doctest.testmod(flatminima.methods.wsam, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"rho": 0.1, "gamma": 0.9, "max_norm": 0.2},
        {"rho": 0.1, "gamma": 0.6, "decouple": False, "max_norm": 0.2},
    ],
    ids=["decoupled-clipped", "coupled-clipped"],
)
def test_a_compiled_step_keeps_one_graph(hyperparameters):
    compiled_step_matches_eager(flatminima.WSAM, hyperparameters)
