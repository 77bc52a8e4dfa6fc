"""Mixed precision: a ``torch.amp.GradScaler`` and a multi-pass step that agree.

A GradScaler multiplies the loss by a scale s before each backward, so every gradient in
``.grad`` is s times too large until it is unscaled. ``GradScaler.unscale_`` and
``GradScaler.step`` unscale *the gradients present when they are called*: a sharpness-aware
step computes further gradients after that, and a perturbed pass left scaled multiplies the
update by s (PITFALLS P12). Here the step itself unscales: once a scaler is attached with
:func:`use_grad_scaler`, the engine unscales every pass's gradients in place the moment the pass
ends, before any part reads them, and an overflow (an inf or NaN) on any pass ends the step at
once: no further pass, the weights restored by copy, no descent, and the scaler told, so that
the next ``scaler.update()`` backs the scale off exactly as it does for a plain optimizer.

Plain PyTorch, any method, one form::

    scaler = torch.amp.GradScaler("cuda")
    flatminima.amp.use_grad_scaler(optimizer, scaler)      # once

    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        return loss

    loss = optimizer.step(closure)       # or scaler.step(optimizer, closure): the same step
    scaler.update()

The manual forms (``first_step``/``second_step``, ``evaluations()``) work the same way with a
scaler attached: scale each pass's loss, never call ``scaler.unscale_`` yourself, and call
``scaler.update()`` after the step.

``GradScaler.step(optimizer, closure)`` is supported through the scaler's own contract for
optimizers that handle scaling (``_step_supports_amp_scaling``): the scaler hands the step its
scale instead of unscaling, and the step above runs. Without an attached scaler that path is
refused in one line, because the step could not tell the scaler about an overflow on a later
pass (the scaler would keep its scale, or fail in ``update()`` with no record).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flatminima.engine import SharpnessAwareOptimizer

_SCALER_ATTRIBUTE = "_flatminima_grad_scaler"
_LAST_STEP_ATTRIBUTE = "_flatminima_last_scaling"


def use_grad_scaler(optimizer: torch.optim.Optimizer, scaler: Any | None) -> None:
    """Attaches ``scaler`` (a ``torch.amp.GradScaler``) to a flatminima optimizer, or detaches
    it with ``None``. From then on every pass of every step is unscaled by the step itself.

    Also initialises the scaler's scale on the parameters' device, so that
    ``scaler.step(optimizer, closure)`` works on the very first step (a fresh scaler has no
    scale until its first ``scale()`` call, and its ``step`` refuses to run before that).
    """
    from flatminima.engine import SharpnessAwareOptimizer

    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(
            f"use_grad_scaler needs a flatminima optimizer, got {type(optimizer).__name__}"
        )
    if scaler is not None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        device = next(
            (p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu")
        )
        if scaler.is_enabled():
            scaler.scale(torch.zeros((), device=device))  # creates the scale tensor if absent
    # Set on the instance: a framework's wrapper that copies the optimizer's __dict__
    # (Lightning's LightningOptimizer) sees it too.
    setattr(optimizer, _SCALER_ATTRIBUTE, scaler)


def attached_grad_scaler(optimizer: torch.optim.Optimizer) -> Any | None:
    """The scaler attached with :func:`use_grad_scaler`, or ``None``."""
    return getattr(optimizer, _SCALER_ATTRIBUTE, None)


def step_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the last step run with an attached scaler was skipped for an overflow."""
    last = getattr(optimizer, _LAST_STEP_ATTRIBUTE, None)
    return last is not None and bool(last.found_inf.item())


class PassScaling:
    """One step's unscaling: every pass's gradients divided by the scale in place, and a flag
    that is set if any of them held an inf or a NaN.

    The flag is a tensor registered in the scaler's record for this optimizer, so that the
    scaler's next ``update()`` backs the scale off when any pass overflowed, and grows it as
    usual when none did.
    """

    def __init__(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        scale = scaler._scale  # the scaler's own tensor: no device-to-host copy per step
        if scale is None:
            raise RuntimeError(
                "the GradScaler has no scale yet: call flatminima.amp.use_grad_scaler(optimizer, "
                "scaler) again, or scaler.scale(loss) before the step"
            )
        self._inv_scale = scale.double().reciprocal().float()
        self.found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        # The record GradScaler.update() reads: one found-inf tensor per device and optimizer.
        record = scaler._per_optimizer_states[id(optimizer)]
        record["found_inf_per_device"] = {self.found_inf.device: self.found_inf}
        optimizer.__dict__[_LAST_STEP_ATTRIBUTE] = self

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscales the gradients now in ``.grad``; returns whether any pass so far overflowed
        (a device-to-host read, one per pass)."""
        grouped: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grouped[(p.grad.device, p.grad.dtype)].append(p.grad)
        with torch.no_grad():
            for (device, _), grads in grouped.items():
                found_inf = self.found_inf.to(device)
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, found_inf, self._inv_scale.to(device)
                )
                if found_inf is not self.found_inf:  # another device: fold its flag in
                    self.found_inf.copy_(self.found_inf.maximum(found_inf.to(self.found_inf)))
        return bool(self.found_inf.item())


def pass_scaling(optimizer: SharpnessAwareOptimizer) -> PassScaling | None:
    """The engine's one question at the start of a step: unscale this step's passes, and with
    which scaler? ``None`` when no enabled scaler is attached (then gradients are used as they
    are, as without mixed precision)."""
    scaler = attached_grad_scaler(optimizer)
    handed_a_scale = hasattr(optimizer, "grad_scale")  # set by GradScaler.step for this call
    if scaler is None or not scaler.is_enabled():
        if handed_a_scale:
            raise RuntimeError(
                f"GradScaler.step(optimizer, ...) drives a {type(optimizer).__name__} step "
                "(several passes): attach the scaler once with flatminima.amp.use_grad_scaler("
                "optimizer, scaler) so that every pass is unscaled and an overflow on any pass "
                "backs the scale off"
            )
        return None
    return PassScaling(scaler, optimizer)
