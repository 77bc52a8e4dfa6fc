"""Hugging Face accelerate with the real package, on CPU (flatminima.integrations.accelerate).

accelerate has one process-wide state: each test resets it before building its Accelerator.
fp16 on CPU gets no GradScaler from accelerate, so the tests give the accelerator a
``torch.amp.GradScaler("cpu")``: the code path (``accelerator.backward`` scaling the loss,
``scaler.step(optimizer, closure)``, ``scaler.update()``) is the one CUDA fp16 takes.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from flatminima import methods  # noqa: E402
from flatminima.integrations.accelerate import (  # noqa: E402
    SharpnessAwareAcceleratedOptimizer,
    prepare,
)

METHODS = list(methods.BY_NAME)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerator(scale: float | None = None, **kwargs) -> Accelerator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Accelerator(cpu=True, **kwargs)
    if scale is not None:
        result.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    return result


def make(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    extra = {"generator": torch.Generator().manual_seed(7)} if name == "tilted-sam" else {}
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, methods.BY_NAME[name](base, model=model, **extra)


def data(steps: int = 3, size: int = 16):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 8, generator=generator),
            torch.randint(0, 4, (size,), generator=generator),
        )
        for _ in range(steps)
    ]


def plain(name: str):
    model, optimizer = make(name)
    for x, y in data():

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train(acc: Accelerator, name: str):
    model, optimizer = make(name)
    model, optimizer = prepare(acc, model, optimizer)
    losses = []
    for x, y in data():

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            return loss

        losses.append(optimizer.step(closure))
    return model, optimizer, losses


@pytest.mark.parametrize("name", METHODS)
def test_prepared_optimizer_steps_exactly_and_returns_the_loss(name):
    model, optimizer, losses = train(accelerator(), name)
    assert isinstance(optimizer, SharpnessAwareAcceleratedOptimizer)
    assert same(model, plain(name))
    assert all(math.isfinite(float(loss)) for loss in losses)


@pytest.mark.parametrize("name", METHODS)
def test_fp16_grad_scaler_path_is_exact_with_a_power_of_two_scale(name):
    """``accelerator.backward`` scales, ``scaler.step(optimizer, closure)`` steps: every pass
    unscaled by the step, so the result is the unscaled run's, bit for bit."""
    acc = accelerator(scale=2.0**12)
    model, optimizer, _ = train(acc, name)
    assert same(model, plain(name))
    assert not optimizer.step_was_skipped


def test_fp16_overflow_skips_the_step_and_says_so():
    acc = accelerator(scale=2.0**12)
    model, optimizer = make("sam")
    model, optimizer = prepare(acc, model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), *_ = data()
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y) * (math.inf if len(calls) == 2 else 1.0)
        acc.backward(loss)
        return loss

    optimizer.step(closure)
    assert optimizer.step_was_skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert acc.scaler.get_scale() == 2.0**11


def test_plain_prepare_with_a_scaler_refuses_the_silent_path():
    """``accelerator.prepare`` alone: scaler.step(optimizer, closure) would leave the second
    pass scaled; the step refuses, naming the fix."""
    acc = accelerator(scale=2.0**12)
    model, optimizer = make("sam")
    model, optimizer = acc.prepare(model, optimizer)
    (x, y), *_ = data()

    def closure():
        loss = F.cross_entropy(model(x), y)
        acc.backward(loss)
        return loss

    closure()  # "after a backward": the scaler has a scale (else torch's own AssertionError)
    with pytest.raises(RuntimeError, match="use_grad_scaler"):
        optimizer.step(closure)


def test_plain_prepare_hides_the_manual_form():
    """What :func:`prepare` is for: accelerate's own wrapper has no first_step."""
    model, optimizer = make("sam")
    _, wrapped = accelerator().prepare(model, optimizer)
    assert not hasattr(wrapped, "first_step")


@pytest.mark.parametrize("name", ["sam", "friendly-sam", "tilted-sam"])
def test_accumulate_evaluates_every_micro_batch_at_every_point(name):
    """Four micro-batches in accumulate() give the full-batch step (float64)."""
    acc = accelerator(gradient_accumulation_steps=4)
    torch.set_default_dtype(torch.float64)
    try:
        model, optimizer = make(name)
        reference, reference_optimizer = make(name)
        model, optimizer = prepare(acc, model, optimizer)
        (x, y), *_ = data(1, size=32)
        results = []
        for xs, ys in zip(x.split(8), y.split(8), strict=True):
            with acc.accumulate(model):

                def closure(xs=xs, ys=ys):
                    loss = F.cross_entropy(model(xs), ys)
                    acc.backward(loss)
                    return loss

                results.append(optimizer.step(closure))

        def full():
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            return loss

        expected = reference_optimizer.step(full)
    finally:
        torch.set_default_dtype(torch.float32)
    assert results[:3] == [None, None, None]
    torch.testing.assert_close(results[3], expected.detach())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_manual_forms_are_reachable_through_the_wrapper():
    acc = accelerator(scale=2.0**12)
    model, optimizer = make("sam")
    model, optimizer = prepare(acc, model, optimizer)
    for x, y in data():
        optimizer.zero_grad()
        acc.backward(F.cross_entropy(model(x), y))
        optimizer.first_step()
        acc.backward(F.cross_entropy(model(x), y))
        optimizer.second_step()
    assert same(model, plain("sam"))

    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            evaluation.report(loss)
    assert math.isfinite(float(evaluations.loss.detach()))


def test_manual_form_inside_an_accumulate_window_is_refused():
    acc = accelerator(gradient_accumulation_steps=2)
    model, optimizer = make("sam")
    model, optimizer = prepare(acc, model, optimizer)
    (x, y), *_ = data()
    with acc.accumulate(model):
        acc.backward(F.cross_entropy(model(x), y))
        with pytest.raises(RuntimeError, match="accumulate"):
            optimizer.first_step()


def test_step_without_a_closure_is_a_loud_error():
    model, optimizer = make("sam")
    model, optimizer = prepare(accelerator(), model, optimizer)
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()


def test_cyclic_schedule_through_prepare_moves_the_base_learning_rate():
    acc = accelerator()
    model, optimizer = make("sam")
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2
    )
    model, optimizer, scheduler = prepare(acc, model, optimizer, scheduler)
    rates = []
    for x, y in data():

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            return loss

        optimizer.step(closure)
        scheduler.step()
        rates.append(optimizer.optimizer.base_optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.055, 0.1, 0.055])
