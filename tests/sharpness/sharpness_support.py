"""Models with known Hessians, and exact references, for the sharpness tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F


class Quadratic(nn.Module):
    """L(w) = ½(w − c)ᵀA(w − c): Hessian A everywhere, minimum at w = c when A ⪰ 0."""

    def __init__(self, matrix: Tensor, center: Tensor | None = None, start: Tensor | None = None):
        super().__init__()
        dim = matrix.shape[0]
        center = torch.zeros(dim, dtype=matrix.dtype) if center is None else center
        self.register_buffer("matrix", matrix.clone())
        self.register_buffer("center", center.clone())
        self.w = nn.Parameter((center if start is None else start).clone())

    def forward(self, batch: Any = None) -> Tensor:
        d = self.w - self.center
        return 0.5 * d @ (self.matrix @ d)


def quadratic_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(batch)


QUADRATIC_BATCHES = [None]  # the quadratic ignores its batch: one pass = one evaluation


def symmetric_with_spectrum(eigenvalues: Sequence[float], seed: int = 0) -> Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q, in float64."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return 0.5 * (matrix + matrix.T)


def mlp(*, seed: int = 0, dtype: torch.dtype = torch.float64, batchnorm: bool = False) -> nn.Module:
    """5 → 8 → 3 with tanh (smooth, so its Hessian has no ReLU kinks); 75 parameters."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def classification_batches(
    num_batches: int = 3, batch_size: int = 16, *, seed: int = 1, dtype: torch.dtype = torch.float64
) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 5, generator=generator, dtype=dtype),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(num_batches)
    ]


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def full_hessian(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """The exact Hessian of the mean batch cross-entropy over all trainable parameters.

    Built by ``torch.autograd.functional.hessian`` on a function of one flat vector, an
    independent path from the double-backward products under test. The model's current
    mode is used as is.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(vector: Tensor) -> Tensor:
        pieces = vector.split([p.numel() for _, p in named])
        params = {name: piece.view_as(p) for (name, p), piece in zip(named, pieces, strict=True)}
        total = sum(F.cross_entropy(functional_call(model, params, (x,)), y) for x, y in batches)
        return total / len(batches)

    return torch.autograd.functional.hessian(loss, flat)


def rademacher_std(matrix: Tensor, num_probes: int) -> float:
    """Standard deviation of the mean of N Hutchinson samples: √(2(‖A‖_F² − Σ A_ii²)/N)."""
    variance = 2.0 * (matrix.square().sum() - matrix.diagonal().square().sum())
    return float(torch.sqrt(variance / num_probes))


def state_of(model: nn.Module) -> dict[str, Any]:
    """Everything a measurement must leave alone, copied."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


def assert_same_state(before: dict[str, Any], model: nn.Module) -> None:
    after = state_of(model)
    assert after["ids"] == before["ids"], "parameter objects were replaced"
    assert after["modes"] == before["modes"], "module modes changed"
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, tensor in before[kind].items():
            assert torch.equal(after[kind][name], tensor), f"{kind[:-1]} {name} changed"
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (now is None) == (grad is None) and (grad is None or torch.equal(now, grad)), name
