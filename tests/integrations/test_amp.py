"""Mixed precision with torch.amp.GradScaler on CPU (flatminima.amp), for every method.

The key check is exact: with a power-of-two loss scale and no autocast, scaling and
unscaling are exact in float32, so a scaled run must match the unscaled one bit for bit on
every path. Then fp16 autocast against fp32, overflows on either pass, and the scaler's own
bookkeeping (its scale backs off after an overflow and grows after clean steps).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flatminima
from flatminima import amp, methods

METHODS = list(methods.BY_NAME)


def make(name: str, *, seed: int = 0) -> tuple[nn.Module, flatminima.SharpnessAwareOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, methods.BY_NAME[name](base, model=model)


def data(steps: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator))
        for _ in range(steps)
    ]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train(name: str, form: str, scaler: torch.amp.GradScaler | None, autocast: bool = False):
    """Trains with one of the step forms; returns the model and the step losses."""
    model, optimizer = make(name)
    if scaler is not None:
        amp.use_grad_scaler(optimizer, scaler)
    torch.manual_seed(123)  # Tilted SAM's random starts
    losses = []

    def scaled(loss: torch.Tensor) -> torch.Tensor:
        return scaler.scale(loss) if scaler is not None else loss

    for x, y in data():

        def forward(x=x, y=y) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
                return F.cross_entropy(model(x), y)

        def closure(forward=forward) -> torch.Tensor:
            loss = forward()
            scaled(loss).backward()
            return loss

        if form == "closure":
            losses.append(float(optimizer.step(closure).detach()))
        elif form == "scaler.step":
            losses.append(float(scaler.step(optimizer, closure)))
        elif form == "evaluations":
            with optimizer.evaluations() as evaluations:
                for evaluation in evaluations:
                    evaluation.report(closure())
            losses.append(float(evaluations.loss))
        elif form == "manual":
            optimizer.zero_grad()
            losses.append(float(closure()))
            optimizer.first_step()
            closure()
            optimizer.second_step()
        if scaler is not None:
            scaler.update()
    return model, losses


FORMS = ["closure", "scaler.step", "evaluations", "manual"]


# The two-pass manual form exists for two-pass methods only (the others refuse it).
CASES = [
    (name, form)
    for name in METHODS
    for form in FORMS
    if form != "manual" or methods.BY_NAME[name].manual_two_pass
]


@pytest.mark.parametrize(("name", "form"), CASES)
def test_a_scaled_run_matches_the_unscaled_one_bit_for_bit(name, form):
    plain_form = "closure" if form == "scaler.step" else form
    reference, _ = train(name, plain_form, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled, _ = train(name, form, scaler)
    for a, b in zip(weights(scaled), weights(reference), strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**16  # grew once per clean step: update() saw every step


@pytest.mark.parametrize("name", METHODS)
def test_fp16_autocast_tracks_the_fp32_run(name):
    reference, _ = train(name, "closure", None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    mixed, _ = train(name, "closure", scaler, autocast=True)
    size = max(float(w.abs().max()) for w in weights(reference))
    for a, b in zip(weights(mixed), weights(reference), strict=True):
        assert float((a - b).abs().max()) < 2e-2 * size


def overflowing_closure(model, x, y, scaler, overflow_on_call: int, calls: list[int]):
    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        if len(calls) == overflow_on_call:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("overflow_on_call", [1, 2])
@pytest.mark.parametrize("name", METHODS)
def test_an_overflow_on_any_pass_skips_the_step_and_backs_the_scale_off(name, overflow_on_call):
    model, optimizer = make(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, backoff_factor=0.5)
    amp.use_grad_scaler(optimizer, scaler)
    (x, y), *_ = data()
    before = weights(model)
    calls: list[int] = []
    scaler.step(optimizer, overflowing_closure(model, x, y, scaler, overflow_on_call, calls))
    scaler.update()
    assert len(calls) == overflow_on_call  # no pass after the one that overflowed
    for a, b in zip(weights(model), before, strict=True):
        assert torch.equal(a, b)
    assert not optimizer.base_optimizer.state  # the base optimizer never stepped
    assert optimizer.state_dict()["method"]["step"] == 0
    assert scaler.get_scale() == 2.0**9
    # The next clean step trains normally.
    calls.clear()
    scaler.step(optimizer, overflowing_closure(model, x, y, scaler, 0, calls))
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before, strict=True))
    assert optimizer.state_dict()["method"]["step"] == 1


def test_manual_form_overflow_on_the_first_pass_makes_both_calls_no_ops():
    model, optimizer = make("sam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    amp.use_grad_scaler(optimizer, scaler)
    (x, y), *_ = data()
    before = weights(model)
    scaler.scale(F.cross_entropy(model(x), y) * math.inf).backward()
    optimizer.first_step()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    optimizer.second_step()
    scaler.update()
    for a, b in zip(weights(model), before, strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**9


def test_scaler_step_without_an_attached_scaler_is_refused_in_one_line():
    """The silent ×scale of PITFALLS P12 becomes an error naming the fix."""
    model, optimizer = make("sam")
    scaler = torch.amp.GradScaler("cpu")
    (x, y), *_ = data()

    def closure():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    closure()  # a scale exists (the scaler refuses to step before its first scale())
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"flatminima\.amp\.use_grad_scaler"):
        scaler.step(optimizer, closure)
    for a, b in zip(weights(model), before, strict=True):
        assert torch.equal(a, b)


def test_scaler_step_works_on_the_very_first_step_once_attached():
    model, optimizer = make("sam")
    scaler = torch.amp.GradScaler("cpu")
    amp.use_grad_scaler(optimizer, scaler)  # creates the scale: no "_scale is None"
    (x, y), *_ = data()

    def closure():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    assert scaler.step(optimizer, closure) is not None
    scaler.update()


def test_closure_as_a_keyword_is_refused_by_the_scaler_itself():
    """torch's GradScaler refuses ``closure=`` loudly; the positional form is the one to use."""
    _, optimizer = make("sam")
    scaler = torch.amp.GradScaler("cpu")
    amp.use_grad_scaler(optimizer, scaler)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(optimizer, closure=lambda: None)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_needs_no_scaler(name):
    model, optimizer = make(name)
    for x, y in data():

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        assert math.isfinite(float(optimizer.step(closure)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_use_grad_scaler_checks_its_arguments():
    _, optimizer = make("sam")
    with pytest.raises(TypeError, match="flatminima optimizer"):
        amp.use_grad_scaler(optimizer.base_optimizer, torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="GradScaler"):
        amp.use_grad_scaler(optimizer, object())
