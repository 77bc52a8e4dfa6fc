"""ASAM: Adaptive Sharpness-Aware Minimization (Kwon, Kim, Park, Choi; ICML 2021)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import AdaptiveEllipsoid


class ASAM(SharpnessAwareOptimizer):
    """Adaptive SAM: ε = ρ·T²g / ‖T g‖ with T = |w| + η, elementwise.

    Maximises the loss over the adaptive ball ‖T_w⁻¹ ε‖₂ ≤ ρ, which is invariant to the
    rescalings of a ReLU network that leave its function unchanged (paper eqs. 9–11). T is
    applied to *every* parameter, biases and normalisation parameters included: ``eta = 0``
    is exactly the popular port's ``adaptive=True`` (davda54/sam), and η > 0 lets zero
    weights (zero-initialised biases) move, as the official code does for the parameters it
    scales (PITFALLS P6). ξ = 1e-16 as in SamsungLabs/ASAM. Two passes, one parameter copy.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0.
        eta: offset η ≥ 0.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = flatminima.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Kwon et al., ICML 2021"
    passes_text = "2"
    extra_memory = "1 P"

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.5,
            hp.non_negative,
            "ρ",
            "radius of the adaptive ball; the CIFAR-10 value of the official README (1.0 for "
            "CIFAR-100), tuned there with η = 0 and T = 1 on parameters whose name lacks "
            "'weight'; here T covers every parameter, so biases move less at the same ρ",
        ),
        hp.Hyperparameter(
            "eta",
            0.01,
            hp.non_negative,
            "η",
            "offset keeping T invertible; the official ASAM class's default (its CIFAR script "
            "passes 0.0)",
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "eta": eta},
            direction=GradientDirection(),
            neighborhood=AdaptiveEllipsoid(),
            model=model,
            foreach=foreach,
        )
