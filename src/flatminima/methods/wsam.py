"""WSAM: Weighted Sharpness-Aware Minimization (Yue, Jiang, Ye, Gao, Liu, Zhang; KDD 2023,
"Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term")."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels
from flatminima.directions import GradientDirection
from flatminima.engine import Program, SharpnessAwareOptimizer
from flatminima.groups import GroupView
from flatminima.neighborhoods import (
    GRADIENT_NORM_EPSILON,
    AdaptiveEllipsoid,
    EuclideanBall,
    Neighborhood,
)
from flatminima.step import Step

CLIP_EPSILON = 1e-6
"""Added to the norm by ``torch.nn.utils.clip_grad_norm_``, which the authors' code calls."""


class WSAM(SharpnessAwareOptimizer):
    """Weighted SAM: the loss plus α times SAM's sharpness, α = γ/(1 − γ).

    WSAM minimises L(w) + α·[max_{‖ε‖≤ρ} L(w + ε) − L(w)], i.e. it weighs the
    sharpness term against the loss instead of SAM's fixed 1:1. With g = ∇L(w), the
    perturbed gradient g̃ = ∇L(w + ε) and ε = ρ·g/(‖g‖ + ξ) as in SAM, the gradient of the
    objective is g + α·(g̃ − g). Two forms (authors' code):

    * coupled (``decouple=False``): the base optimizer steps with α·g̃ + (1 − α)·g;
    * decoupled (default, as in the authors' code): the base optimizer steps with g alone, and
      after its step the sharpness term is applied as plain gradient descent outside the base
      optimizer's momentum and preconditioning: w ← w − lr·α·(g̃ − g), lr the group's learning
      rate at this step.

    γ = 0 is the base optimizer (bit for bit); coupled γ = 0.5 (α = 1) is SAM. With
    ``max_norm`` both g and g̃ are clipped to that global norm, as
    ``torch.nn.utils.clip_grad_norm_`` does (g ← g·min(1, max_norm/(‖g‖ + 1e-6))): g after ε is
    built from it, g̃ after the weights are restored, each after its DDP average. γ and ρ are
    read per group.

    Where this differs from the authors' code (intelligent-machine-learning/dlrover,
    ``atorch/atorch/optimizers/wsam.py``, class ``WeightedSAM``):

    * The clipping norm is taken over the optimizer's parameters (the code clips
      ``model.parameters()``: the same set when the optimizer holds the whole model).
    * Weights are restored by copy (the code subtracts ε, which is not exact in floating point).
    * A non-finite clean gradient (an overflowing step) makes ε = 0, so the perturbed pass ran
      at w: its gradient then serves as g too, instead of writing NaN into the weights.
    * A parameter with no gradient on the perturbed pass is skipped, as in the code; one with no
      gradient on the clean pass has g = 0 there (the code raises a KeyError).
    * ``adaptive=True`` is the code's davda54 form, ε = ρ·T²g/(‖T g‖ + ξ), T = |w|.

    Under DistributedDataParallel each process perturbs with its own gradient, as in the
    authors' code, and every gradient that enters the update is averaged over processes once:
    without clipping the update (and the decoupled sharpness g̃ − g) is averaged after it is
    formed, which is the same by linearity; with clipping g and g̃ are averaged before they are
    clipped, as the code does. Two passes per step; two parameter copies during the step (the
    clean gradient and the weights' backup), none kept between steps.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0.
        gamma: γ in [0, 1); the sharpness weight is α = γ/(1 − γ).
        decouple: apply the sharpness term after the base step (default) or inside it.
        max_norm: clip g and g̃ to this global norm (> 0); ``None`` does not clip.
        adaptive: the elementwise geometry T = |w|.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer = flatminima.WSAM(base, rho=0.05, gamma=0.9, model=model)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Yue et al., KDD 2023"
    passes_text = "2"
    extra_memory = "2 P during a step (g + backup)"
    memory_copies = 2.0

    declaration = (
        hp.Hyperparameter(
            "rho", 0.05, hp.non_negative, "ρ", "radius of the Euclidean ball (authors' default)"
        ),
        hp.Hyperparameter(
            "gamma",
            0.9,
            hp.half_open_unit,
            "γ",
            "sharpness weight, α = γ/(1 − γ) = 9 (authors' default)",
        ),
        hp.Hyperparameter(
            "decouple",
            True,
            hp.boolean,
            "-",
            "apply the sharpness term after the base step (authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "max_norm",
            None,
            hp.optional(hp.positive),
            "-",
            "clip g and g̃ to this global norm; None: no clipping (authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "adaptive",
            False,
            hp.boolean,
            "-",
            "elementwise geometry T = |w| (the code's davda54 form)",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        max_norm: float | None = None,
        adaptive: bool = False,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={
                "rho": rho,
                "gamma": gamma,
                "decouple": decouple,
                "max_norm": max_norm,
                "adaptive": adaptive,
            },
            model=model,
            foreach=foreach,
        )

    def program(self, step: Step) -> Program:
        """g at w, g̃ at w + ε, then the weighted update (coupled or decoupled)."""
        settings = step.groups[0]  # the step-level hyperparameters agree across groups
        max_norm = settings["max_norm"]
        clean = yield step.clean_pass()
        clean_grads = step.keep_gradients()
        step.perturb(GradientDirection(), _neighborhood(bool(settings["adaptive"])))
        # With clipping, g̃ must be averaged before it is clipped: DDP does it during the
        # backward, and the update is then formed from averaged gradients only, so the engine
        # must not average it again. Without clipping the engine averages the update once.
        yield step.perturbed_pass(synchronise=max_norm is not None)
        step.restore()
        views = step.views()
        kept = dict(zip(step.params, clean_grads, strict=True))
        clean_list = [
            _clean_or_zero(kept.get(p), grad)
            for view in views
            for p, grad in zip(view.params, view.grads, strict=True)
        ]
        perturbed = [g for view in views for g in view.grads]
        if max_norm is not None:
            step.all_reduce(clean_list)
            _clip_(perturbed, max_norm, foreach=step.foreach)
        clean_norm = kernels.norm_and_tensor(clean_list, foreach=step.foreach)
        if not math.isfinite(clean_norm[0]):
            # The neighbourhood made ε = 0, so the perturbed pass ran at w: g̃ stands in for g.
            # (Not an early return: every process must still run the same collectives.)
            kernels.copy_(clean_list, perturbed, foreach=step.foreach)
        elif max_norm is not None:
            _clip_(clean_list, max_norm, foreach=step.foreach, norm=clean_norm)
        if settings["decouple"]:
            sharpness = _decoupled_update_(views, clean_list, foreach=step.foreach)
            if max_norm is None:
                step.all_reduce([s for group in sharpness for s in group])
            step.after_descent(lambda: _descend_sharpness_(views, sharpness, foreach=step.foreach))
        else:
            _coupled_update_(views, clean_list, foreach=step.foreach)
        return clean.loss


def _neighborhood(adaptive: bool) -> Neighborhood:
    if adaptive:
        return AdaptiveEllipsoid(eta=0.0, epsilon=GRADIENT_NORM_EPSILON)
    return EuclideanBall()


def _clean_or_zero(kept: Tensor | None, perturbed: Tensor) -> Tensor:
    """The kept clean gradient, or zeros for a parameter that had none on the clean pass."""
    return torch.zeros_like(perturbed) if kept is None else kept


def _clip_(
    grads: list[Tensor],
    max_norm: float,
    *,
    foreach: bool,
    norm: tuple[float, Tensor] | None = None,
) -> None:
    """g ← g·min(1, max_norm/(‖g‖ + 1e-6)): ``torch.nn.utils.clip_grad_norm_``'s rule.

    ``norm``: ‖g‖ as a float and as a 0-d tensor, when the caller has it already. The factor
    is computed from the tensor (the same IEEE arithmetic as from the float), so that
    ``torch.compile`` traces it rather than recompiling for each new value."""
    value, tensor = kernels.norm_and_tensor(grads, foreach=foreach) if norm is None else norm
    if float(max_norm) / (value + CLIP_EPSILON) < 1.0:  # false for a non-finite norm (no NaN)
        kernels.scale_(grads, float(max_norm) / (tensor + CLIP_EPSILON), foreach=foreach)


def _alphas(views: list[GroupView]) -> list[float]:
    """α = γ/(1 − γ) per group."""
    return [
        float(v.hyperparameters["gamma"]) / (1.0 - float(v.hyperparameters["gamma"])) for v in views
    ]


def _split(views: list[GroupView], tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` (one per parameter of ``views``, in order) cut into one list per view."""
    pieces, offset = [], 0
    for view in views:
        pieces.append(tensors[offset : offset + len(view.params)])
        offset += len(view.params)
    return pieces


