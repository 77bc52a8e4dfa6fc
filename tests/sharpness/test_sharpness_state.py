"""Every measurement leaves weights, buffers, gradients and modes exactly as it found them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from sharpness_support import assert_same_state, classification_batches, cross_entropy, state_of
from torch import nn

from flatminima import sharpness


def bn_dropout_mlp() -> nn.Module:
    """BatchNorm (buffers a train-mode forward would change) and dropout, partly in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()
    model.train()
    model[3].eval()  # a mixed-mode model must come back mixed
    # Gradients left by the user's own backward must survive untouched.
    cross_entropy(model, classification_batches(1)[0]).backward()
    return model


MEASUREMENTS: dict[str, Callable[..., Any]] = {
    "hvp": lambda m, f, b, **kw: sharpness.hessian_vector_product(
        m, f, b, [torch.ones_like(p) for p in m.parameters()], **kw
    ),
    "lanczos": lambda m, f, b, **kw: sharpness.hessian_eigenpairs(m, f, b, k=2, **kw),
    "power": lambda m, f, b, **kw: sharpness.hessian_eigenvalues(m, f, b, method="power", **kw),
    "trace": lambda m, f, b, **kw: sharpness.hessian_trace(m, f, b, num_probes=3, **kw),
    "density": lambda m, f, b, **kw: sharpness.spectral_density(m, f, b, num_iter=5, **kw),
    "worst": lambda m, f, b, **kw: sharpness.worst_case_sharpness(m, f, b, rho=0.1, m=4, **kw),
    "adaptive": lambda m, f, b, **kw: sharpness.worst_case_sharpness(
        m, f, b, rho=0.5, metric="adaptive", **kw
    ),
    "average": lambda m, f, b, **kw: sharpness.average_sharpness(m, f, b, rho=0.1, **kw),
    "line": lambda m, f, b, **kw: sharpness.landscape_1d(m, f, b, alphas=[0.5, 1.0], **kw),
    "interpolation": lambda m, f, b, **kw: sharpness.interpolate_1d(
        m, f, b, bn_dropout_mlp().apply(_shift), alphas=[0.5, 1.0], **kw
    ),
    "surface": lambda m, f, b, **kw: sharpness.surface_2d(m, f, b, alphas=[1.0], betas=[1.0], **kw),
    "measure": lambda m, f, b, **kw: sharpness.measure_sharpness(
        m, f, b, num_probes=2, max_iter=4, steps=1, num_samples=1, **kw
    ),
}


def _shift(module: nn.Module) -> None:
    """A different end point for the interpolation, running statistics included."""
    with torch.no_grad():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.add_(0.5)


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
def test_measurement_leaves_model_untouched(name: str, train_mode: bool) -> None:
    model = bn_dropout_mlp()
    model[3].p = 0.0 if train_mode else 0.5  # train-mode products must be deterministic
    before = state_of(model)
    MEASUREMENTS[name](model, cross_entropy, classification_batches(), train_mode=train_mode)
    assert_same_state(before, model)


def test_measurements_see_eval_mode_and_train_mode_when_asked() -> None:
    model = bn_dropout_mlp()
    seen: list[bool] = []

    def spy(m: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(m[1].training)
        return cross_entropy(m, batch)

    sharpness.landscape_1d(model, spy, classification_batches(1), alphas=[0.0])
    sharpness.landscape_1d(model, spy, classification_batches(1), alphas=[0.0], train_mode=True)
    assert seen == [False, True]
    assert model[1].training and not model[3].training


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
@pytest.mark.parametrize("fail_at", [1, 3])
def test_model_restored_when_loss_raises_mid_measurement(name: str, fail_at: int) -> None:
    model = bn_dropout_mlp()
    before = state_of(model)
    calls = 0

    def failing(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            with torch.no_grad():  # as if the failure struck after a half-finished update
                next(m.parameters()).add_(1.0)
            raise Boom("loss failed")
        return cross_entropy(m, batch)

    with pytest.raises(Boom):
        MEASUREMENTS[name](model, failing, classification_batches(), train_mode=True)
    assert_same_state(before, model)
