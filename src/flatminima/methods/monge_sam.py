"""Monge SAM (Jacobsen & Arvanitidis; arXiv 2502.08448, 2025)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import MongeBall


class MongeSAM(SharpnessAwareOptimizer):
    """Monge SAM: SAM in the loss surface's own metric, ε = ρ·g / (‖g‖·√(1 + ‖g‖²)).

    The loss surface embedded as the graph θ ↦ (θ, L(θ)) carries the pulled-back Monge metric
    G = I + ggᵀ; the first-order maximiser over δᵀGδ ≤ ρ² is ρ·G⁻¹g/√(gᵀG⁻¹g), which by
    Sherman–Morrison is SAM's direction with the adaptive radius ρ/√(1 + ‖g‖²): SAM where the
    gradient is small, plain gradient descent where it is large. The perturbation depends on
    the gradient's absolute scale (mean-reduced losses; unscale AMP gradients first). Two
    passes, one parameter copy.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = flatminima.MongeSAM(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Jacobsen & Arvanitidis, 2025"
    passes_text = "2"
    extra_memory = "1 P"

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.05,
            hp.non_negative,
            "ρ",
            "radius in the Monge metric; SAM's CIFAR-10 value (the paper's default could not "
            "be verified, spec §5.5)",
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
            neighborhood=MongeBall(),
            model=model,
            foreach=foreach,
        )
