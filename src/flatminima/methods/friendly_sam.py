"""Friendly SAM (Li, Zhou, He, Cheng, Huang; CVPR 2024)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.directions import FriendlyDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import EuclideanBall


class FriendlySAM(SharpnessAwareOptimizer):
    """Friendly SAM: perturb along the batch-specific part of the gradient, g_t − σ·m_{t−1}.

    The minibatch gradient is a full-gradient component plus batch noise, and the full-gradient
    part of SAM's perturbation hurts generalisation. F-SAM estimates it by an exponential
    moving average m of past raw gradients and removes it before normalising:
    d_t = g_t − σ·m_{t−1}, m_t = λ·m_{t−1} + (1 − λ)·g_t, ε = ρ·d_t/‖d_t‖. This is the update
    of the authors' code (nblt/F-SAM): the EMA takes the raw gradient (PITFALLS P10), the
    direction uses the EMA from before the update, m starts at the first gradient (so the
    first step is exactly SAM). For σ = 1 it is parallel to the paper's form g_t − σ·m_t.
    σ = 0 is SAM. The EMA is persistent state, saved by ``state_dict()``. Two passes, two
    parameter copies (the EMA and the weights' backup).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0.
        sigma: removal coefficient σ ≥ 0.
        lmbda: EMA decay λ in [0, 1).
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = flatminima.FriendlySAM(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Li et al., CVPR 2024"
    passes_text = "2"
    extra_memory = "2 P (EMA + backup)"
    memory_copies = 2.0

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.2,
            hp.non_negative,
            "ρ",
            "radius of the Euclidean ball (authors' run.sh, CIFAR-100 ResNet-18)",
        ),
        hp.Hyperparameter(
            "sigma", 1.0, hp.non_negative, "σ", "removal coefficient of the full-gradient estimate"
        ),
        hp.Hyperparameter("lmbda", 0.6, hp.half_open_unit, "λ", "EMA decay (authors' run.sh)"),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.2,
        sigma: float = 1.0,
        lmbda: float = 0.6,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "sigma": sigma, "lmbda": lmbda},
            direction=FriendlyDirection(),
            neighborhood=EuclideanBall(),
            model=model,
            foreach=foreach,
        )
