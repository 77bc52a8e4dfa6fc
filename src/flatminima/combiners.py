"""Combinations: how the gradients evaluated at the perturbed points become the descent gradient.

The engine hands each perturbed pass to ``add``; after the last one, ``finish`` leaves the
descent gradient in ``p.grad`` of every parameter. A combiner lives for one step.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from flatminima import kernels


class Combiner(Protocol):
    """Folds the perturbed passes of one step into the descent gradient."""

    synchronised_by_last_pass: bool
    """True when the last pass's gradient *is* the update, so DistributedDataParallel may
    all-reduce it during that backward; False when the engine must all-reduce the result."""

    needs_loss: bool
    """True when ``add`` needs each pass's loss value."""

    def add(self, params: list[Tensor], loss: float | None, *, foreach: bool) -> None: ...

    def finish(self, params: list[Tensor], *, foreach: bool) -> None: ...

    def objective(self) -> float | None: ...


class PerturbedGradient:
    """d = ∇L(w + ε): the gradient of the one perturbed pass is the update (SAM and kin)."""

    synchronised_by_last_pass = True
    needs_loss = False

    def add(self, params: list[Tensor], loss: float | None, *, foreach: bool) -> None:
        """Leaves the gradient in place."""

    def finish(self, params: list[Tensor], *, foreach: bool) -> None:
        """The update is already in ``p.grad``."""

    def objective(self) -> float | None:
        return None


class TiltedAverage:
    """d = Σ_j softmax_j(t·L_j)·∇L(θ + ε_j): Tilted SAM's aggregation (Li, Zhou, Bilmes 2025).

    The weighted sum is streamed: a running maximum L_max of the losses and a running sum
    S = Σ_j exp(t·(L_j − L_max)) are kept, and the accumulated gradient is rescaled by
    exp(t·(L_old − L_new)) whenever the maximum grows. Memory is one gradient copy whatever the
    number of samples (the released code keeps one clone per sample). The exponents are
    t·(L_j − L_max) ≤ 0, never t·L_j, so no tilt, however large, overflows them (t = 1e308 with
    losses near 2 would make t·L infinite and the weights NaN). The gradient tensors of each
    pass are taken over, not copied.
    """

    synchronised_by_last_pass = False
    needs_loss = True

    def __init__(self, tilt: float) -> None:
        """A fresh accumulator (the engine builds one per step)."""
        self.tilt = tilt
        self._sum: list[Tensor | None] = []
        self._max_loss = -math.inf
        self._weight_total = 0.0
        self._loss_sum = 0.0
        self._count = 0

    def add(self, params: list[Tensor], loss: float | None, *, foreach: bool) -> None:
        if loss is None:
            raise ValueError(
                "Tilted SAM weighs each perturbed gradient by its loss: the closure must return "
                "the loss (or call evaluation.report(loss) in the manual form)"
            )
        grads = [p.grad for p in params]
        if self._count == 0:
            self._sum = grads
            self._max_loss = loss
            self._weight_total = 1.0
        else:
            if loss > self._max_loss:
                rescale = self._weight(self._max_loss - loss)
                self._scale_sum(rescale, foreach=foreach)
                self._weight_total *= rescale
                self._max_loss = loss
                weight = 1.0
            else:
                weight = self._weight(loss - self._max_loss)
            self._accumulate(grads, weight, foreach=foreach)
            self._weight_total += weight
        self._loss_sum += loss
        self._count += 1
        for p in params:
            p.grad = None  # the tensors now belong to the running sum

    def _weight(self, below_max: float) -> float:
        """exp(t·(L − L_max)) for L − L_max = ``below_max`` ≤ 0 (t = 0 gives 1, not NaN)."""
        return 1.0 if self.tilt == 0.0 else math.exp(self.tilt * below_max)

    def _scale_sum(self, factor: float, *, foreach: bool) -> None:
        present = [t for t in self._sum if t is not None]
        kernels.scale_(present, factor, foreach=foreach)

    def _accumulate(self, grads: list[Tensor | None], weight: float, *, foreach: bool) -> None:
        targets, sources = [], []
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            if self._sum[index] is None:
                # First sample that reaches this parameter: the earlier ones contributed 0.
                self._sum[index] = torch.zeros_like(grad)
            targets.append(self._sum[index])
            sources.append(grad)
        kernels.add_(targets, sources, alpha=weight, foreach=foreach)

    def finish(self, params: list[Tensor], *, foreach: bool) -> None:
        present = [t for t in self._sum if t is not None]
        kernels.scale_(present, 1.0 / self._weight_total, foreach=foreach)
        for p, total in zip(params, self._sum, strict=True):
            p.grad = total
        self._sum = []

    def objective(self) -> float | None:
        """(1/t)·log mean_j exp(t·L_j), the Monte-Carlo tilted loss (mean loss when t = 0)."""
        if self._count == 0:
            return None
        if self.tilt == 0.0:
            return self._loss_sum / self._count
        return self._max_loss + math.log(self._weight_total / self._count) / self.tilt
