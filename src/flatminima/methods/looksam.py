"""LookSAM (Liu, Mai, Chen, Hsieh, You; CVPR 2022), "Towards Efficient and Scalable
Sharpness-Aware Minimization"."""

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
from flatminima.neighborhoods import EuclideanBall
from flatminima.step import Step

LOOKSAM_DIRECTION = "looksam_orthogonal_direction"
"""Key of LookSAM's stored unit direction ĝ_v in the optimizer state."""

XI = 1e-12
"""Stabiliser of ‖g‖² in the projection coefficient (MarlonBecker/MSAM ``looksam.py``)."""

DEFAULT_K = 5


class LookSAM(SharpnessAwareOptimizer):
    """LookSAM: a SAM step every k-th step; in between, one pass and the stored direction.

    SAM's gradient g̃ = ∇L(w + ρ·g/‖g‖) splits into its projection on the clean gradient g and
    the rest, g_v = g̃ − (⟨g̃, g⟩/‖g‖²)·g, which changes slowly from step to step. LookSAM pays
    for SAM's second pass only on refresh steps, where it stores the unit vector
    ĝ_v = g_v/‖g_v‖, and on the steps in between takes one pass at w and descends with
    g + α·‖g‖·ĝ_v. A refresh step is any step whose number t (``step.count``, counted from 0,
    saved in ``state_dict()``) satisfies t mod k = 0: steps 0, k, 2k, ..., the rule of the
    MarlonBecker/MSAM repository's ``looksam.py`` (its counter starts at k, so its first step
    refreshes). There is no official code; that file is the reference, and this class follows
    it to rounding (``scripts/compare_with_authors.py --method looksam``: at most 4.4e-16
    apart over 8 steps at k = 1, 2 and 5):

    * the norms and the projection are **global** over all parameters with a gradient, as in
      the paper's formula. pytorch_optimizer's ``LookSAM`` projects, normalises and rescales
      each tensor on its own (and, in version 4.1.0, calls the closure on every step, also
      between refreshes); the two forms differ by about 5e-2 in the weights after 8 steps at
      k = 2 (spec §19; 6.3e-2 with pytorch_optimizer 4.1.0 in the comparison script);
    * the projection coefficient is ⟨g̃, g⟩/(‖g‖² + 1e-12), the repository's stabiliser;
    * ε = ρ·g/(‖g‖ + 1e-12) and the refresh step descends with g̃: it is a SAM step.

    Where the repository has no answer, this class chooses: a zero or non-finite ‖g‖ gives a
    zero projection coefficient, a zero or non-finite ‖g_v‖ stores ĝ_v = 0 (no NaN), and a
    non-finite ‖g‖ on a step in between adds nothing to g. A parameter with no stored direction
    (added after the last refresh) descends with its plain gradient. The repository's
    ``main.py`` never passes ``k`` or ``alpha`` to its ``LookSAM``, so its configs' k = 10,
    α = 0.7 never took effect; the defaults below are the class's own, k = 5 and α = 0.2.

    Under DistributedDataParallel no pass synchronises: each process projects with its own g
    and g̃ (its own ĝ_v, as each process perturbs with its own gradient in SAM) and the engine
    averages the final update once.

    Under ``torch.compile`` the projection's factors are traced 0-d tensors (Python numbers in
    eager mode, as before); refresh and reuse steps are two graphs, each compiled once.

    One pass per step plus one every k steps; one persistent parameter copy (ĝ_v, saved by
    ``state_dict()``) and, on refresh steps, the weights' backup. The clean gradient of a
    refresh step is kept in ĝ_v's own memory until ĝ_v is rebuilt from it, so the step costs no
    third copy.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0 of the refresh steps' SAM perturbation.
        k: refresh period, an integer ≥ 1 (k = 1 is SAM); the same in every param group.
        alpha: weight α ≥ 0 of the stored direction (α = 0: SAM on refresh steps, the base
            optimizer in between).
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer = flatminima.LookSAM(base, rho=0.1, k=5, alpha=0.2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [optimizer.step(closure) for _ in range(6)]  # refreshes at steps 0 and 5
    """

    paper = "Liu et al., CVPR 2022"
    passes_text = "2 on steps 0, `k`, 2`k`, …; 1 otherwise"
    extra_memory = "2 P (ĝ_v; backup on refresh steps)"
    memory_copies = 2.0

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.1,
            hp.non_negative,
            "ρ",
            "radius of the refresh steps' SAM perturbation (pytorch_optimizer's LookSAM "
            "default and SAM's CIFAR-100 value; the MSAM repository's driver passes its own ρ)",
        ),
        hp.Hyperparameter(
            "k",
            DEFAULT_K,
            hp.positive_int,
            "k",
            "refresh period: a SAM step when the step number is a multiple of k (the MSAM "
            "repository's class default, the value its runs used: its driver never passes k)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "alpha",
            0.2,
            hp.non_negative,
            "α",
            "weight of the stored orthogonal direction, scaled by ‖g‖ (the MSAM repository's "
            "class default, likewise the value its runs used)",
        ),
    )

    manual_two_pass = False

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.1,
        k: int = DEFAULT_K,
        alpha: float = 0.2,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "k": k, "alpha": alpha},
            direction=GradientDirection(),
            neighborhood=EuclideanBall(),
            model=model,
            foreach=foreach,
        )

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """Two passes on refresh steps (t mod k = 0), one otherwise."""
        k = (hyperparameters or {}).get("k", DEFAULT_K)
        return 2 if is_refresh_step(step, k) else 1

    def program(self, step: Step) -> Program:
        if is_refresh_step(step.count, step.groups[0]["k"]):
            return (yield from self._refresh(step))
        return (yield from self._reuse(step))

    def _refresh(self, step: Step) -> Program:
        """A SAM step that also stores ĝ_v = normalise(g̃ − ⟨g̃, g⟩/(‖g‖² + ξ)·g)."""
        clean = yield step.clean_pass()
        views = step.views()  # refuses sparse gradients before anything moves
        clean_params = [p for view in views for p in view.params]
        # g goes into ĝ_v's memory: the old direction is not needed on a refresh step (and if
        # the step fails from here, the counter does not advance: the next step refreshes).
        stored = [self._direction_buffer(p) for p in clean_params]
        with torch.no_grad():
            kernels.copy_(stored, [g for view in views for g in view.grads], foreach=step.foreach)
        # The views hold this pass's gradient tensors: dropped, so that they are freed when the
        # engine clears the gradients for the next pass (else a third parameter copy).
        del views
        step.perturb(self.direction, self.neighborhood)
        yield step.perturbed_pass()
        step.restore()

        # ĝ_v is defined where both gradients exist; any other parameter keeps no direction.
        params = [p for p in clean_params if p.grad is not None]
        kept = set(params)
        for p in step.params:
            if p not in kept and p in self.state:
                self.state[p].pop(LOOKSAM_DIRECTION, None)
                if not self.state[p]:
                    del self.state[p]
        directions = [self.state[p][LOOKSAM_DIRECTION] for p in params]
        perturbed = [p.grad for p in params]
        with torch.no_grad():
            _orthogonal_unit_direction_(directions, perturbed, foreach=step.foreach)
        return clean.loss

    def _reuse(self, step: Step) -> Program:
        """One pass at w, then g ← g + α·‖g‖·ĝ_v."""
        clean = yield step.clean_pass()
        views = step.views()
        factors = _reuse_factors(views, foreach=step.foreach)
        if factors is None:
            return clean.loss  # the base optimizer sees the non-finite gradient as it is
        with torch.no_grad():
            for view, factor in zip(views, factors, strict=True):
                pairs = [
                    (g, self.state[p][LOOKSAM_DIRECTION])
                    for p, g in zip(view.params, view.grads, strict=True)
                    if LOOKSAM_DIRECTION in self.state.get(p, {})
                ]
                if pairs:
                    kernels.add_scaled_(
                        [g for g, _ in pairs], [d for _, d in pairs], factor, foreach=step.foreach
                    )
        return clean.loss

    def _direction_buffer(self, param: Tensor) -> Tensor:
        state = self.state[param]
        if LOOKSAM_DIRECTION not in state:
            state[LOOKSAM_DIRECTION] = torch.empty_like(param, memory_format=torch.preserve_format)
        return state[LOOKSAM_DIRECTION]


