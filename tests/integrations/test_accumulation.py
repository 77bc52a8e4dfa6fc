"""Gradient accumulation: the documented closure over micro-batches is exact, and gradients a
backward left before ``step(closure)`` are refused instead of silently dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatminima import methods

METHODS = list(methods.BY_NAME)


def make(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, methods.BY_NAME[name](base)


def batch(size: int = 32):
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(size, 8, generator=generator, dtype=torch.float64),
        torch.randint(0, 4, (size,), generator=generator),
    )


@pytest.mark.parametrize("name", METHODS)
def test_a_closure_over_micro_batches_equals_the_full_batch_step(name):
    x, y = batch()
    full_model, full = make(name)
    micro_model, micro = make(name)
    for _ in range(3):
        torch.manual_seed(5)
        full.step(lambda: _backward(F.cross_entropy(full_model(x), y)))

        def closure():
            total = 0.0
            for xs, ys in zip(x.split(8), y.split(8), strict=True):
                loss = F.cross_entropy(micro_model(xs), ys) / 4
                loss.backward()
                total += loss.detach()
            return total

        torch.manual_seed(5)
        micro.step(closure)
    for a, b in zip(full_model.parameters(), micro_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _backward(loss):
    loss.backward()
    return loss


@pytest.mark.parametrize("form", ["step", "evaluations"])
def test_gradients_accumulated_before_the_step_are_refused(form):
    model, optimizer = make("sam")
    x, y = batch()
    F.cross_entropy(model(x[:16]), y[:16]).backward()  # micro-batch 1, the usual loop
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"found gradients in \.grad .* zero_grad\(\) first"):
        if form == "step":
            optimizer.step(lambda: _backward(F.cross_entropy(model(x[16:]), y[16:])))
        else:
            with optimizer.evaluations() as evaluations:
                for _ in evaluations:
                    pass
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is not None for p in model.parameters())  # nothing was zeroed


def test_consecutive_steps_without_zero_grad_are_fine():
    """The gradients a step leaves behind are its own: the next step may zero them."""
    model, optimizer = make("sam")
    x, y = batch()
    for _ in range(3):
        optimizer.step(lambda: _backward(F.cross_entropy(model(x), y)))


def test_gradients_zeroed_in_place_are_fine():
    model, optimizer = make("sam")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    optimizer.zero_grad(set_to_none=False)
    optimizer.step(lambda: _backward(F.cross_entropy(model(x), y)))


def test_a_backward_after_a_step_is_caught_too():
    model, optimizer = make("sam")
    x, y = batch()
    optimizer.step(lambda: _backward(F.cross_entropy(model(x), y)))
    F.cross_entropy(model(x), y).backward()  # accumulates into the gradients the step left
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        optimizer.step(lambda: _backward(F.cross_entropy(model(x), y)))
