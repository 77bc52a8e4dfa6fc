"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import EuclideanBall


class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization: descend with the gradient at w + ρ·g/‖g‖.

    Minimises max_{‖ε‖₂ ≤ ρ} L(w + ε) (paper eq. 1) with the first-order maximiser
    ε̂ = ρ·g/‖g‖ (eq. 2, p = 2) and the gradient approximation ∇L(w)|_{w+ε̂} (eq. 3).
    ‖g‖ is global over all parameter groups; ξ = 1e-12 is added to it as in the PyTorch codes,
    and a zero or non-finite ‖g‖ gives ε = 0. Two forward/backward passes per step, one extra
    parameter copy (the weights' backup, freed after the step).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer *instance* that takes the descent step (SGD, AdamW...).
        rho: radius ρ ≥ 0 (per group via ``{"params": ..., "rho": ...}``).
        model: the model; when given, BatchNorm running statistics are left untouched by the
            perturbed pass and, under DistributedDataParallel, the first pass runs in
            ``no_sync()`` so each process perturbs with its own gradient.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer = flatminima.SAM(base, rho=0.05, model=model)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Foret et al., ICLR 2021"
    passes_text = "2"
    extra_memory = "1 P (backup)"

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.05,
            hp.non_negative,
            "ρ",
            "radius of the Euclidean ball; 0.05 is the CIFAR-10 value of google-research/sam's "
            "README (0.1 for CIFAR-100 in the SamsungLabs/ASAM README's commands)",
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho},
            direction=GradientDirection(),
            neighborhood=EuclideanBall(),
            model=model,
            foreach=foreach,
        )
