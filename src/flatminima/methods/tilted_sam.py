"""Tilted SAM (Tian Li, Tianyi Zhou, Jeff Bilmes; ICML 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flatminima import hyperparameters as hp
from flatminima.combiners import TiltedAverage
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer, StepPlan
from flatminima.neighborhoods import EuclideanBall
from flatminima.starts import RandomSphereStart


class TiltedSAM(SharpnessAwareOptimizer):
    r"""Tilted SAM: descend along Σ_j softmax_j(t·L_j)·∇L(θ + ε_j), a tilted mean of s
    perturbed gradients.

    TSAM minimises the tilted loss (1/t)·log E_ε[exp(t·L(θ + ε))] (paper eq. 2), which tends
    to SAM as t → ∞ and to the average-perturbed loss as t → 0. Its gradient is the
    exp(t·L)-weighted mean of perturbed gradients. This is the authors' released sampler
    ("random1", litian96/TSAM, spec §6.3): for each of s samples, start at θ + ζ_j with
    ζ_j = n·min(‖n‖, r)/‖n‖, n ~ noise_scale·N(0, I) drawn per parameter in parameter order,
    take one SAM step of radius ρ from there, ε_j = ζ_j + ρ·ĝ_j/‖ĝ_j‖, and record L_j and
    ∇L(θ + ε_j). The weights are softmax(t·L_j) with max-subtraction, as in the code (its
    ``exp(t·L_j)`` has no importance correction; the paper's HMC sampler is not released).

    Differences from the released code, all deliberate: the weighted sum is streamed
    (one gradient copy instead of one per sample); BatchNorm running statistics are updated
    by the first start pass of each step only (the code updates them at every θ + ζ_j, and
    never at θ), with ``model=`` given; ``step(closure)`` works (the code's does not). Under
    DistributedDataParallel every pass runs under ``no_sync`` and the combined gradient is
    all-reduced once; the weights come from each process's own losses.

    ``step`` returns the Monte-Carlo tilted loss (1/t)·log mean_j exp(t·L_j): the clean loss
    at θ is never evaluated. 2·s passes per step, two parameter copies (the backup and the
    running sum) whatever s. The noise is drawn for the parameters with ``requires_grad``
    only (the released code draws for every parameter in the groups, frozen ones too). The
    bare base optimizer is ``rho=0, radius=0, num_samples=1`` (with s > 1 the equal-weight
    mean of s equal gradients may differ from the gradient in the last bit). The manual
    two-pass form is not available: each pass's loss is needed. Under ``torch.compile`` the
    step recompiles as the losses change (they weigh the gradients as Python numbers):
    compile the model, not this optimizer's step.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: SAM radius ρ ≥ 0 (may differ per group).
        tilt: tilt t ≥ 0.
        num_samples: s ≥ 1.
        radius: random-start radius r ≥ 0 (r = 0 and s = 1 is SAM).
        noise_scale: ≥ 0.
        generator: the ``torch.Generator`` the start noise is drawn from (default generator
            when ``None``), so a seeded run can be compared with the authors' code.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example (multi-pass: use the closure, or ``evaluations()`` without one):
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> optimizer = flatminima.TiltedSAM(base, rho=0.05, tilt=1.0, num_samples=3, radius=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with optimizer.evaluations() as evaluations:
        ...     for evaluation in evaluations:
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         loss.backward()
        ...         evaluation.report(loss)
    """

    paper = "Li, Zhou & Bilmes, ICML 2025"
    passes_text = "2·`num_samples`"
    extra_memory = "2 P, whatever `num_samples`"
    memory_copies = 2.0

    manual_two_pass = False  # 2·s passes, and each perturbed pass's loss is needed

    declaration = (
        hp.Hyperparameter(
            "rho", 0.05, hp.non_negative, "ρ", "radius of the SAM step from each start"
        ),
        hp.Hyperparameter(
            "tilt", 1.0, hp.non_negative, "t", "tilt (authors' script)", step_level=True
        ),
        hp.Hyperparameter(
            "num_samples", 3, hp.positive_int, "s", "perturbations per step", step_level=True
        ),
        hp.Hyperparameter(
            "radius", 1.0, hp.non_negative, "r", "radius of the random start", step_level=True
        ),
        hp.Hyperparameter(
            "noise_scale",
            1.0,
            hp.non_negative,
            "-",
            "std of the start noise before projection",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        tilt: float = 1.0,
        num_samples: int = 3,
        radius: float = 1.0,
        noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={
                "rho": rho,
                "tilt": tilt,
                "num_samples": num_samples,
                "radius": radius,
                "noise_scale": noise_scale,
            },
            direction=GradientDirection(),
            neighborhood=EuclideanBall(),
            model=model,
            foreach=foreach,
        )
        self.generator = generator

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        values = {**cls.hyperparameter_defaults, **(hyperparameters or {})}
        return 2 * int(values["num_samples"])

    def _step_plan(self) -> StepPlan:
        first = self.param_groups[0]
        return StepPlan(
            samples=int(first["num_samples"]),
            combiner=TiltedAverage(float(first["tilt"])),
            start=RandomSphereStart(
                self.generator,
                radius=float(first["radius"]),
                noise_scale=float(first["noise_scale"]),
                foreach=self.foreach,
            ),
        )

    def _extra_state(self) -> dict[str, Any]:
        """The generator's state, so that a resumed run draws the same noise (the default
        generator's state is the caller's to save, with ``torch.get_rng_state``)."""
        return {} if self.generator is None else {"generator_state": self.generator.get_state()}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        if self.generator is not None and "generator_state" in extra:
            self.generator.set_state(extra["generator_state"])
