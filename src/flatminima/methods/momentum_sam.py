"""Momentum-SAM (Becker, Altrock, Risse; arXiv 2401.12033), "Momentum-SAM: Sharpness Aware
Minimization without Computational Overhead"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels
from flatminima.engine import Program, SharpnessAwareOptimizer
from flatminima.step import Step

XI = 1e-12
"""Stabiliser of ‖v‖ (MarlonBecker/MSAM ``msam.py`` and ``adamW_msam.py``)."""


class MomentumSAM(SharpnessAwareOptimizer):
    """Momentum-SAM: one pass per step, at w − ρ·v/‖v‖ with v the base optimizer's momentum.

    The accumulated momentum v is a low-variance estimate of the gradient over many batches,
    and the last step overshoots along it, so −v is an ascent direction on the new batch; SAM's
    extra pass is not needed (paper Alg. 1, ε_MSAM = −ρ·v_t/‖v_t‖). Each step takes one
    forward/backward pass at w̃ = w − ρ·v/(‖v‖ + 1e-12), puts the weights back at w, and lets
    the base optimizer step at w with that gradient. v is read from the base optimizer's
    state: SGD's ``momentum_buffer`` (momentum > 0) or Adam's and AdamW's ``exp_avg`` (the
    first moment, not bias-corrected, as in the authors' ``AdamW_MSAM``). ‖v‖ is global over
    all parameter groups; ρ may differ per group. Before the base optimizer has a buffer (the
    first step) the step is the plain base step at w, as in the authors' code, whose buffer
    starts at zero. A zero or non-finite ‖v‖ also gives w̃ = w.

    Where this differs from the authors' code (MarlonBecker/MSAM ``optimizer/msam.py``): they
    fuse the method into SGD and keep the *weights at the perturbed point* w̃ between steps
    (``move_back_from_momentumAscent`` before evaluation), and their SGD adds the weight decay
    at w̃ (v ← μv + g + λ·w̃). Here the weights are back at w after every step, like every
    other method of this library (evaluation, checkpoints and schedulers see w), and the base
    optimizer applies weight decay at w. The unperturbed iterates are otherwise the same
    (``scripts/compare_with_authors.py --method momentum-sam``, 8 steps, ρ = 0.5, SGD lr 0.1,
    momentum 0.9): 6e-17 apart with weight decay 0; 1.1e-4 apart with weight decay 5e-4,
    which is the decay's placement alone (lr·λ·ρ per step, carried by the momentum): with the
    decay put into the loss, so that it too is taken at w̃, they are 8e-17 apart again.
    ``AdamW_MSAM`` decays after the Adam update and torch's AdamW before it, a difference of
    the base optimizers (7.8e-6 after 8 steps at lr 1e-2, decay 1e-2; 6e-17 without decay).

    BatchNorm: the authors take every pass at w̃ and let it update the running statistics;
    so does this class (the one pass of a step is its statistics pass). Under
    DistributedDataParallel the pass's gradient is the update as it stands, so DDP all-reduces
    it during backward.

    Under ``torch.compile`` the step keeps one graph: the factor −ρ/‖v‖ is a traced 0-d
    tensor there (a Python number in eager mode, as before).

    One pass per step; one extra parameter copy (the weights' backup, during the step only).

    {hyperparameters}

    Args:
        base_optimizer: SGD with momentum > 0, Adam or AdamW (an instance); any other base
            optimizer has no momentum to perturb along and is refused.
        rho: radius ρ ≥ 0 of the perturbation along −v (ρ = 0 is the base optimizer).
        model: the model, for BatchNorm and DistributedDataParallel (see :class:`flatminima.SAM`).
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer = flatminima.MomentumSAM(base, rho=3.0, model=model)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [optimizer.step(closure) for _ in range(3)]
    """

    paper = "Becker, Altrock & Risse, 2024"
    passes_text = "1"
    extra_memory = "1 P (backup)"

    declaration = (
        hp.Hyperparameter(
            "rho",
            3.0,
            hp.non_negative,
            "ρ",
            "radius along −v; 3 in the authors' README and configs for SGD and AdamW (larger "
            "than SAM's: ‖v‖ is normalised away, and v spans many batches)",
        ),
    )

    manual_two_pass = False

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 3.0,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        # Checked first, so that a base optimizer without momentum is refused before its param
        # groups are touched; anything that is not a plain optimizer is refused by the engine.
        plain = isinstance(base_optimizer, torch.optim.Optimizer) and not isinstance(
            base_optimizer, SharpnessAwareOptimizer
        )
        self._momentum_key = momentum_key(base_optimizer) if plain else ""
        super().__init__(base_optimizer, hyperparameters={"rho": rho}, model=model, foreach=foreach)

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """One pass, always."""
        return 1

    def program(self, step: Step) -> Program:
        params, buffers, alphas = self._perturbation(step)
        if params:
            step.move_weights(params, buffers, alphas)
            evaluation = yield step.perturbed_pass(update_statistics=True, synchronise=True)
        else:
            evaluation = yield step.clean_pass()
        step.views()  # refuses sparse gradients before the base optimizer sees them
        step.restore()
        return evaluation.loss

    def _perturbation(self, step: Step) -> tuple[list[Tensor], list[Tensor], list[Any]]:
        """The parameters to move, their v and −ρ/(‖v‖ + ξ), one factor object per group
        (a 0-d tensor under ``torch.compile``); empty: no perturbation."""
        params, buffers, groups = [], [], []
        for index, group in enumerate(step.groups):
            _check_momentum(self.base_optimizer, group)
            for p in group["params"]:
                buffer = step.base_state(p).get(self._momentum_key) if p.requires_grad else None
                if buffer is not None:
                    params.append(p)
                    buffers.append(buffer)
                    groups.append(index)
        if not params:
            return [], [], []
        norm, norm_tensor = kernels.norm_and_tensor(buffers, foreach=step.foreach)
        if not (norm > 0.0 and math.isfinite(norm)):
            return [], [], []
        factors = {
            index: kernels.traced_factor(
                -float(step.groups[index]["rho"]), norm + XI, norm_tensor + XI
            )
            for index in dict.fromkeys(groups)
        }
        return params, buffers, [factors[index] for index in groups]


def momentum_key(base_optimizer: torch.optim.Optimizer) -> str:
    """The base optimizer's state entry holding v; a one-line error if it has none."""
    if isinstance(base_optimizer, torch.optim.SGD):
        for group in base_optimizer.param_groups:
            _check_momentum(base_optimizer, group)
        return "momentum_buffer"
    if isinstance(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "exp_avg"
    raise TypeError(
        f"MomentumSAM perturbs along the base optimizer's momentum, and "
        f"{type(base_optimizer).__name__} has none it knows: use SGD with momentum > 0, Adam "
        "or AdamW"
    )


def _check_momentum(base_optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> None:
    if isinstance(base_optimizer, torch.optim.SGD) and not group.get("momentum", 0.0):
        raise ValueError(
            "MomentumSAM perturbs along SGD's momentum buffer, and a param group has "
            f"momentum={group.get('momentum', 0.0)!r}: give SGD momentum > 0 (e.g. 0.9)"
        )
