"""The slice of one parameter group that a method's parts work on during a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flatminima import kernels


@dataclass
class GroupView:
    """The parameters of one param group that have a gradient in the current pass.

    ``grads[i]`` is ``params[i].grad``; the parts transform it in place (gradient → ascent
    direction → perturbation ε). ``scratch`` is a buffer shaped like ``params`` that a part may
    overwrite freely; the engine uses the same memory afterwards to back the weights up, which
    is why a method costs one parameter copy and not two. It is ``None`` when the backup has
    already been taken (Tilted SAM's random starts); parts then allocate what they need.
    """

    hyperparameters: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    scratch: list[Tensor] | None = None

    def scratch_or_new(self) -> list[Tensor]:
        """The scratch buffer, or a freshly allocated one when none was lent."""
        if self.scratch is None:
            self.scratch = kernels.empty_like(self.params)
        return self.scratch


def all_grads(views: list[GroupView]) -> list[Tensor]:
    """Every gradient of every view, in group order: what a global norm runs over."""
    return [g for view in views for g in view.grads]
