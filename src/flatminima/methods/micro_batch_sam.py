"""mSAM: micro-batch-averaged SAM (Behdin, Song, Gupta, Keerthi, Acharya, Ocejo, Dexter,
Khanna, Durfee, Mazumder; arXiv 2302.09693, 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels
from flatminima.directions import GradientDirection
from flatminima.engine import Program, SharpnessAwareOptimizer
from flatminima.neighborhoods import EuclideanBall
from flatminima.step import MicroBatch, Step


class MicroBatchSAM(SharpnessAwareOptimizer):
    """mSAM: one SAM perturbation per micro-batch, the update their size-weighted mean.

    The batch B is split into M near-equal contiguous micro-batches B_1..B_M (sizes n_k, those
    of ``torch.tensor_split``). For each: g_k = ∇L_{B_k}(w), ε_k = ρ·g_k/(‖g_k‖ + ξ), and
    h_k = ∇L_{B_k}(w + ε_k); the update is d = Σ_k (n_k/|B|)·h_k, so with equal micro-batches
    the paper's mean (1/M)·Σ_k h_k, and with unequal ones the gradient of the batch's mean loss
    (each example counts once), which is what ρ = 0 gives: the base optimizer on the batch
    gradient. This is SAM's m-sharpness (Foret et al. 2021) computed on one device; M = 1 is
    SAM exactly (one whole-batch pass each, which a closure without argument can run).
    ξ = 1e-12 and the zero-gradient guard as in SAM; ‖g_k‖ is global over all groups.
    The authors released no code; the spec (§13) follows the paper's abstract.

    Compute: 2M closure calls per step, each on one micro-batch, so the same forward and
    backward work as SAM (:attr:`cost` counts 2 full passes). For M > 1 the closure must take
    the evaluation and run the rows ``evaluation.examples_for(len(batch))`` gives: the batch
    size is known only there. Memory: the weights' backup and the accumulated update (2 P).
    BatchNorm statistics (with ``model=``): only the clean pass of the first micro-batch
    updates them, so the running statistics see one micro-batch per step, as they see one
    device's batch under DistributedDataParallel without SyncBatchNorm; every pass normalises
    with its own micro-batch's statistics. The step returns the batch's mean loss at w
    (the clean micro-batch losses weighted by size).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0 (per group).
        micro_batches: the number M ≥ 1 of micro-batches; at most the batch size.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> optimizer = flatminima.MicroBatchSAM(base, rho=0.05, micro_batches=4)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure(evaluation):
        ...     rows = evaluation.examples_for(len(x))
        ...     inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
        ...     loss = torch.nn.functional.mse_loss(model(inputs), targets)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Behdin et al., arXiv 2023"
    passes_text = "2 (in M micro-batches)"
    extra_memory = "2 P (backup + update)"
    memory_copies = 2.0
    manual_two_pass = False

    declaration = (
        hp.Hyperparameter("rho", 0.05, hp.non_negative, "ρ", "radius of each micro-batch's ball"),
        hp.Hyperparameter(
            "micro_batches",
            4,
            hp.positive_int,
            "M",
            "micro-batches per batch (the paper's defaults could not be checked)",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        micro_batches: int = 4,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={"rho": rho, "micro_batches": micro_batches},
            direction=GradientDirection(),
            neighborhood=EuclideanBall(),
            model=model,
            foreach=foreach,
        )

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """A clean and a perturbed pass per micro-batch."""
        values = {**cls.hyperparameter_defaults, **(hyperparameters or {})}
        return 2 * int(values["micro_batches"])

    def program(self, step: Step) -> Program:
        count = int(step.groups[0]["micro_batches"])
        update: list[Tensor | None] = [None] * len(step.params)
        batch_loss: Tensor | float = 0.0
        for k in range(count):
            part = None if count == 1 else MicroBatch(k, count)
            # One pass per step updates BatchNorm statistics: the first micro-batch's clean one.
            clean = yield step.clean_pass(index=k, update_statistics=k == 0, examples=part)
            step.perturb(self.direction, self.neighborhood)
            yield step.perturbed_pass(index=k, examples=part, synchronise=count == 1)
            step.restore()
            if count == 1:
                return clean.loss  # SAM: the perturbed gradient is the update as it stands
            share = clean.fraction  # n_k / |B|, known once the closure resolved the rows
            _accumulate(update, step.params, share, foreach=step.foreach)
            batch_loss = batch_loss + share * _detached(clean.loss)
        with torch.no_grad():
            for p, total in zip(step.params, update, strict=True):
                p.grad = total
        return batch_loss


def _accumulate(
    update: list[Tensor | None], params: list[Tensor], share: float, *, foreach: bool
) -> None:
    """update ← update + share·∇ for every parameter with a gradient in this pass. A parameter
    first seen here takes its gradient tensor over (the engine drops ``p.grad`` before the
    next pass, it does not zero it in place), scaled by ``share``: no allocation."""
    fresh, targets, sources = [], [], []
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        if update[i] is None:
            update[i] = p.grad
            fresh.append(p.grad)
        else:
            targets.append(update[i])
            sources.append(p.grad)
    with torch.no_grad():
        kernels.scale_(fresh, share, foreach=foreach)
        kernels.add_(targets, sources, alpha=share, foreach=foreach)


def _detached(loss: Tensor | float | None) -> Tensor | float:
    if loss is None:
        raise ValueError(
            "MicroBatchSAM weighs the micro-batches' losses: the closure must return its loss"
        )
    return loss.detach() if isinstance(loss, Tensor) else float(loss)