def is_refresh_step(step: int, k: int) -> bool:
    """Whether step number ``step`` (from 0) is a SAM step: 0, k, 2k, ..."""
    return step % int(k) == 0


def _reuse_factors(views: list[Any], *, foreach: bool) -> list[float | Tensor] | None:
    """α·‖g‖ per view, ‖g‖ global (``None`` when ‖g‖ is not finite). A function of its own,
    not part of the program: a generator runs outside the compiled graph, where the factors
    would be Python numbers that the graph specialises on at every step; here they are
    traced 0-d tensors under ``torch.compile`` (floats in eager mode, as before)."""
    norm, norm_tensor = kernels.norm_and_tensor(
        [g for view in views for g in view.grads], foreach=foreach
    )
    if not math.isfinite(norm):
        return None
    alphas = [float(view.hyperparameters["alpha"]) for view in views]
    if torch.compiler.is_compiling():
        return [alpha * norm_tensor for alpha in alphas]
    return [alpha * norm for alpha in alphas]


def _orthogonal_unit_direction_(
    clean: list[Tensor], perturbed: list[Tensor], *, foreach: bool
) -> None:
    """clean ← normalise(g̃ − ⟨g̃, g⟩/(‖g‖² + ξ)·g), with g = clean and g̃ = perturbed, norms and
    dot global over the lists; a zero or non-finite norm gives a zero coefficient or vector."""
    as_tensor = torch.compiler.is_compiling()
    minus = _minus_coefficient(
        kernels.squared_norm(clean, foreach=foreach),
        kernels.dot(perturbed, clean, foreach=foreach),
        as_tensor=as_tensor,
    )
    if minus is None:  # also where g is not finite: 0·g would be NaN
        kernels.copy_(clean, perturbed, foreach=foreach)
    else:
        kernels.scale_(clean, minus, foreach=foreach)
        kernels.add_(clean, perturbed, foreach=foreach)  # g_v = g̃ − c·g
    norm, norm_tensor = kernels.norm_and_tensor(clean, foreach=foreach)
    if norm > 0.0 and math.isfinite(norm):
        kernels.scale_(clean, kernels.traced_factor(1.0, norm, norm_tensor), foreach=foreach)
    else:
        kernels.zero_(clean, foreach=foreach)


@torch.compiler.disable
def _minus_coefficient(
    squared_tensor: Tensor, projection_tensor: Tensor, *, as_tensor: bool
) -> float | Tensor | None:
    """−⟨g̃, g⟩/(‖g‖² + ξ), or ``None`` where it is 0 or undefined (‖g‖ = 0, non-finite).

    Run eagerly even inside a compiled step: its Python arithmetic on numbers that change
    every step would otherwise be specialised into the graph. ``as_tensor`` (asked for by a
    compiled caller) returns the factor as a 0-d tensor, a graph input like any tensor."""
    squared, projection = float(squared_tensor), float(projection_tensor)
    coefficient = projection / (squared + XI)
    if not (squared > 0.0 and math.isfinite(squared) and math.isfinite(coefficient)):
        return None
    if coefficient == 0.0:
        return None
    if as_tensor:
        return torch.tensor(-coefficient, dtype=torch.float64, device=squared_tensor.device)
    return -coefficient
