"""Friendly SAM's fast path (the EMA's next value written into the backup's lent memory and
committed by the ball) gives the same weights and EMA, bit for bit, as the original parts,
FriendlyDirection then EuclideanBall, and keeps their guard: a non-finite gradient leaves
the EMA untouched and ε = 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatminima
from flatminima import kernels
from flatminima.directions import FRIENDLY_EMA, FriendlyDirection
from flatminima.neighborhoods import EuclideanBall

LARGE = 3 * kernels.CHUNK_NUMEL // 256 + 1  # rows of 256: a weight on the chunked path


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, LARGE), nn.Tanh(), nn.Linear(LARGE, 3)).to(dtype)
    assert net[0].weight.numel() >= kernels.FUSED_MIN_NUMEL  # the chunked path
    return net


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 256, generator=generator, dtype=dtype), torch.randint(
        0, 3, (8,), generator=generator
    )


def optimizer_for(net: nn.Module, *, original: bool, **hyperparameters) -> flatminima.FriendlySAM:
    base = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer = flatminima.FriendlySAM(base, **hyperparameters)
    if original:
        optimizer.direction, optimizer.neighborhood = FriendlyDirection(), EuclideanBall()
    return optimizer


def closure_for(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], scale: float = 1.0):
    def closure():
        x, y = data
        loss = nn.functional.cross_entropy(net(x), y) * scale
        loss.backward()
        return loss

    return closure


def emas(optimizer: flatminima.FriendlySAM) -> list[torch.Tensor]:
    return [
        optimizer.state[p][FRIENDLY_EMA] for p in optimizer.base_optimizer.param_groups[0]["params"]
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "hyperparameters", [{}, {"sigma": 0.3, "lmbda": 0.9}], ids=["defaults", "other"]
)
def test_the_fast_path_is_the_original_parts_bit_for_bit(dtype, hyperparameters):
    fast_net, original_net = model(dtype), model(dtype)
    fast = optimizer_for(fast_net, original=False, **hyperparameters)
    original = optimizer_for(original_net, original=True, **hyperparameters)
    deferred = []
    direction_ = type(fast.direction).direction_

    def watched(self, views, state, *, foreach):
        direction_(self, views, state, foreach=foreach)
        deferred.append(self.pending is not None)

    type(fast.direction).direction_ = watched
    try:
        for step in range(5):
            data = batch(step, dtype)
            fast.step(closure_for(fast_net, data))
            original.step(closure_for(original_net, data))
    finally:
        type(fast.direction).direction_ = direction_
    assert deferred == [False, True, True, True, True]  # the first step starts the EMA at g
    for a, b in zip(fast_net.parameters(), original_net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(emas(fast), emas(original), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_a_non_finite_gradient_leaves_the_ema_untouched_and_epsilon_zero(bad):
    fast_net, original_net = model(torch.float32), model(torch.float32)
    fast = optimizer_for(fast_net, original=False)
    original = optimizer_for(original_net, original=True)
    for step in range(2):
        data = batch(step, torch.float32)
        fast.step(closure_for(fast_net, data))
        original.step(closure_for(original_net, data))
    before = [m.clone() for m in emas(fast)]
    data = batch(2, torch.float32)
    fast.step(closure_for(fast_net, data, scale=bad))
    original.step(closure_for(original_net, data, scale=bad))
    for m, kept in zip(emas(fast), before, strict=True):
        assert torch.equal(m, kept)
    for a, b in zip(fast_net.parameters(), original_net.parameters(), strict=True):
        # The perturbed pass is as non-finite as the first, so the descent writes NaN: alike.
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_the_per_tensor_loop_takes_the_original_parts():
    """No fast path with foreach=False (the readable oracle): the EMA is updated in place."""
    net = model(torch.float32)
    optimizer = flatminima.FriendlySAM(torch.optim.SGD(net.parameters(), lr=0.05), foreach=False)
    for step in range(3):
        previous = [m.clone() for m in emas(optimizer)] if step else None
        optimizer.step(closure_for(net, batch(step, torch.float32)))
        assert optimizer.direction.pending is None
        if previous is not None:
            assert all(
                not torch.equal(m, p) for m, p in zip(emas(optimizer), previous, strict=True)
            )
