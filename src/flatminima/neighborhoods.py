"""Neighbourhoods: which ε of "size ρ" in a given metric maximises the first-order loss.

Each neighbourhood overwrites the ascent direction d (held in the gradients) with ε, in place.
All of them share two guards: a zero or non-finite normaliser gives ε = 0, so the step
degenerates to the base optimizer instead of writing NaN into the weights (PITFALLS P7), and
the normaliser is taken *before* any in-place change of the direction (P16).

The maximiser of dᵀε over {ε : εᵀMε ≤ ρ²} is ε = ρ·M⁻¹d / √(dᵀM⁻¹d); every class below is this
formula for one metric M, computed without forming M.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from flatminima import kernels
from flatminima.groups import GroupView, all_grads

GRADIENT_NORM_EPSILON = 1e-12
"""ξ added to the normaliser, as in the authors' PyTorch codes (davda54/sam, F-SAM, TSAM)."""

ASAM_NORM_EPSILON = 1e-16
"""ξ of SamsungLabs/ASAM (``asam.py``)."""


class Neighborhood(Protocol):
    """Turns the ascent direction (held in ``view.grads``) into the perturbation ε, in place."""

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None: ...


def _usable(normaliser: float) -> bool:
    return math.isfinite(normaliser) and normaliser > 0.0


def _zero_all(views: list[GroupView], *, foreach: bool) -> None:
    kernels.zero_(all_grads(views), foreach=foreach)


def _scale_to_radius_(
    views: list[GroupView], norm: float, norm_tensor: Tensor, xi: float, *, foreach: bool
) -> None:
    """d ← ρ·d/(D + ξ) in every view, with the view's group's ρ and the global normaliser D
    (a float in eager mode, a traced tensor under ``torch.compile``: see
    :func:`kernels.traced_factor`)."""
    for view in views:
        rho = float(view.hyperparameters["rho"])
        factor = kernels.traced_factor(rho, norm + xi, norm_tensor + xi)
        kernels.scale_(view.grads, factor, foreach=foreach)


class EuclideanBall:
    """ε = ρ·d / (‖d‖ + ξ): SAM's ball, M = I (Foret et al. 2021, eq. 2).

    ‖d‖ is global over every parameter with a gradient in every group; ``rho`` is read per
    group, so a group with its own ρ gets that multiple of the shared unit direction.
    """

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        norm, norm_tensor = kernels.norm_and_tensor(all_grads(views), foreach=foreach)
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        _scale_to_radius_(views, norm, norm_tensor, GRADIENT_NORM_EPSILON, foreach=foreach)


class MongeBall:
    """ε = ρ·d / (‖d‖·√(1 + ‖d‖²)): the ball of the Monge metric M = I + ddᵀ.

    Jacobsen & Arvanitidis (2025): embedding the loss surface as the graph θ ↦ (θ, ℓ(θ)) pulls
    the Euclidean metric back to G = I + ggᵀ. By Sherman–Morrison G⁻¹g = g/(1 + ‖g‖²), so the
    maximiser has SAM's direction and the adaptive radius ρ/√(1 + ‖g‖²): SAM where the gradient
    is small, plain gradient descent where it is large. ξ is added to ‖d‖ as for SAM.
    """

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        norm, norm_tensor = kernels.norm_and_tensor(all_grads(views), foreach=foreach)
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        shrink = math.sqrt(1.0 + norm * norm)
        for view in views:
            scale = kernels.traced_factor(
                float(view.hyperparameters["rho"]),
                (norm + GRADIENT_NORM_EPSILON) * shrink,
                (norm_tensor + GRADIENT_NORM_EPSILON) * (1.0 + norm_tensor.square()).sqrt(),
            )
            kernels.scale_(view.grads, scale, foreach=foreach)


class AdaptiveEllipsoid:
    """ε = ρ·T²d / (‖T d‖ + ξ) with T = |w| + η (ASAM, Kwon et al. 2021, eq. 11).

    The ball ‖T⁻¹ε‖ ≤ ρ, i.e. M = T⁻². T is applied to every parameter, biases included
    (η = 0 is exactly the popular port's ``adaptive=True``; η > 0 lets zero weights move).
    ``rho`` and ``eta`` are read per group. T is built in the scratch buffer, which the engine
    then reuses for the weights' backup.

    Args:
        eta: a fixed η for every group (GSAM's and WSAM's ``adaptive=True`` is η = 0); ``None``
            reads ``eta`` from each group (ASAM).
        epsilon: ξ (SamsungLabs/ASAM's 1e-16 by default; the GSAM and WSAM codes add 1e-12).
    """

    def __init__(self, *, eta: float | None = None, epsilon: float = ASAM_NORM_EPSILON) -> None:
        self.eta = eta
        self.epsilon = epsilon

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        scales = []
        for view in views:
            scale = view.scratch_or_new()
            kernels.copy_(scale, view.params, foreach=foreach)
            kernels.abs_(scale, foreach=foreach)
            eta = float(view.hyperparameters["eta"]) if self.eta is None else self.eta
            if eta != 0.0:  # adding 0 changes nothing: skip a pass over the tensors
                kernels.add_scalar_(scale, eta, foreach=foreach)
            kernels.mul_(view.grads, scale, foreach=foreach)  # T d
            scales.append(scale)
        norm, norm_tensor = kernels.norm_and_tensor(all_grads(views), foreach=foreach)
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        for view, scale in zip(views, scales, strict=True):
            kernels.mul_(view.grads, scale, foreach=foreach)  # T² d
        _scale_to_radius_(views, norm, norm_tensor, self.epsilon, foreach=foreach)


