"""Fisher SAM (Kim, Li, Hu, Hospedales; ICML 2022)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import FisherEllipsoid


class FisherSAM(SharpnessAwareOptimizer):
    """Fisher SAM: ε = γ·F⁻¹g / √(gᵀF⁻¹g) in the Fisher-information ellipsoid εᵀFε ≤ γ².

    SAM's Euclidean ball is replaced by the ellipsoid of the (diagonal, empirical) Fisher
    information F = diag(1 + η·g⊙g) of the current minibatch gradient, regularised by the
    identity. Since F ⪰ I, ‖ε‖₂ ≤ γ; η = 0 is SAM with ρ = γ exactly. Coordinates with a large
    gradient are damped: ε_i ∝ g_i/(1 + η g_i²). No official code exists; the estimator and
    defaults follow the published reimplementations (spec §4.2, marked UNVERIFIED there).
    The perturbation depends on the gradient's absolute scale: use mean-reduced losses and
    unscale AMP gradients first. Two passes, one parameter copy.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius γ ≥ 0.
        eta: Fisher scale η ≥ 0.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = flatminima.FisherSAM(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Kim et al., ICML 2022"
    passes_text = "2"
    extra_memory = "1 P"

    declaration = (
        hp.Hyperparameter(
            "rho", 0.1, hp.non_negative, "γ", "radius of the Fisher ellipsoid (reimplementations)"
        ),
        hp.Hyperparameter(
            "eta", 1.0, hp.non_negative, "η", "scale of the empirical Fisher (reimplementations)"
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.1,
        eta: float = 1.0,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "eta": eta},
            direction=GradientDirection(),
            neighborhood=FisherEllipsoid(),
            model=model,
            foreach=foreach,
        )
