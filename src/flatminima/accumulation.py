"""Gradients accumulated before a step that zeroes them: refused, never silently dropped.

``step(closure)`` and ``evaluations()`` zero the gradients before each pass (the LBFGS
contract). A loop that accumulates micro-batch gradients with ``backward()`` and then calls
``step`` on the last micro-batch (Lightning's ``accumulate_grad_batches``, accelerate's
``accumulate()``, the usual hand-written loop) would lose all but that micro-batch, and take a
step at lr / (number of micro-batches) without a word. So the step refuses to start when
``.grad`` holds gradients that some backward wrote since the last step ended.

How it tells: when a step ends, each gradient it leaves in ``.grad`` is marked with its
version counter (autograd's in-place write counter). At the next step's start a gradient
that is unmarked (a new tensor) or whose version moved (accumulated into, zeroed in place)
and that is not all zeros was written by someone else. Gradients the user zeroed in place
(``zero_grad(set_to_none=False)``) are all zeros and pass.

To accumulate correctly, evaluate every micro-batch at every point the method visits: a
closure that loops over the micro-batches (each loss divided by their number) does it::

    def closure():
        total = 0.0
        for x, y in micro_batches:
            loss = criterion(model(x), y) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total

    optimizer.step(closure)
"""

from __future__ import annotations

import torch

_MARK = "_flatminima_left_by_step"


def mark_left_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Called when a step ends: marks the gradients the step leaves behind."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                setattr(p.grad, _MARK, p.grad._version)


def refuse_new_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Called before a step zeroes the gradients: raises if a backward wrote any since the
    last step (or ever, before the first step)."""
    written = [
        p.grad
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None and getattr(p.grad, _MARK, None) != p.grad._version
    ]
    # Stops at the first non-zero one; only gradients zeroed in place are read to the end.
    if any(g.is_sparse or bool(g.ne(0).any()) for g in written):
        raise RuntimeError(
            f"{type(optimizer).__name__}.step(closure) found gradients in .grad from a "
            "backward before the step (gradient accumulation?); the step zeroes them, so "
            "they would be lost: call zero_grad() first, or accumulate inside the "
            "closure (loop over the micro-batches there; see flatminima.accumulation)"
        )
