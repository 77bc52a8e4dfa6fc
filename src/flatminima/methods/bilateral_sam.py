"""Bilateral SAM (Deng, Pang, Zhang, Huang; arXiv 2409.13173), "Bilateral Sharpness-Aware
Minimization for Flatter Minima"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels
from flatminima.engine import Program, SharpnessAwareOptimizer
from flatminima.groups import GroupView
from flatminima.step import Step

XI = 1e-12
"""Stabiliser of ‖g‖ in ĝ = g/(‖g‖ + ξ) (ajiaaa/BSAM ``bsam.py``)."""

INITIAL_LR = "bilateral_sam_initial_lr"
"""Param-group entry holding lr₀, the group's learning rate when the optimizer was built (saved
with the groups by ``state_dict()``)."""


class BilateralSAM(SharpnessAwareOptimizer):
    """Bilateral SAM: SAM's max-side gradient plus a min-side correction, from one clean pass.

    SAM penalises Max-Sharpness, max_{‖ε‖≤ρ} L(w + ε) − L(w). Bilateral SAM adds
    Min-Sharpness, L(w) − min_{‖ε‖≤ρ} L(w + ε), which is large when the loss still falls fast
    nearby (the minimum is not yet reached); their sum is the flatness it minimises. Three
    passes on the same batch: g = ∇L(w) (the pass that updates BatchNorm statistics),
    g_max = ∇L(w + ρ·ĝ) and g_min = ∇L(w − ρ_min,t·ĝ), with ĝ = g/(‖g‖ + 1e-12) from the
    *clean* gradient for both sides. The base optimizer then steps at w with

        d = g_max + g − (‖g_max‖/‖g_min‖)·g_min,

    the authors' code (ajiaaa/BSAM ``opt_max_min_step``): the min-side gradient is rescaled to
    the max-side one's norm, with no stabiliser. With ρ_min = 0, g_min = g and
    d = g_max + g·(1 − ‖g_max‖/‖g‖), not exactly SAM (the rescaling leaves a residual term).
    The min-side radius follows the learning rate as the authors' ``ProportionScheduler`` does
    with lr_min = 0: ρ_min,t = ``group["rho_min"]``·lr_t/lr₀, with ``rho_min`` and ``lr`` read
    from the group at each step and lr₀ the group's learning rate when the optimizer was built
    (a group added later: its learning rate at its first step; lr₀ = 0: no scaling). Norms are
    global over all parameter groups; ρ and ρ_min may differ per group.

    Where this differs from the authors' code:

    * **Their restore is a bug**: ``p.data = old_p`` makes the parameter *alias* the saved
      weights, so the next in-place move to the min side also moves the saved copy, and the
      base step starts from w − ρ_min·ĝ instead of w (also applying weight decay there). This
      class restores w by copy, the method's intent. Where the bug does not bite the two
      agree to rounding over 8 steps (``scripts/compare_with_authors.py --method
      bilateral-sam``, SGD lr 0.1, momentum 0.9, weight decay 5e-4, ρ = 0.1): 6e-17 apart with
      ρ_min = 0, 1e-16 with ρ_min = 0.05 and the alias broken in their code (also under a
      cosine learning rate, ρ_min following it); as released, with ρ_min = 0.05, 4.6e-2.
    * Their scheduler's first value comes from ``CosineScheduler``'s initial ``_last_lr`` of
      0, so their step 1 runs with ρ_min = 0; here step 1 uses ``rho_min`` itself.
    * Guards they do not have: a zero or non-finite ‖g‖ puts both points at w, and ‖g_min‖ = 0
      (then g_min = 0) drops the min-side term instead of dividing by zero. A non-finite
      gradient on any pass still gives a non-finite update, as the base optimizer alone would.
    * Their ``adaptive`` flag is overwritten with False in ``__init__``; there is none here.

    Under DistributedDataParallel no pass synchronises on its own: the update combines three
    gradients, each process builds it from its own, and the engine averages it once.

    Under ``torch.compile`` the step keeps one graph: ρ/‖g‖ and ‖g_max‖/‖g_min‖ are traced
    0-d tensors there (Python numbers in eager mode, as before).

    Three passes per step; three extra parameter copies during the step (the weights' backup,
    g and g_max), none between steps.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: max-side radius ρ ≥ 0 (the authors' ``rho_max_sharp``).
        rho_min: min-side radius at the initial learning rate, ρ_min ≥ 0 (the authors'
            ``rho_min_sharp_max``); it shrinks in proportion to the learning rate.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        >>> optimizer = flatminima.BilateralSAM(base, rho=0.05, rho_min=0.05, model=model)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Deng, Pang, Zhang & Huang, 2024"
    passes_text = "3"
    extra_memory = "3 P (backup, g, g_max)"
    memory_copies = 3.0

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.05,
            hp.non_negative,
            "ρ_max",
            "max-side radius (authors' train_bsam.py ``rho_max_sharp``)",
        ),
        hp.Hyperparameter(
            "rho_min",
            0.05,
            hp.non_negative,
            "ρ_min",
            "min-side radius at the initial learning rate, scaled by lr_t/lr₀ (authors' "
            "train_bsam.py: 0.05 → 0 in proportion to the learning rate)",
        ),
    )

    manual_two_pass = False

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        rho_min: float = 0.05,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "rho_min": rho_min},
            model=model,
            foreach=foreach,
        )
        for group in self.param_groups:
            group.setdefault(INITIAL_LR, float(group["lr"]))

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """A clean pass and the two perturbed ones."""
        return 3

    def program(self, step: Step) -> Program:
        clean = yield step.clean_pass()
        views = step.views()  # refuses sparse gradients before anything moves
        params = [p for view in views for p in view.params]
        # Cloned, not taken over: under DDP with gradient_as_bucket_view the gradient is a
        # view of a bucket that the next backward reuses.
        with torch.no_grad():
            g = [p.grad.clone() for p in params]  # one parameter copy
        norm, norm_tensor = kernels.norm_and_tensor(g, foreach=step.foreach)
        # w ± ρ/(‖g‖ + ξ)·g: the authors' rounding (the scale first, not ρ·ĝ). A zero or
        # non-finite ‖g‖ leaves w where it is (0·g would turn an infinite g into NaN).
        usable = norm > 0.0 and math.isfinite(norm)
        to_max, to_min = _step_sizes(views, norm, norm_tensor)
        # The views hold the clean pass's gradient tensors: dropped, so that they are freed
        # when the engine clears the gradients for the next pass (else a fourth copy).
        del views

        if usable:
            step.move_weights(params, g, to_max)
        yield step.perturbed_pass(index=0)
        with torch.no_grad():
            g_max = {p: p.grad.clone() for p in step.params if p.grad is not None}
        step.restore()
        if usable:
            step.move_weights(params, g, to_min)
        yield step.perturbed_pass(index=1)
        step.restore()
        with torch.no_grad():
            _combine_(step, dict(zip(params, g, strict=True)), g_max)
        return clean.loss


