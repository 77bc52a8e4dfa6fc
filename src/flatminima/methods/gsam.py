"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang, Gong, Yuan, Cui, Adam,
Dvornek, Tatikonda, Duncan, Liu; ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
    WithRadius,
)
from flatminima.step import Step


class GSAM(SharpnessAwareOptimizer):
    """Surrogate-gap guided SAM: descend with d = g̃ − α·g⊥, g⊥ the part of g orthogonal to g̃.

    GSAM minimises the perturbed loss f_p(w) = max_{‖ε‖≤ρ} f(w + ε) and the surrogate gap
    h(w) = f_p(w) − f(w) together (paper, Algorithm 1). With g = ∇f(w) and the perturbed
    gradient g̃ = ∇f(w + ε), ε = ρ_t·g/(‖g‖ + ξ) as in SAM, it splits g against g̃,

        g∥ = (⟨g, g̃⟩ / ‖g̃‖²)·g̃,    g⊥ = g − g∥,

    and hands d = g̃ − α·g⊥ to the base optimizer. The correction is orthogonal to g̃
    (⟨d, g̃⟩ = ‖g̃‖²), so the descent on f_p is that of SAM, while −g⊥ (the part of ∇h
    orthogonal to g̃) lowers the gap. Dot products and norms are global over every parameter
    with a gradient in every group; α is read per group.

    The radius follows the learning rate (Algorithm 1, line 1) when ``rho_min`` is given:
    ρ_t = ρ_min + (ρ − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min), with lr_t the group's learning
    rate at this step, lr_max its learning rate when the optimizer was built (or ``lr_max``),
    and ρ_t = ρ when lr_max = lr_min. As in the authors' codes the line is extrapolated outside
    [lr_min, lr_max]: a warm-up from 0 gives ρ_t < ρ_min, negative while lr_t is below the
    point where the line crosses 0 (the perturbation then points downhill). Without
    ``rho_min`` the radius is whatever ``group["rho"]`` holds at each step, so a ρ scheduler of
    one's own works. α = 0 with ``rho_min`` unset or equal to ``rho`` is SAM, bit for bit.

    ``adaptive=True`` is the PyTorch port's elementwise geometry (davda54/sam's form, ASAM
    with η = 0): ε = ρ_t·T²g/(‖T g‖ + ξ), T = |w|. The paper and the JAX code instead scale
    SAM's ε elementwise, ε = ρ_t·|w|⊙g/(‖g‖ + ξ): a rescaled SAM step rather than the
    maximiser over the ball ‖T⁻¹ε‖ ≤ ρ_t (the two agree only when |w| is constant).

    Where this differs from the authors' code (juntang-zhuang/GSAM, ``gsam/gsam.py``; the JAX
    original is google-research/big_vision ``trainers/proj/gsam/gsam.py``):

    * The decomposition uses ⟨g, g̃⟩/‖g̃‖² exactly; the port computes the cosine
      ⟨g, g̃⟩/(‖g̃‖‖g‖ + ξ) and g∥ = cos·‖g‖·g̃/(‖g̃‖ + ξ) with ξ = 1e-12 in both places, which
      changes d by a relative O(ξ/‖g̃‖); the JAX code has no ξ there. ‖g̃‖ = 0 gives g∥ = 0.
    * The port's ρ comes from a scheduler object that its ``__init__`` already steps once:
      with the README's time-based ρ scheduler, ρ runs one scheduler step ahead of the learning
      rate. Here ρ_t is computed from the learning rate the step actually uses.
    * Weights are restored by copy (the port subtracts ε, which is not exact in floating point).
    * A non-finite clean gradient (an overflowing step) makes ε = 0, so the perturbed pass ran
      at w: its gradient is used as is, instead of writing NaN into the update.
    * A parameter with no gradient on the perturbed pass keeps no update (the base optimizer
      skips it, as in the port); one with no gradient on the clean pass has g = 0 there.

    Under DistributedDataParallel each process perturbs and decomposes with its own gradients
    and the update d is averaged once, as in both authors' codes. Two passes per step; two
    parameter copies during the step (the clean gradient and the weights' backup), none kept
    between steps.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: ρ (ρ_max when ``rho_min`` is given), ≥ 0.
        alpha: α ≥ 0, the weight of the surrogate-gap correction.
        rho_min: ρ_min in [0, rho], or ``None`` for a radius that does not follow the learning
            rate.
        lr_min: lr_min ≥ 0, the learning rate at which ρ_t = ρ_min.
        lr_max: the learning rate at which ρ_t = ρ; ``None`` takes each group's learning rate
            when the optimizer is built (or the group is added). Give it when a scheduler sets
            the peak itself (``OneCycleLR``'s ``max_lr``).
        adaptive: the elementwise geometry T = |w| (see above).
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer = flatminima.GSAM(base, rho=0.1, alpha=0.4, rho_min=0.02, model=model)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> scheduler.step()
    """

    paper = "Zhuang et al., ICLR 2022"
    passes_text = "2"
    extra_memory = "2 P during a step (g + backup)"
    memory_copies = 2.0

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.05,
            hp.non_negative,
            "ρ_max",
            "radius (ρ_max when rho_min is set); SAM's CIFAR-10 value, so that GSAM and SAM "
            "compare at one ρ (paper Table 4: 0.04 for ResNets, 0.6 for ViTs)",
        ),
        hp.Hyperparameter(
            "alpha",
            0.4,
            hp.non_negative,
            "α",
            "weight of the surrogate-gap correction; the authors' PyTorch CIFAR example",
        ),
        hp.Hyperparameter(
            "rho_min",
            None,
            hp.optional(hp.non_negative),
            "ρ_min",
            "radius at lr_min; None: the radius does not follow the learning rate",
        ),
        hp.Hyperparameter(
            "lr_min", 0.0, hp.non_negative, "lr_min", "learning rate at which ρ_t = ρ_min"
        ),
        hp.Hyperparameter(
            "lr_max",
            None,
            hp.optional(hp.non_negative),
            "lr_max",
            "learning rate at which ρ_t = ρ_max; None: the group's rate when the optimizer is "
            "built",
        ),
        hp.Hyperparameter(
            "adaptive",
            False,
            hp.boolean,
            "-",
            "elementwise geometry T = |w| (the PyTorch port's form)",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        alpha: float = 0.4,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        lr_max: float | None = None,
        adaptive: bool = False,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={
                "rho": rho,
                "alpha": alpha,
                "rho_min": rho_min,
                "lr_min": lr_min,
                "lr_max": lr_max,
                "adaptive": adaptive,
            },
            model=model,
            foreach=foreach,
        )

    @classmethod
    def _check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(values)
        rho, rho_min = values.get("rho"), values.get("rho_min")
        if rho is not None and rho_min is not None and rho_min > rho:
            raise ValueError(f"rho_min must be in [0, rho] = [0, {rho}], got {rho_min!r}")
        lr_min, lr_max = values.get("lr_min"), values.get("lr_max")
        if lr_min is not None and lr_max is not None and lr_min > lr_max:
            raise ValueError(
                f"lr_min must be in [0, lr_max] = [0, {lr_max}] (lr_max: the group's learning "
                f"rate when the optimizer was built, unless given), got {lr_min!r}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds the group (the engine fills in and checks the method's hyperparameters); a
        group without ``lr_max`` takes its learning rate now, checked before it is added."""
        lr_max = param_group.get("lr_max", self._method_defaults["lr_max"])
        if lr_max is None:
            lr = param_group.get("lr", self.base_optimizer.defaults.get("lr"))
            lr_min = param_group.get("lr_min", self._method_defaults["lr_min"])
            self._check_hyperparameters({"lr_min": lr_min, "lr_max": float(lr)})
        super().add_param_group(param_group)
        _settle_lr_max(param_group)

    def program(self, step: Step) -> Program:
        """Algorithm 1: g at w, g̃ at w + ε, then d = g̃ − α·g⊥ for the base optimizer."""
        clean = yield step.clean_pass()
        clean_grads = step.keep_gradients()
        for group in step.groups:
            _settle_lr_max(group)  # a group added to the base optimizer directly
        step.perturb(GradientDirection(), self._neighborhood(step.groups))
        yield step.perturbed_pass()
        step.restore()
        surrogate_gap_update_(step.views(), _kept_for(step, clean_grads), foreach=step.foreach)
        return clean.loss

    def _neighborhood(self, groups: list[dict[str, Any]]) -> Neighborhood:
        inner: Neighborhood = (
            AdaptiveEllipsoid(eta=0.0, epsilon=GRADIENT_NORM_EPSILON)
            if groups[0]["adaptive"]
            else EuclideanBall()
        )
        if all(group["rho_min"] is None for group in groups):
            return inner
        return WithRadius(inner, radius_at_learning_rate)


def radius_at_learning_rate(group: Mapping[str, Any]) -> float:
    """ρ_t of a group: ρ_min + (ρ − ρ_min)(lr_t − lr_min)/(lr_max − lr_min), the big_vision
    code's expression; ρ when the group has no ``rho_min`` or when lr_max = lr_min."""
    rho, rho_min = float(group["rho"]), group["rho_min"]
    lr_min, lr_max = float(group["lr_min"]), float(group["lr_max"])
    if rho_min is None or lr_max == lr_min:
        return rho
    rho_min = float(rho_min)
    return rho_min + (rho - rho_min) * (float(group["lr"]) - lr_min) / (lr_max - lr_min)


def _settle_lr_max(group: dict[str, Any]) -> None:
    """lr_max = None means the group's learning rate now: record it (saved by state_dict)."""
    if group.get("lr_max", 0.0) is None:
        group["lr_max"] = float(group["lr"])


def _kept_for(step: Step, kept: list[Tensor | None]) -> dict[Tensor, Tensor | None]:
    """Parameter → its kept gradient (looked up per parameter, not computed on)."""
    return dict(zip(step.params, kept, strict=True))


def surrogate_gap_update_(
    views: list[GroupView], clean: Mapping[Tensor, Tensor | None], *, foreach: bool
) -> None:
    """p.grad ← g̃ − α·g⊥ with g⊥ = g − c·g̃, c = ⟨g, g̃⟩/‖g̃‖², in place.

    ``views`` hold the perturbed gradients g̃ (what is in ``p.grad`` now), ``clean`` the
    gradients at w. Dot products and norms are global over the views. Computed as
    (1 + α·c)·g̃ − α·g, which needs no buffer beyond the kept g and whose one step-dependent
    factor, 1 + α·c, is a 0-d tensor, so that ``torch.compile`` traces it instead of baking a
    new constant into the graph (and recompiling) at every step. Nothing changes when every α is 0
    (SAM), or when ⟨g, g̃⟩ or ‖g̃‖ is not finite (g̃ is then used as it is).
    """
    alphas = [float(view.hyperparameters["alpha"]) for view in views]
    if all(alpha == 0.0 for alpha in alphas):
        return
    clean_grads = [
        _clean_or_zero(clean.get(p), grad)
        for view in views
        for p, grad in zip(view.params, view.grads, strict=True)
    ]
    perturbed = [grad for view in views for grad in view.grads]
    inner_tensor = kernels.dot(clean_grads, perturbed, foreach=foreach)
    squared_tensor = kernels.squared_norm(perturbed, foreach=foreach)
    inner, squared = float(inner_tensor), float(squared_tensor)
    if not (math.isfinite(inner) and math.isfinite(squared)):
        return
    # c as a 0-d float64 tensor, in eager mode too (the same IEEE arithmetic as Python floats):
    # the graph break at float() above can leave this code outside the compiled region, and a
    # float handed from here to a compiled kernel would be specialised on.
    projection = inner_tensor / squared_tensor if squared > 0.0 else torch.zeros_like(inner_tensor)
    offset = 0
    for view, alpha in zip(views, alphas, strict=True):
        count = len(view.params)
        clean_part = clean_grads[offset : offset + count]
        offset += count
        if alpha == 0.0:
            continue
        kernels.scale_(view.grads, 1.0 + alpha * projection, foreach=foreach)  # (1 + α·c)·g̃
        kernels.add_(view.grads, clean_part, alpha=-alpha, foreach=foreach)  # − α·g


def _clean_or_zero(kept: Tensor | None, perturbed: Tensor) -> Tensor:
    """The kept clean gradient, or zeros for a parameter that had none on the clean pass."""
    return torch.zeros_like(perturbed) if kept is None else kept
