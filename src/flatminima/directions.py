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
            sigma = float(view.hyperparameters["sigma"])
            lmbda = float(view.hyperparameters["lmbda"])
            entries = [state[p] for p in view.params]  # one state lookup per parameter
            fresh = [i for i, entry in enumerate(entries) if FRIENDLY_EMA not in entry]
            for i in fresh:
                # m_1 = g_1 and d_1 = g_1: the gradient is left as the direction.
                entries[i][FRIENDLY_EMA] = view.grads[i].detach().clone()
            if fresh:
                fresh_set = set(fresh)
                seasoned = [i for i in range(len(view.params)) if i not in fresh_set]
                if not seasoned:
                    continue
                scratch = view.scratch_or_new()
                grads = [view.grads[i] for i in seasoned]
                emas = [entries[i][FRIENDLY_EMA] for i in seasoned]
                previous_emas = [scratch[i] for i in seasoned]
            else:  # every step after the first: no index lists to build
                scratch = view.scratch_or_new()
                grads = view.grads
                emas = [entry[FRIENDLY_EMA] for entry in entries]
                previous_emas = scratch
            kernels.copy_(previous_emas, emas, foreach=foreach)  # m_{t-1}
            kernels.scale_(emas, lmbda, foreach=foreach)
            kernels.add_(emas, grads, alpha=1.0 - lmbda, foreach=foreach)  # m_t from raw g_t
            kernels.add_(grads, previous_emas, alpha=-sigma, foreach=foreach)  # d_t