class FisherEllipsoid:
    """ε = ρ·F⁻¹d / (√(dᵀF⁻¹d) + ξ) with the diagonal Fisher F = 1 + η·g⊙g (Kim et al. 2022).

    The radius the paper calls γ is ``rho``; ``eta`` scales the empirical Fisher of the current
    minibatch gradient. One sweep over the gradients (spec §4.3) turns each g into F⁻¹g and
    sums gᵀF⁻¹g; a scale by ρ/D then makes ε. f is never stored, so no scratch is needed. η
    and ρ are read per group, D is global. Not invariant to the loss scale: unscale AMP
    gradients before the first step.
    """

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        quadratic = sum(
            kernels.fisher_precondition_(
                view.grads, float(view.hyperparameters["eta"]), foreach=foreach
            )
            for view in views
        )
        norm, norm_tensor = _root_as_float_and_tensor(quadratic)  # √(gᵀF⁻¹g)
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        _scale_to_radius_(views, norm, norm_tensor, GRADIENT_NORM_EPSILON, foreach=foreach)


def _root_as_float_and_tensor(square: float | Tensor) -> tuple[float, Tensor]:
    """√square as a float (for the guards) and a 0-d float64 tensor (for arithmetic traced
    under ``torch.compile``), as :func:`kernels.norm_and_tensor` returns a norm. Taken in a
    function of its own: ``float()`` breaks the compiled graph, and where the break falls
    in the caller's own frame the float resumes as a value the graph is specialised on
    (one recompilation per step until the compiler makes it dynamic)."""
    root = torch.as_tensor(square, dtype=torch.float64).sqrt()
    return float(root), root


class WithRadius:
    """The neighbourhood ``inner`` with the radius ``radius(group)`` in place of ``group["rho"]``.

    For radii that are a function of the group at this step: GSAM's ρ_t, which follows the
    learning rate. The group itself is not written to; each view of this step gets a copy of
    its hyperparameters with ``rho`` replaced.
    """

    def __init__(self, inner: Neighborhood, radius: Callable[[Mapping[str, Any]], float]) -> None:
        self.inner = inner
        self.radius = radius

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        for view in views:
            view.hyperparameters = {
                **view.hyperparameters,
                "rho": self.radius(view.hyperparameters),
            }
        self.inner.perturbation_(views, foreach=foreach)


ESAM_NORM_EPSILON = 1e-7
"""ξ of dydjw9/Efficient_SAM (``utils/Esam.py``)."""


class InflatedBall:
    """ε = ρ·d / (‖d‖ + ξ) / β, ξ = 1e-7: ESAM's ball, inflated by 1/β (Du et al. 2022).

    ESAM perturbs only a random subset of the parameters, each kept with probability β, and
    rescales by 1/β so that the perturbation has SAM's size in expectation. The views hold only
    the kept tensors (the others have no gradient), so ‖d‖ is the norm over them. ``rho`` is
    read per group, ``beta`` once (it shapes the whole step). The scale is computed in the
    authors' order, ρ/(‖d‖ + ξ)/β.
    """

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        norm, _ = kernels.norm_and_tensor(all_grads(views), foreach=foreach)  # as SAM's
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        for view in views:
            hyperparameters = view.hyperparameters
            scale = (
                float(hyperparameters["rho"])
                / (norm + ESAM_NORM_EPSILON)
                / float(hyperparameters["beta"])
            )
            kernels.scale_(view.grads, scale, foreach=foreach)


SPARSE_SAM_NORM_EPSILON = 1e-7
"""ξ of Sparse SAM's code (Mi-Peng/Sparse-Sharpness-Aware-Minimization ``solver/sam.py``)."""


class MaskedBall:
    """ε = ρ·m ⊙ d / (‖d‖ + ξ), ξ = 1e-7: SAM's ball restricted to a mask (Sparse SAM).

    The norm is that of the whole, *unmasked* direction, as in the authors' code, so
    ‖ε‖ ≤ ρ (equality only for an all-ones mask). ``masks(params)`` returns one bit-packed
    mask per parameter (the method's persistent state, :func:`kernels.pack_mask`), unpacked
    one tensor at a time where it is applied; ``rho`` is read per group.
    """

    def __init__(self, masks: Callable[[list[Tensor]], list[Tensor]]) -> None:
        self.masks = masks

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        norm, norm_tensor = kernels.norm_and_tensor(all_grads(views), foreach=foreach)
        if not _usable(norm):
            _zero_all(views, foreach=foreach)
            return
        _scale_to_radius_(views, norm, norm_tensor, SPARSE_SAM_NORM_EPSILON, foreach=foreach)
        for view in views:
            kernels.apply_packed_mask_(view.grads, self.masks(view.params), foreach=foreach)
