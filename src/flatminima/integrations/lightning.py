"""PyTorch Lightning: precision plugins under which every flatminima method runs every pass.

Lightning's automatic optimization already calls ``optimizer.step(closure)`` with a closure
that runs ``training_step`` and the backward, which is exactly flatminima's contract. Three
things still need the plugin:

* **fp16 with a GradScaler** (``16-mixed``): Lightning runs the closure itself, then calls
  ``scaler.step(optimizer)`` without it, so a second pass is impossible. The plugin hands the
  closure to the step and attaches the scaler (:mod:`flatminima.amp`): every pass unscaled, an
  overflow on any pass skips the step.
* **the logged loss is the loss at w**: ``training_step`` runs once per pass; the plugin turns
  ``self.log`` off on every pass after the first, so a logged ``loss`` is the unperturbed one.
* **gradient clipping under fp16**: Lightning clips inside the closure, before the step
  unscales; the plugin scales the threshold by the loss scale, which clips the same gradient.

Use::

    from flatminima.integrations.lightning import precision_plugin

    trainer = pl.Trainer(plugins=[precision_plugin("16-mixed", "cuda")], ...)

with ``configure_optimizers`` returning the flatminima optimizer (``model=`` the network, for
BatchNorm). Manual optimization: call ``optimizer.step(closure)`` with a closure that runs
``self.manual_backward(loss)``, which advances ``global_step``; ``first_step()`` /
``second_step()`` do not go through Lightning's step and are not supported there. Gradient
accumulation (``accumulate_grad_batches`` > 1) is refused by the step in one line
(:mod:`flatminima.accumulation`); accumulate inside a manual-optimization closure instead.
Gradient clipping applies to each pass's gradient (for SAM the ascent direction is unchanged
by it, ε only depends on g/‖g‖).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from flatminima.integrations import require

require("pytorch_lightning", "lightning")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.plugins.precision import MixedPrecision, Precision  # noqa: E402
from pytorch_lightning.utilities import GradClipAlgorithmType  # noqa: E402

from flatminima import amp  # noqa: E402
from flatminima.engine import SharpnessAwareOptimizer  # noqa: E402


class _SharpnessAwareSteps:
    """What both plugins add to Lightning's: the closure handed to the step, for every pass."""

    scaler: torch.amp.GradScaler | None = None

    def optimizer_step(
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            return super().optimizer_step(optimizer, model, closure, **kwargs)  # type: ignore[misc]
        if self.scaler is not None and amp.attached_grad_scaler(optimizer) is not self.scaler:
            amp.use_grad_scaler(optimizer, self.scaler)
        passes = 0

        def each_pass() -> Any:
            nonlocal passes
            first = passes == 0
            passes += 1
            with contextlib.nullcontext() if first else _logging_off(model):
                return self._wrap_closure(model, optimizer, closure)  # type: ignore[attr-defined]

        result = optimizer.step(each_pass, **kwargs)
        if self.scaler is not None:
            self.scaler.update()
        return result


class SharpnessAwarePrecision(_SharpnessAwareSteps, Precision):
    """``32-true`` for flatminima optimizers (the logged loss is the loss at w)."""


class SharpnessAwareMixedPrecision(_SharpnessAwareSteps, MixedPrecision):
    """``16-mixed`` (with a GradScaler) or ``bf16-mixed`` for flatminima optimizers."""

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if self.scaler is not None and isinstance(optimizer, SharpnessAwareOptimizer):
            # The gradients are still scaled here (the step unscales each pass after it ends):
            # a threshold scaled alike clips them exactly as the unscaled gradients would be.
            clip_val = clip_val * self.scaler.get_scale()
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def precision_plugin(
    precision: str = "32-true", device: str = "cpu", scaler: torch.amp.GradScaler | None = None
) -> Precision:
    """The plugin for ``Trainer(plugins=[...])``: ``"32-true"``, ``"bf16-mixed"`` or
    ``"16-mixed"`` (a ``torch.amp.GradScaler(device)`` unless ``scaler`` is given)."""
    if precision in ("32-true", "32", 32):
        return SharpnessAwarePrecision()
    if precision == "16-mixed":
        return SharpnessAwareMixedPrecision(
            "16-mixed", device, scaler=scaler or torch.amp.GradScaler(device)
        )
    if precision == "bf16-mixed":
        return SharpnessAwareMixedPrecision("bf16-mixed", device)
    raise ValueError(f"precision must be '32-true', '16-mixed' or 'bf16-mixed', got {precision!r}")


@contextlib.contextmanager
def _logging_off(model: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (the perturbed passes)."""
    if not isinstance(model, pl.LightningModule):
        yield
        return
    model.log = _ignore  # an instance attribute shadows the method for this pass only
    model.log_dict = _ignore
    try:
        yield
    finally:
        del model.log
        del model.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
