"""Ascent directions: which vector the perturbation climbs along.

A direction receives the gradients of the pass at the start point and overwrites them, in
place, with the direction d that the neighbourhood then turns into ε.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any, Protocol

from torch import Tensor

from flatminima import kernels
from flatminima.groups import GroupView, all_grads

State = MutableMapping[Tensor, dict[str, Any]]


class AscentDirection(Protocol):
    """Turns gradients into the direction to perturb along (in place)."""

    def direction_(self, views: list[GroupView], state: State, *, foreach: bool) -> None: ...


class GradientDirection:
    """d = g: the raw minibatch gradient (SAM, ASAM, Fisher SAM, Monge SAM, Tilted SAM)."""

    def direction_(self, views: list[GroupView], state: State, *, foreach: bool) -> None:
        """Leaves the gradients as they are."""


FRIENDLY_EMA = "friendly_sam_gradient_ema"
"""Key of Friendly SAM's exponential moving average of raw gradients in the optimizer state."""


class FriendlyDirection:
    """d_t = g_t − σ·m_{t−1}, then m_t = λ·m_{t−1} + (1 − λ)·g_t (Friendly SAM, authors' code).

    The EMA takes the *raw* gradient g_t, and the direction uses the EMA from *before* this
    step's update (nblt/F-SAM ``FriendlySAM.first_step``; PITFALLS P10). A parameter without an
    EMA yet (the first step, or a newly added group) starts it at m = g and perturbs along g,
    so the first step is exactly SAM. σ and λ are read per group (``sigma``, ``lmbda``).

    A non-finite gradient (an overflowing AMP step) leaves the EMA untouched, so one bad batch
    cannot disable the method for the rest of training; the neighbourhood then gives ε = 0.
    Like the authors' code, the EMA takes g_t when the perturbation is built: a step aborted
    after that point has still updated it.
    """

    def direction_(self, views: list[GroupView], state: State, *, foreach: bool) -> None:
        if not math.isfinite(kernels.global_norm(all_grads(views), foreach=foreach)):
            return
        for view in views:
            entries = [state[p] for p in view.params]  # one state lookup per parameter
            fresh = [i for i, entry in enumerate(entries) if FRIENDLY_EMA not in entry]
            for i in fresh:
                # m_1 = g_1 and d_1 = g_1: the gradient is left as the direction.
                entries[i][FRIENDLY_EMA] = view.grads[i].detach().clone()
            seasoned = range(len(entries))
            if fresh:
                fresh_set = set(fresh)
                seasoned = [i for i in seasoned if i not in fresh_set]
            if not seasoned:
                continue
            kernels.friendly_direction_(
                [view.grads[i] for i in seasoned],
                [entries[i][FRIENDLY_EMA] for i in seasoned],
                float(view.hyperparameters["sigma"]),
                float(view.hyperparameters["lmbda"]),
                foreach=foreach,
            )
