"""Hugging Face ``Trainer``: :class:`SharpnessAwareTrainer` runs any flatminima method.

The plain ``Trainer`` runs one forward/backward per micro-batch and then calls
``optimizer.step()`` without a closure, so a sharpness-aware step cannot run its other passes
(``TypeError``). This subclass takes the step where the micro-batches are: the micro-batches
of a gradient-accumulation window are collected, and on the window's last one the
flatminima step runs with a closure that evaluates every micro-batch (each loss scaled for
accumulation exactly as the ``Trainer`` scales it), at every point the method visits. Then:

* ``max_grad_norm`` clips the gradient the base optimizer descends with (a step pre-hook on
  the base optimizer), and the logged ``grad_norm`` is that gradient's norm before clipping;
* fp16: the accelerator's GradScaler is attached (:mod:`flatminima.amp`), every pass is
  unscaled, an overflow on any pass skips the step and the learning-rate schedule, as for any
  optimizer; bf16 needs nothing;
* the logged loss is the loss at w (Tilted SAM: its tilted loss);
* checkpoints hold the base optimizer's and the method's state, so
  ``resume_from_checkpoint`` continues bit for bit.

Use::

    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=dataset,
        sharpness_aware=functools.partial(flatminima.SAM, rho=0.05),  # wraps the Trainer's AdamW
    )

or pass ``optimizers=(flatminima.SAM(base, rho=0.05, model=model), scheduler)``.
Not supported: DeepSpeed, FSDP, SageMaker model parallelism, context parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flatminima.integrations import require

require("transformers", "transformers")
require("accelerate", "transformers")

import torch  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import Trainer  # noqa: E402

from flatminima import amp  # noqa: E402
from flatminima.engine import SharpnessAwareOptimizer  # noqa: E402


class SharpnessAwareTrainer(Trainer):
    """A ``Trainer`` whose optimizer is a flatminima method (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        sharpness_aware: Callable[..., SharpnessAwareOptimizer] | None = None,
        **kwargs: Any,
    ) -> None:
        self._sharpness_aware = sharpness_aware
        self._window: list[tuple[Any, Any]] = []
        self._descent_grad_norm: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    # -- the optimizer ---------------------------------------------------------------------

    @property
    def optimizer(self) -> Any:
        return self.__dict__.get("_flatminima_optimizer")

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        # The Trainer assigns its optimizer, and later accelerate's wrapper of it: the wrapper's
        # step() becomes the end of a step already taken in training_step.
        if isinstance(value, AcceleratedOptimizer) and isinstance(
            value.optimizer, SharpnessAwareOptimizer
        ):
            value.__class__ = _StepTakenInTrainingStep
        self.__dict__["_flatminima_optimizer"] = value

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            if self._sharpness_aware is None:
                raise TypeError(
                    "SharpnessAwareTrainer needs a flatminima optimizer: pass "
                    "sharpness_aware=functools.partial(flatminima.SAM, rho=...) or "
                    "optimizers=(flatminima.SAM(base, ...), None)"
                )
            self.optimizer = self._sharpness_aware(optimizer, model=model or self.model)
        self._hook_the_descent(self.optimizer)
        return self.optimizer

    def _hook_the_descent(self, optimizer: SharpnessAwareOptimizer) -> None:
        base = optimizer.base_optimizer
        if getattr(base, "_flatminima_trainer_hook", None) is None:
            base._flatminima_trainer_hook = base.register_step_pre_hook(self._before_descent)

    def _before_descent(self, base: torch.optim.Optimizer, *args: Any) -> None:
        """Right before the base optimizer steps: clip (and measure) the descent gradient."""
        params = [p for g in base.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        self._descent_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- one step, where the micro-batches are ---------------------------------------------

    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.gradient_state.sync_gradients:
            # Not the window's last micro-batch: evaluated with the others at the step. Its
            # loss is in the window's (the Trainer adds the returned losses up).
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        model.train()
        optimizer = (
            self.optimizer.optimizer
            if isinstance(self.optimizer, AcceleratedOptimizer)
            else self.optimizer
        )
        scaler = self.accelerator.scaler
        if amp.attached_grad_scaler(optimizer) is not scaler:
            amp.use_grad_scaler(optimizer, scaler)

        def every_micro_batch() -> torch.Tensor:
            total = torch.zeros((), device=self.args.device)
            for micro_inputs, items in window:
                micro_inputs = self._prepare_inputs(micro_inputs)
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, micro_inputs, num_items_in_batch=items)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                if not self._scaled_for_accumulation(items):
                    loss = loss / len(window)
                self.accelerator.backward(loss)
                total = total + loss.detach()
            return total

        self._descent_grad_norm = None
        loss = optimizer.step(every_micro_batch)
        return loss.detach().to(self.args.device).float()

    def _scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether ``compute_loss`` already divided the loss for accumulation (the Trainer's
        own rule, from its ``training_step``)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    # The Trainer clips and measures after training_step; the step is over by then.
    def _clip_grad_norm(self, model: Any) -> Any:
        return self._descent_grad_norm

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = grad_norm if grad_norm is not None else self._descent_grad_norm
        return None if norm is None else float(norm)


class _StepTakenInTrainingStep(AcceleratedOptimizer):
    """accelerate's wrapper, whose ``step()`` (called by the Trainer after ``training_step``)
    only finishes the step :class:`SharpnessAwareTrainer` took: the scaler's update, and
    whether the step was skipped (the Trainer then leaves the learning rate alone)."""

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise TypeError(
                "the Trainer's optimizer steps in training_step; step() takes no closure"
            )
        if self.scaler is not None:
            self.scaler.update()
            self._is_overflow = amp.step_was_skipped(self.optimizer)
