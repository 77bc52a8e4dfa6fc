"""The SAM most users copy: a per-parameter Python loop, written here as the baseline.

This is the shape of the 60-line ``sam.py`` that circulates in blog posts and repositories:
every parameter is visited in Python on every phase of the step, the weights are saved by
``clone()`` one tensor at a time into the optimizer state, the perturbation is a fresh tensor
per parameter, and the global norm stacks one norm per parameter. It is deliberately *not*
optimised — it is what flatminima is compared against, not part of the library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


class NaiveTiltedSAM:
    """Tilted SAM as its released code organises the step, per parameter in Python.

    Written from the description of the authors' "random1" sampler (spec §6.3), for the
    comparison only: for each of ``num_samples`` samples the weights are saved, a Gaussian
    start ζ is drawn per parameter and kept, projected onto the r-ball, a SAM step is taken
    from θ + ζ, and a *clone of every gradient* at θ + ε_j is kept together with the loss.
    The softmax(t·L)-weighted sum of the clones is built at the end, parameter by parameter.
    Its memory therefore grows with the number of samples: s gradient copies, plus the saved
    weights and the noise.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float,
        tilt: float,
        num_samples: int,
        radius: float,
        noise_scale: float = 1.0,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.tilt = tilt
        self.num_samples = num_samples
        self.radius = radius
        self.noise_scale = noise_scale

    def step(self, closure: Callable[[], Tensor]) -> None:
        losses: list[float] = []
        gradients: list[dict[Tensor, Tensor]] = []
        for _ in range(self.num_samples):
            with torch.no_grad():
                saved = {p: p.clone() for p in self.params}
                noise = {p: torch.randn_like(p) * self.noise_scale for p in self.params}
                noise_norm = torch.norm(torch.stack([n.norm(2) for n in noise.values()]), 2)
                shrink = torch.clamp(noise_norm, max=self.radius) / noise_norm
                for p in self.params:
                    p.add_(noise[p] * shrink)
            closure()  # at θ + ζ
            with torch.no_grad():
                with_grad = [p for p in self.params if p.grad is not None]
                norm = torch.norm(torch.stack([p.grad.norm(2) for p in with_grad]), 2)
                scale = self.rho / (norm + 1e-12)
                for p in with_grad:
                    p.add_(p.grad * scale)
            losses.append(float(closure().detach()))  # at θ + ε_j
            gradients.append(
                {p: p.grad.clone() for p in self.params if p.grad is not None}
            )
            with torch.no_grad():
                for p in self.params:
                    p.copy_(saved[p])
            del saved, noise
        weights = torch.softmax(self.tilt * torch.tensor(losses), dim=0).tolist()
        with torch.no_grad():
            for p in self.params:
                total = torch.zeros_like(p)
                for weight, sample in zip(weights, gradients, strict=True):
                    if p in sample:
                        total.add_(sample[p], alpha=weight)
                p.grad = total
        self.base_optimizer.step()
