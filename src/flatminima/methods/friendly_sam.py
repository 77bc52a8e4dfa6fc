"""Friendly SAM (Li, Zhou, He, Cheng, Huang; CVPR 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels, sharded
from flatminima.directions import FRIENDLY_EMA, FriendlyDirection, State
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.groups import GroupView, all_grads
from flatminima.neighborhoods import GRADIENT_NORM_EPSILON, EuclideanBall, _scale_to_radius_


class FriendlySAM(SharpnessAwareOptimizer):
    """Friendly SAM: perturb along the batch-specific part of the gradient, g_t − σ·m_{t−1}.

    The minibatch gradient is a full-gradient component plus batch noise, and the full-gradient
    part of SAM's perturbation hurts generalisation. F-SAM estimates it by an exponential
    moving average m of past raw gradients and removes it before normalising:
    d_t = g_t − σ·m_{t−1}, m_t = λ·m_{t−1} + (1 − λ)·g_t, ε = ρ·d_t/‖d_t‖. This is the update
    of the authors' code (nblt/F-SAM): the EMA takes the raw gradient (PITFALLS P10), the
    direction uses the EMA from before the update, m starts at the first gradient (so the
    first step is exactly SAM). For σ = 1 it is parallel to the paper's form g_t − σ·m_t.
    σ = 0 is SAM. The EMA is persistent state, saved by ``state_dict()``. Two passes, two
    parameter copies (the EMA and the weights' backup).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0.
        sigma: removal coefficient σ ≥ 0.
        lmbda: EMA decay λ in [0, 1).
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = flatminima.FriendlySAM(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Li et al., CVPR 2024"
    passes_text = "2"
    extra_memory = "2 P (EMA + backup)"
    memory_copies = 2.0

    declaration = (
        hp.Hyperparameter(
            "rho",
            0.2,
            hp.non_negative,
            "ρ",
            "radius of the Euclidean ball (authors' run.sh, CIFAR-100 ResNet-18)",
        ),
        hp.Hyperparameter(
            "sigma", 1.0, hp.non_negative, "σ", "removal coefficient of the full-gradient estimate"
        ),
        hp.Hyperparameter("lmbda", 0.6, hp.half_open_unit, "λ", "EMA decay (authors' run.sh)"),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.2,
        sigma: float = 1.0,
        lmbda: float = 0.6,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        direction = _DeferredFriendlyDirection()
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "sigma": sigma, "lmbda": lmbda},
            direction=direction,
            neighborhood=_CommittingBall(direction),
            model=model,
            foreach=foreach,
        )


# -- the fast path: the EMA's update committed by the ball ---------------------------------
#
# FriendlyDirection reads every gradient once to check that it is finite (a non-finite one
# must leave the EMA untouched), then sweeps g and m: d = g − σ·m into g, and the EMA updated
# in place, which needs the old m saved on the way (three calls per chunk). Here the direction
# writes the EMA's next value into the scratch memory the engine lends before the weights'
# backup fills it, leaving m as it was (two calls per chunk, no check), and the ball, which
# reads ‖d‖ anyway, commits the EMA by exchanging the two tensors' memory when the gradient
# was finite: ‖d‖ finite means g was. When ‖d‖ is not usable, the EMA is committed if its next
# value is finite (a non-finite g always makes it so). ε, the EMA and the weights are the
# same, bit for bit, as FriendlyDirection's followed by EuclideanBall's; the one case that
# differs is a finite gradient whose EMA update itself overflows (|g − m| beyond the dtype's
# range), where FriendlyDirection stores the non-finite EMA and this path keeps the old one.
# Anything else (the first step, the per-tensor loop, torch.compile, FSDP2's DTensors, a
# backup already taken) takes FriendlyDirection and EuclideanBall unchanged.


@dataclass
class _PendingEma:
    """The EMA's next value, computed but not committed yet."""

    emas: list[Tensor]
    next_values: list[Tensor]

    def next_values_finite(self) -> bool:
        return math.isfinite(kernels.global_norm(self.next_values, foreach=True))

    def commit(self) -> None:
        kernels._swap_storages_(self.emas, self.next_values)


class _DeferredFriendlyDirection(FriendlyDirection):
    """FriendlyDirection, deferring the EMA's update to :class:`_CommittingBall` where it can."""

    def __init__(self) -> None:
        self.pending: _PendingEma | None = None

    def direction_(self, views: list[GroupView], state: State, *, foreach: bool) -> None:
        self.pending = None
        if not self._deferrable(views, state, foreach):
            super().direction_(views, state, foreach=foreach)
            return
        pending = _PendingEma([], [])
        for view in views:
            emas = [state[p][FRIENDLY_EMA] for p in view.params]
            scratch = view.scratch_or_new()  # the backup's memory, lent until it fills it
            kernels._friendly_direction_deferred_(
                view.grads,
                emas,
                scratch,
                float(view.hyperparameters["sigma"]),
                float(view.hyperparameters["lmbda"]),
            )
            pending.emas += emas
            pending.next_values += scratch
        self.pending = pending

    @staticmethod
    def _deferrable(views: list[GroupView], state: State, foreach: bool) -> bool:
        if not foreach or torch.compiler.is_compiling() or not views:
            return False
        for view in views:
            if getattr(view, "lender", None) is None and view.scratch is None:
                return False  # nothing lent: a scratch copy would be a third parameter copy
            if sharded.is_sharded(view.grads):
                return False
            for p, g in zip(view.params, view.grads, strict=True):
                ema = state[p].get(FRIENDLY_EMA)
                if ema is None or ema.dtype != g.dtype or ema.shape != g.shape:
                    return False  # a first step (m = g) or a new parameter
        return True


class _CommittingBall(EuclideanBall):
    """EuclideanBall that commits the EMA the direction left pending (see above)."""

    def __init__(self, direction: _DeferredFriendlyDirection) -> None:
        self.direction = direction

    def perturbation_(self, views: list[GroupView], *, foreach: bool) -> None:
        pending, self.direction.pending = self.direction.pending, None
        if pending is None:
            super().perturbation_(views, foreach=foreach)
            return
        norm, norm_tensor = kernels.norm_and_tensor(all_grads(views), foreach=foreach)
        usable = math.isfinite(norm) and norm > 0.0
        if usable or pending.next_values_finite():
            pending.commit()
        if not usable:
            kernels.zero_(all_grads(views), foreach=foreach)
            return
        _scale_to_radius_(views, norm, norm_tensor, GRADIENT_NORM_EPSILON, foreach=foreach)
