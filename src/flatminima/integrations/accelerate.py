"""Hugging Face accelerate: ``prepare()`` that keeps the whole flatminima API, with
``accumulate()`` and fp16 correct.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which hides
``first_step`` / ``second_step`` / ``evaluations``, drops the loss ``step`` returns, and under
fp16 calls ``scaler.step(optimizer, closure)``. Use :func:`prepare` instead::

    from flatminima.integrations.accelerate import prepare

    accelerator = Accelerator(mixed_precision="fp16", gradient_accumulation_steps=4)
    model, optimizer, loader = prepare(accelerator, model, optimizer, loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            def closure(x=x, y=y):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                return loss
            loss = optimizer.step(closure)

It returns what ``accelerator.prepare`` returns, with each flatminima optimizer's wrapper made a
:class:`SharpnessAwareAcceleratedOptimizer`:

* ``step(closure)`` inside ``accumulate()`` collects the micro-batches' closures and, on the
  window's last micro-batch, runs one step whose every pass evaluates every micro-batch
  (``accelerator.backward`` divides each loss by the number of micro-batches). It returns the
  window's mean loss at w (``None`` on the other micro-batches).
* fp16: the accelerator's GradScaler is attached (:mod:`flatminima.amp`), so every pass is
  unscaled and an overflow on any pass skips the step; ``step_was_skipped`` says so.
* ``first_step``, ``second_step``, ``abort_step`` and ``evaluations`` are reachable, outside
  ``accumulate()`` windows (refused inside one); with fp16 they call ``scaler.update()`` when
  the step ends (``evaluations()`` when its ``with`` block ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flatminima.integrations import require

require("accelerate", "accelerate")

from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

from flatminima import amp  # noqa: E402
from flatminima.engine import Evaluation, Evaluations, SharpnessAwareOptimizer  # noqa: E402


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects)``, with flatminima optimizers' wrappers upgraded."""
    prepared = accelerator.prepare(*objects, **kwargs)
    for item in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(item, AcceleratedOptimizer) and isinstance(
            item.optimizer, SharpnessAwareOptimizer
        ):
            # Same object, same state: the subclass only adds methods (a wrapper of the wrapper
            # would break accelerate's own isinstance checks and its list of optimizers).
            item.__class__ = SharpnessAwareAcceleratedOptimizer
            amp.use_grad_scaler(item.optimizer, item.scaler)
    return prepared


class SharpnessAwareAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` around a flatminima optimizer (made by :func:`prepare`)."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise TypeError(
                f"{type(self.optimizer).__name__}.step() needs a closure that runs the forward "
                "and accelerator.backward(loss) and returns the loss (every pass runs it)"
            )
        window = self.__dict__.setdefault("_flatminima_window", [])
        window.append(closure)
        if not self.gradient_state.sync_gradients:
            return None  # inside accumulate(): evaluated at every point of the window's step
        closures, self._flatminima_window = list(window), []

        def every_micro_batch() -> Any:
            losses = [c() for c in closures]
            if any(loss is None for loss in losses):
                return None
            return sum(loss.detach() for loss in losses) / len(losses)

        if self.scaler is None:
            return self.optimizer.step(every_micro_batch)
        loss = self.scaler.step(self.optimizer, every_micro_batch)
        self.scaler.update()
        self._is_overflow = amp.step_was_skipped(self.optimizer)
        return loss

    def first_step(self) -> None:
        self._refuse_inside_a_window("first_step")
        self.optimizer.first_step()

    def second_step(self) -> None:
        self.optimizer.second_step()
        self._update_scaler()

    def abort_step(self) -> None:
        self.optimizer.abort_step()
        self._update_scaler()

    def evaluations(self) -> _UpdatingEvaluations:
        self._refuse_inside_a_window("evaluations")
        return _UpdatingEvaluations(self.optimizer.evaluations(), self)

    def _update_scaler(self) -> None:
        if self.scaler is not None:
            self.scaler.update()
            self._is_overflow = amp.step_was_skipped(self.optimizer)

    def _refuse_inside_a_window(self, name: str) -> None:
        if not self.gradient_state.sync_gradients:
            raise RuntimeError(
                f"{name}() inside an accelerator.accumulate() window would step on one "
                "micro-batch: use step(closure), which evaluates every micro-batch of the window"
            )


class _UpdatingEvaluations:
    """``evaluations()`` that updates the accelerator's scaler when its ``with`` block ends."""

    def __init__(self, inner: Evaluations, owner: SharpnessAwareAcceleratedOptimizer) -> None:
        self._inner = inner
        self._owner = owner

    @property
    def loss(self) -> Any:
        return self._inner.loss

    def __iter__(self) -> Iterator[Evaluation]:
        return iter(self._inner)

    def __enter__(self) -> _UpdatingEvaluations:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._inner.__exit__(*exc_info)
        self._owner._update_scaler()
