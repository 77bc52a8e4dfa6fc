"""Regression tests for the pitfalls of popular ports (shared/spec/PITFALLS.md) not already
covered by the conformance suite (P1 state dict, P2 unused parameters, P7 zero gradients,
P14 BatchNorm, P18/P4b DDP live there; P10 in tests/reference)."""

from __future__ import annotations

import torch

import flatminima
from records import RECORDS
from support import assert_bitwise_equal, closure_of, snapshot


def test_p3_restore_is_exact_where_subtracting_epsilon_is_not():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    before = snapshot(model)
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5)

    def closure():
        loss = model(x).float().square().mean()
        loss.backward()
        return loss

    # What a subtracting port would do, on the same weights: (w + ε) − ε ≠ w somewhere.
    closure()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum(g.float().square().sum() for g in grads))
    drift = 0
    for p, g in zip(model.parameters(), grads, strict=True):
        eps = (0.5 * g.float() / norm).to(p.dtype)
        drift += int(((p.detach() + eps) - eps != p.detach()).sum())
    assert drift > 0, "this setting must expose inexact subtraction"

    model.zero_grad()  # step(closure) refuses gradients a backward left before it
    optimizer.step(closure)
    assert_bitwise_equal(snapshot(model), before)


def test_p5_weight_decay_stays_out_of_the_ascent_direction():
    perturbations = []
    for weight_decay in (0.0, 10.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2).double()
        x = torch.randn(8, 3, dtype=torch.float64)
        optimizer = flatminima.SAM(
            torch.optim.SGD(model.parameters(), lr=0.0, weight_decay=weight_decay), rho=0.1
        )
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.first_step()
        perturbations.append(
            [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
        )
        optimizer.abort_step()
    for a, b in zip(*perturbations, strict=True):
        assert torch.equal(a, b)


def test_p6_asam_eta_lets_zero_initialised_biases_move():
    for eta, should_move in ((0.0, False), (0.01, True)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2).double()
        torch.nn.init.zeros_(model.bias)
        optimizer = flatminima.ASAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5, eta=eta)
        optimizer.zero_grad()
        model(torch.randn(8, 3, dtype=torch.float64)).square().mean().backward()
        optimizer.first_step()
        moved = bool((model.bias != 0).any())
        optimizer.abort_step()
        assert moved == should_move
        assert bool((model.bias == 0).all())  # abort_step restored it


def test_p11_method_state_never_collides_with_the_base_optimizers():
    for record in RECORDS:
        model = torch.nn.Linear(3, 2).double()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer = record.cls(base, **record.typical)

        inputs = torch.ones(4, 3, dtype=torch.float64)
        closure = closure_of(
            lambda rows, model=model, inputs=inputs: (
                model(inputs if rows is None else inputs[rows]).square().mean(1)
            ),
            len(inputs),
            per_example=record.needs_per_example_closure,
        )
        optimizer.step(closure)
        optimizer.step(closure)
        assert optimizer.state is not base.state
        for p in model.parameters():
            assert set(base.state[p]) == {"momentum_buffer"}
            assert set(optimizer.state[p]) == set(record.persistent_state)


def test_tilted_sam_zero_noise_scale_gives_a_zero_start_not_nan():
    model = torch.nn.Linear(3, 2).double()
    before = snapshot(model)
    optimizer = flatminima.TiltedSAM(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_scale=0.0, num_samples=2
    )

    def closure():
        loss = model(torch.ones(4, 3, dtype=torch.float64)).square().mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.isfinite(loss)
    assert_bitwise_equal(snapshot(model), before)
