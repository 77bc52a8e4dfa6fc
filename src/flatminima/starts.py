"""Start points: where each perturbation of a step begins.

SAM and most of the family start at the weights themselves. Tilted SAM's released sampler
starts each of its samples at a random point θ + ζ on (or inside) a sphere of radius r.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatminima import kernels
from flatminima.engine import StartPoint


class RandomSphereStart(StartPoint):
    """θ + ζ with ζ = n·min(‖n‖, r)/‖n‖, n ~ s·N(0, I) (TSAM ``first_step2``, "random1" sampler).

    n is drawn per parameter, in parameter order, from ``generator`` (the default generator
    when ``None``), the same stream as ``torch.randn_like(p) * s`` in the authors' code. Since
    ‖n‖ ≈ s·√d is much larger than r for any real model, ζ lies on the sphere of radius r.
    ‖n‖ = 0 (s = 0) gives ζ = 0 instead of 0/0.

    The noise is drawn straight into the parameters, whose values sit in the backup, so the
    random start costs no memory beyond that backup.
    """

    def __init__(
        self,
        generator: torch.Generator | None,
        *,
        radius: float,
        noise_scale: float,
        foreach: bool,
    ) -> None:
        self.generator = generator
        self.radius = radius
        self.noise_scale = noise_scale
        self.foreach = foreach

    def move_(self, params: list[Tensor], backup: list[Tensor]) -> None:
        """Sets params ← backup + ζ."""
        kernels.normal_(params, generator=self.generator)
        kernels.scale_(params, self.noise_scale, foreach=self.foreach)
        noise_norm = kernels.global_norm(params, foreach=self.foreach)
        factor = min(noise_norm, self.radius) / noise_norm if noise_norm > 0.0 else 0.0
        kernels.scale_(params, factor, foreach=self.foreach)
        kernels.add_(params, backup, foreach=self.foreach)
