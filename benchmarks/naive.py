"""The SAM most users copy: a per-parameter Python loop, written here as the baseline.

This is the shape of the 60-line ``sam.py`` that circulates in blog posts and repositories:
every parameter is visited in Python on every phase of the step, the weights are saved by
``clone()`` one tensor at a time into the optimizer state, the perturbation is a fresh tensor
per parameter, and the global norm stacks one norm per parameter. It is deliberately *not*
optimised — it is what flatminima is compared against, not part of the library.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class NaiveLoopSAM:
    """SAM with a loop over parameters in every phase (ρ·g/‖g‖, restore by copy)."""

    def __init__(
        self, params: Iterable[Tensor], base_optimizer: torch.optim.Optimizer, rho: float
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.saved: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in with_grad]), 2)
        scale = self.rho / (norm + 1e-12)
        for p in with_grad:
            self.saved[p] = p.clone()
            perturbation = p.grad * scale
            p.add_(perturbation)

    @torch.no_grad()
    def second_step(self) -> None:
        for p, value in self.saved.items():
            p.copy_(value)
        self.saved = {}
        self.base_optimizer.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