def _coupled_update_(views: list[GroupView], clean: list[Tensor], *, foreach: bool) -> None:
    """p.grad ← α·g̃ + (1 − α)·g, in the authors' order of operations."""
    for view, alpha, clean_grads in zip(views, _alphas(views), _split(views, clean), strict=True):
        kernels.scale_(view.grads, alpha, foreach=foreach)
        kernels.add_(view.grads, clean_grads, alpha=1.0 - alpha, foreach=foreach)


def _decoupled_update_(
    views: list[GroupView], clean: list[Tensor], *, foreach: bool
) -> list[list[Tensor]]:
    """p.grad ← g for the base step; returns the sharpness g̃ − g, built in g̃'s memory."""
    sharpness = []
    for view, clean_grads in zip(views, _split(views, clean), strict=True):
        kernels.add_(view.grads, clean_grads, alpha=-1.0, foreach=foreach)  # g̃ − g
        sharpness.append(list(view.grads))
        for p, g in zip(view.params, clean_grads, strict=True):
            p.grad = g
    return sharpness


def _descend_sharpness_(
    views: list[GroupView], sharpness: list[list[Tensor]], *, foreach: bool
) -> None:
    """w ← w − lr·α·(g̃ − g) per group, with the learning rate the base step just used."""
    for view, alpha, terms in zip(views, _alphas(views), sharpness, strict=True):
        if alpha == 0.0:
            continue
        kernels.add_(
            view.params, terms, alpha=-float(view.hyperparameters["lr"]) * alpha, foreach=foreach
        )
