"""ESAM: Efficient Sharpness-Aware Minimization (Du, Yan, Feng, Zhou, Zhen, Goh, Tan; ICLR 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima.directions import GradientDirection
from flatminima.engine import Program, SharpnessAwareOptimizer
from flatminima.neighborhoods import InflatedBall
from flatminima.step import Evaluation, Step

WEIGHT_PERTURBED = "esam_weight_perturbed"
"""Per-parameter state: whether the tensor is perturbed at the next step (a Python bool)."""

WHOLE_BATCH_GAMMA = 0.99
"""From this γ on the authors' code keeps the whole batch (``if prob >= 0.99``)."""


class ESAM(SharpnessAwareOptimizer):
    """ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection.

    Two savings on SAM's step (paper §3, and the authors' code dydjw9/Efficient_SAM,
    ``utils/Esam.py``, which this class follows):

    * **Stochastic weight perturbation (SWP).** Only a random subset S of the parameter
      tensors is perturbed, each kept with probability β, and ε is rescaled by 1/β:
      ε = ρ·g_S/(‖g_S‖ + ξ)/β with ξ = 1e-7, g_S the clean gradient of the tensors in S and
      ‖g_S‖ its norm. The paper draws the mask per coordinate; the authors' code, and this
      class, per tensor. As in the code the draw is **one step late**: S for step t is drawn at
      the end of step t − 1 (one uniform draw per tensor that had a gradient, in parameter
      order, kept when it is ≤ β), so that the first pass of step t can skip the weight
      gradients of the tensors outside S (they are set ``requires_grad=False`` for that pass
      only, and switched back before anything else runs, also when the pass raises). The
      first step perturbs every tensor. Which tensors are in S is persistent state (a bool per
      parameter under ``"esam_weight_perturbed"``, saved by ``state_dict()``), and so is the
      ``generator``'s state when one is given. When the draw leaves no tensor in S the
      authors' code crashes (the next backward has nothing to differentiate); here every
      tensor is perturbed on that step instead, as on the first.
    * **Sharpness-sensitive data selection (SDS).** A forward-only probe at w + ε gives each
      example's loss rise ŝ_i = ℓ_i(w + ε) − ℓ_i(w); the perturbed gradient, which is the
      update, is computed on the examples whose rise is *strictly* greater than the k-th
      largest, k = ⌊γ·B⌋. That is the authors' rule and it keeps k − 1 examples when there are
      no ties (7 of 16 at γ = 0.5), not the paper's γ·B. From γ ≥ 0.99 the whole batch is kept,
      as in the code. Where the code would crash or divide by zero this class keeps going:
      k is at least 1 (the code fails for γ·B < 1), and when no rise is strictly above the
      k-th largest (every candidate tied, as with ρ = 0) the tied examples are kept.

    The closure must take the evaluation and return the **per-example losses** (a 1-D tensor,
    ``reduction="none"``), with a backward on their mean when ``evaluation.needs_gradient``;
    the step returns their mean at w. Compute per step: one forward and backward on the batch,
    one forward (the probe; it runs even at γ ≥ 0.99, as in the authors' code), and one forward
    and backward on the selected examples; :attr:`cost` counts exactly that (the weight
    gradients SWP skips in the first backward are not credited). β = γ = 1 is SAM with
    ξ = 1e-7 and one wasted forward. BatchNorm statistics (with ``model=``): only the clean
    pass updates them (the authors' code has no BatchNorm handling and updates them on all
    three passes). Under DistributedDataParallel each process draws its own S, selects from
    its own examples, and the final gradients are averaged. One extra parameter copy (the
    weights' backup).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0 (per group).
        beta: probability β in (0, 1] that a parameter tensor is perturbed.
        gamma: share γ in (0, 1] of the batch the perturbed gradient is computed on.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.
        generator: the ``torch.Generator`` (CPU) the tensor subsets are drawn from (default:
            torch's global generator).

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = flatminima.ESAM(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> def closure(evaluation):
        ...     rows = evaluation.examples_for(len(x))
        ...     inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
        ...     losses = torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
        ...     if evaluation.needs_gradient:
        ...         losses.mean().backward()
        ...     return losses
        >>> loss = optimizer.step(closure)
    """

    paper = "Du et al., ICLR 2022"
    passes_text = "1 + γ (+ 1 forward)"
    extra_memory = "1 P (backup)"
    manual_two_pass = False

    declaration = (
        hp.Hyperparameter(
            "rho", 0.05, hp.non_negative, "ρ", "radius of the ball (authors' run.sh, ResNet-18)"
        ),
        hp.Hyperparameter(
            "beta",
            0.5,
            hp.positive_unit,
            "β",
            "probability that a parameter tensor is perturbed (authors' run.sh)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "gamma",
            0.5,
            hp.positive_unit,
            "γ",
            "share of the batch the perturbed gradient uses; ≥ 0.99 keeps all (run.sh)",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        beta: float = 0.5,
        gamma: float = 0.5,
        model: nn.Module | None = None,
        foreach: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "beta": beta, "gamma": gamma},
            direction=GradientDirection(),
            neighborhood=InflatedBall(),
            model=model,
            foreach=foreach,
        )
        self.generator = generator

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """Three calls of the closure: the clean pass, the probe, the pass on the subset."""
        return 3

    def program(self, step: Step) -> Program:
        skipped = self._tensors_outside_the_subset(step.params)
        try:
            for p in skipped:  # no weight gradient for them in the first backward
                p.requires_grad_(False)
            clean = yield step.clean_pass()
        finally:
            for p in skipped:
                p.requires_grad_(True)
        before = _per_example_losses(clean)
        step.perturb(self.direction, self.neighborhood)
        probe = yield step.perturbed_pass(needs_gradient=False)
        rise = _per_example_losses(probe) - before
        chosen = sharpness_sensitive_examples(rise, float(step.groups[0]["gamma"]))
        yield step.perturbed_pass(examples=chosen, synchronise=chosen is None)
        step.restore()
        step.after_descent(lambda: self._draw_next_subset(step))
        return clean.loss

    def _tensors_outside_the_subset(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors the previous step's draw left out (none on the first step, and none
        when it left out every tensor)."""
        outside = [p for p in params if not self.state[p].get(WEIGHT_PERTURBED, True)]
        return [] if len(outside) == len(params) else outside

    def _draw_next_subset(self, step: Step) -> None:
        """One uniform draw per tensor that has a gradient, in parameter order; kept when
        ≤ β (the authors' ``random.random() > beta`` switches a tensor off)."""
        beta = float(step.groups[0]["beta"])
        drawn = [p for p in step.params if p.grad is not None]
        device = "cpu" if self.generator is None else self.generator.device
        draws = torch.rand(len(drawn), generator=self.generator, dtype=torch.float64, device=device)
        for p in step.params:
            self.state[p][WEIGHT_PERTURBED] = True
        for p, draw in zip(drawn, draws.tolist(), strict=True):
            self.state[p][WEIGHT_PERTURBED] = draw <= beta

    def _extra_state(self) -> dict[str, Any]:
        """The generator's state, so that a resumed run draws the same subsets (the default
        generator's state is the caller's to save, with ``torch.get_rng_state``)."""
        return {} if self.generator is None else {"generator_state": self.generator.get_state()}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        if self.generator is not None and "generator_state" in extra:
            self.generator.set_state(extra["generator_state"])


def sharpness_sensitive_examples(rise: Tensor, gamma: float) -> Tensor | None:
    """The examples ESAM's perturbed gradient uses, as row indices (``None``: all of them).

    The authors' rule: with k = ⌊γ·B⌋, the examples whose loss rise is strictly greater than
    the k-th largest rise (k − 1 of them without ties); the whole batch from γ ≥ 0.99. Beyond
    the code, which crashes there: k ≥ 1, and when no rise is strictly greater (the top
    candidates tie) the examples equal to the k-th largest.
    """
    if gamma >= WHOLE_BATCH_GAMMA:
        return None
    k = max(1, int(len(rise) * gamma))
    cutoff = torch.topk(rise, k).values[-1]
    chosen = rise > cutoff
    if not bool(chosen.any()):
        chosen = rise == cutoff
    if bool(chosen.all()) or not bool(chosen.any()):
        return None
    return chosen.nonzero().squeeze(1)


def _per_example_losses(evaluation: Evaluation) -> Tensor:
    if evaluation.losses is None:
        raise ValueError(
            "ESAM selects examples by their loss: the closure must return the per-example "
            "losses (a 1-D tensor, reduction='none'), backward on their mean"
        )
    return evaluation.losses