def _step_sizes(
    views: list[GroupView], norm: float, norm_tensor: Tensor
) -> tuple[list[Any], list[Any]]:
    """Per parameter, ρ/(‖g‖ + ξ) towards the max side and −ρ_min,t/(‖g‖ + ξ) towards the
    min side: one object per group (0-d tensors under ``torch.compile``, floats otherwise)."""
    to_max: list[Any] = []
    to_min: list[Any] = []
    for view in views:
        rho, rho_min = float(view.hyperparameters["rho"]), _rho_min(view.hyperparameters)
        to_max += [kernels.traced_factor(rho, norm + XI, norm_tensor + XI)] * len(view.params)
        to_min += [kernels.traced_factor(-rho_min, norm + XI, norm_tensor + XI)] * len(view.params)
    return to_max, to_min


def _rho_min(group: Mapping[str, Any]) -> float:
    """ρ_min,t = rho_min·lr_t/lr₀ (lr₀ = 0: rho_min)."""
    if INITIAL_LR not in group:
        # A group added after construction: its schedule starts at its first step.
        group[INITIAL_LR] = float(group["lr"])  # type: ignore[index]
    initial = float(group[INITIAL_LR])
    rho_min = float(group["rho_min"])
    return rho_min * float(group["lr"]) / initial if initial != 0.0 else rho_min


def _combine_(step: Step, g: dict[Tensor, Tensor], g_max: dict[Tensor, Tensor]) -> None:
    """p.grad ← g_max + (g − (‖g_max‖/‖g_min‖)·g_min) with g_min = p.grad; a gradient a
    parameter lacks on a pass counts as zero, and ‖g_min‖ = 0 drops the min-side term."""
    params = [p for p in step.params if p.grad is not None]
    g_min = [p.grad for p in params]
    # Every list is built before the norms: under torch.compile they break the graph, and
    # code resumed after a break that reads p.grad through these dicts' keys would be
    # guarded on the gradient tensors themselves, which are new at every step.
    with_g = [p for p in params if p in g]
    grads_with_g, kept_g = [p.grad for p in with_g], [g[p] for p in with_g]
    with_max = [p for p in params if p in g_max]
    grads_with_max, kept_max = [p.grad for p in with_max], [g_max[p] for p in with_max]
    all_max = list(g_max.values())
    max_norm, max_tensor = kernels.norm_and_tensor(all_max, foreach=step.foreach)
    min_norm, min_tensor = kernels.norm_and_tensor(g_min, foreach=step.foreach)
    if min_norm == 0.0:
        kernels.scale_(g_min, -0.0, foreach=step.foreach)
    elif torch.compiler.is_compiling():  # traced, not a constant of the graph
        kernels.scale_(g_min, -(max_tensor / min_tensor), foreach=step.foreach)
    else:
        kernels.scale_(g_min, -(max_norm / min_norm), foreach=step.foreach)
    kernels.add_(grads_with_g, kept_g, foreach=step.foreach)
    kernels.add_(grads_with_max, kept_max, foreach=step.foreach)
