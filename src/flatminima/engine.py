"""The engine every sharpness-aware method runs on.

A method is three small parts (see DESIGN.md §2) plus the base optimizer:

* an ascent direction (``directions.py``): which vector to climb along;
* a neighbourhood (``neighborhoods.py``): which ε of size ρ in its metric to step to;
* a combination (``combiners.py``): how the perturbed gradients become the update;
* the base optimizer instance (SGD, AdamW, ...), which takes the descent step at w.

The engine owns everything else: the passes, zeroing gradients, the weights' backup and its
restore *by copy*, BatchNorm statistics on perturbed passes, DDP's ``no_sync``, and the state
dict. One generator, :meth:`SharpnessAwareOptimizer._passes`, describes a step; the closure
form (:meth:`~SharpnessAwareOptimizer.step`), the two-pass manual form
(:meth:`~SharpnessAwareOptimizer.first_step` / :meth:`~SharpnessAwareOptimizer.second_step`)
and the general manual form (:meth:`~SharpnessAwareOptimizer.evaluations`) all drive it, so
they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flatminima import kernels
from flatminima.combiners import Combiner, PerturbedGradient
from flatminima.directions import AscentDirection
from flatminima.groups import GroupView, all_grads
from flatminima.neighborhoods import Neighborhood
from flatminima.passes import all_reduce_mean_, pass_context

START = "start"
"""An evaluation at the point a perturbation starts from (the weights themselves for SAM)."""
PERTURBED = "perturbed"
"""An evaluation at a perturbed point w + ε."""


class Evaluation:
    """One forward/backward pass the method asks for.

    ``point`` is :data:`START` or :data:`PERTURBED`; ``index`` counts the perturbations of the
    step (always 0 for two-pass methods). Report the pass's loss with :meth:`report`: methods
    that weigh their perturbations by the loss (Tilted SAM) need it, the others ignore it.
    """

    def __init__(self, index: int, point: str) -> None:
        self.index = index
        self.point = point
        self.loss: Tensor | float | None = None

    def report(self, loss: Tensor | float | None) -> None:
        self.loss = loss

    def __repr__(self) -> str:
        return f"Evaluation(index={self.index}, point={self.point!r})"


@dataclass
class StepPlan:
    """How one step is organised: perturbations, their combination, their start points."""

    samples: int = 1
    combiner: Combiner | None = None
    start: Callable[[list[Tensor], list[Tensor]], None] | None = None
    """``start(params, backup)`` sets params ← backup + ζ; ``None`` starts at the weights."""


class StepOutcome:
    """What a finished step reports back: its loss."""

    def __init__(self) -> None:
        self.loss: Any = None


class Evaluations(StepOutcome):
    """The passes of one step, for loops that cannot hand over a closure.

    Iterate it; for each :class:`Evaluation` run one forward and backward pass (the engine has
    already zeroed the gradients and moved the weights) and report the loss. When the loop
    ends the descent step has been taken and :attr:`loss` holds the step's loss. Use it as a
    context manager so that an exception inside the loop restores the weights at once::

        with optimizer.evaluations() as evaluations:
            for evaluation in evaluations:
                loss = criterion(model(x), y)
                loss.backward()
                evaluation.report(loss)
    """

    def __init__(self, optimizer: SharpnessAwareOptimizer) -> None:
        super().__init__()
        self._generator = optimizer._passes(self, zero_first=True)

    def __iter__(self) -> Iterator[Evaluation]:
        return self._generator

    def __enter__(self) -> Evaluations:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._generator.close()  # runs the engine's restore if the loop did not finish


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """A base optimizer wrapped with a sharpness-aware perturbation.

    Subclasses (one per method, in ``flatminima.methods``) choose the parts and validate their
    hyperparameters; nothing else. The wrapper shares the base optimizer's ``param_groups``
    (same list, same dicts), so LR schedulers, ``add_param_group`` and per-group
    hyperparameters work on either object, and every method hyperparameter can be set per
    group (``{"params": ..., "rho": 0.1}``).

    Conventions (and where they differ from the authors' codes):

    * Weight decay stays in the base optimizer: it is applied at w and is not part of the
      ascent direction, as in every PyTorch code (the JAX SAM puts L2 into the loss,
      PITFALLS P5).
    * Dropout draws fresh masks on each pass, the PyTorch convention (the JAX SAM reuses the
      first pass's key, P15). Seed the pass yourself if you need the same mask.
    * Parameters without a gradient on the start pass are not perturbed; every perturbed
      parameter is restored by copy, whether or not it has a gradient later (P2, P3).
    """

    hyperparameter_defaults: ClassVar[dict[str, Any]] = {}
    """The method's hyperparameters and their defaults (read by the registry and the CLI)."""

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        hyperparameters: Mapping[str, Any],
        direction: AscentDirection,
        neighborhood: Neighborhood,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer instance, got "
                f"{type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, SharpnessAwareOptimizer):
            raise TypeError("base_optimizer is already sharpness-aware; wrap a plain optimizer")
        clashes = sorted(set(hyperparameters) & set(base_optimizer.defaults))
        if clashes:
            raise ValueError(
                f"{type(base_optimizer).__name__} already uses the hyperparameter name(s) "
                f"{', '.join(clashes)} in its param groups; {type(self).__name__} cannot share them"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self._check_hyperparameters(hyperparameters)
        for group in base_optimizer.param_groups:
            self._check_hyperparameters({**hyperparameters, **_known(group, hyperparameters)})
        self.base_optimizer = base_optimizer
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.direction = direction
        self.neighborhood = neighborhood
        self._pending: Generator[Evaluation, None, None] | None = None
        super().__init__(base_optimizer.param_groups, dict(hyperparameters))
        # Share the base optimizer's list itself: a group added to either is seen by both.
        self.param_groups = base_optimizer.param_groups

    # -- what a method defines -------------------------------------------------------------

    @classmethod
    def _check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` naming the argument and its accepted range."""

    @classmethod
    def passes_per_step(cls, hyperparameters: Mapping[str, Any] | None = None) -> int:
        """Forward/backward passes of one step: a start pass and a perturbed pass."""
        return 2

    def _step_plan(self) -> StepPlan:
        """The organisation of this step; multi-sample methods override it."""
        return StepPlan(samples=1, combiner=PerturbedGradient(), start=None)

    # -- param groups and state ------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer too; method hyperparameters default to the
        constructor's values and are validated before anything is added."""
        self._check_hyperparameters({**self.defaults, **_known(param_group, self.defaults)})
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
        for name, value in self.defaults.items():
            param_group.setdefault(name, value)

    def state_dict(self) -> dict[str, Any]:
        """The method's persistent state *and* the base optimizer's whole state (P1).

        Nothing transient is in it: the weights' backup exists only inside a step.
        """
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base_optimizer": self.base_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "state_dict has no 'base_optimizer' entry: it was not saved by a flatminima "
                "optimizer (load a bare base optimizer's state into .base_optimizer instead)"
            )
        super().load_state_dict(
            {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        # Both loads build new group dicts; share the base optimizer's again.
        self.param_groups = self.base_optimizer.param_groups

    # -- the three ways to run a step ------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: calls ``closure`` (forward + backward, returns the loss) as often as the
        method needs, zeroing the gradients before each call, and returns the loss at the
        unperturbed weights (Tilted SAM, which never evaluates them: its tilted loss)."""
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that runs the forward and "
                "backward pass and returns the loss; without one, use first_step()/"
                "second_step() or evaluations()"
            )
        with self.evaluations() as evaluations:
            for evaluation in evaluations:
                with torch.enable_grad():
                    evaluation.report(closure())
        return evaluations.loss

    def evaluations(self) -> Evaluations:
        """The step as an iterable of passes, for loops without a closure (any method)."""
        if self._pending is not None:
            raise RuntimeError("first_step() was called without second_step()")
        return Evaluations(self)

    def first_step(self) -> None:
        """Manual form, after the caller's forward/backward at w: moves to w + ε.

        Zeroes the gradients; the caller then runs the second forward/backward and calls
        :meth:`second_step`. With AMP, unscale the gradients before calling it (Fisher SAM and
        Monge SAM depend on the gradient's scale). If the second pass fails, call
        :meth:`abort_step` to put the weights back.
        """
        if self.passes_per_step(self.param_groups[0]) != 2:
            raise TypeError(
                f"{type(self).__name__} needs {self.passes_per_step(self.param_groups[0])} "
                "passes per step: use step(closure) or evaluations()"
            )
        if self._pending is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        passes = self._passes(StepOutcome(), zero_first=False)
        next(passes)  # the start pass at w: the caller has already run it
        next(passes)  # builds ε, perturbs, stops before the perturbed pass
        self._pending = passes

    def second_step(self) -> None:
        """Manual form, after the caller's forward/backward at w + ε: restores w and lets
        the base optimizer step with the perturbed gradient."""
        if self._pending is None:
            raise RuntimeError("second_step() called without first_step()")
        passes, self._pending = self._pending, None
        for _ in passes:
            raise RuntimeError("internal error: a two-pass step asked for a third pass")

    def abort_step(self) -> None:
        """Restores the weights after :meth:`first_step` without taking a step."""
        if self._pending is not None:
            passes, self._pending = self._pending, None
            passes.close()

    # -- the step itself -------------------------------------------------------------------

    def _trainable_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _views(self, scratch_for: dict[int, Tensor] | None) -> list[GroupView]:
        views = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad and p.grad is not None]
            if not params:
                continue
            views.append(
                GroupView(
                    hyperparameters=group,
                    params=params,
                    grads=[p.grad for p in params],
                    scratch=None if scratch_for is None else [scratch_for[id(p)] for p in params],
                )
            )
        return views

    def _passes(
        self, result: StepOutcome, *, zero_first: bool
    ) -> Generator[Evaluation, None, None]:
        """One step, as a generator that yields before each forward/backward pass.

        The caller runs the pass between two ``next`` calls. Closing the generator early
        (an exception in the pass, :meth:`abort_step`) restores the weights by copy.
        """
        plan = self._step_plan()
        combiner = plan.combiner or PerturbedGradient()
        foreach = self.foreach
        params = self._trainable_params()
        backed_up: list[Tensor] = []  # the parameters whose values sit in `backup`
        backup: list[Tensor] = []
        moved = False
        start_losses: list[Any] = []
        combiner.start()
        try:
            for sample in range(plan.samples):
                if plan.start is not None:
                    with torch.no_grad():
                        if not backed_up:
                            backed_up, backup = params, [p.detach().clone() for p in params]
                        moved = True
                        plan.start(params, backup)
                if zero_first or sample > 0:
                    self.zero_grad(set_to_none=True)
                start = Evaluation(sample, START)
                # Exactly one pass per step updates BatchNorm statistics: the first start pass
                # (the clean pass for SAM and kin).
                with pass_context(self.model, freeze_statistics=sample > 0, synchronise=False):
                    yield start
                start_losses.append(start.loss)

                with torch.no_grad():
                    lend_scratch = not backed_up
                    if lend_scratch:
                        backed_up = [p for p in params if p.grad is not None]
                        backup = kernels.empty_like(backed_up)
                    views = self._views(
                        dict(zip(map(id, backed_up), backup, strict=True)) if lend_scratch else None
                    )
                    self.direction.direction_(views, self.state, foreach=foreach)
                    self.neighborhood.perturbation_(views, foreach=foreach)
                    if lend_scratch:
                        kernels.copy_(backup, backed_up, foreach=foreach)
                    moved = True
                    kernels.add_(
                        [p for view in views for p in view.params], all_grads(views),
                        foreach=foreach,
                    )
                    del views
                self.zero_grad(set_to_none=True)

                last = sample == plan.samples - 1
                perturbed = Evaluation(sample, PERTURBED)
                # Forward and backward of every pass but the last run under DDP's no_sync: the
                # ascent gradient stays per process (SAM's m-sharpness), one all-reduce a step.
                with pass_context(
                    self.model,
                    freeze_statistics=True,
                    synchronise=last and combiner.synchronised_by_last_pass,
                ):
                    yield perturbed
                loss = perturbed.loss
                combiner.add(
                    params,
                    None if loss is None or not combiner.needs_loss else _as_float(loss),
                    foreach=foreach,
                )
                with torch.no_grad():
                    kernels.copy_(backed_up, backup, foreach=foreach)
                moved = False

            combiner.finish(params, foreach=foreach)
            if not combiner.synchronised_by_last_pass:
                all_reduce_mean_(self.model, [p.grad for p in params if p.grad is not None])
            self.base_optimizer.step()
            objective = combiner.objective()
            result.loss = (
                start_losses[0] if objective is None else torch.tensor(objective, dtype=torch.float64)
            )
        finally:
            if moved:
                with torch.no_grad():
                    kernels.copy_(backed_up, backup, foreach=foreach)


def _known(group: Mapping[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``group`` that are method hyperparameters."""
    return {name: group[name] for name in names if name in group}


def _as_float(loss: Tensor | float) -> float:
    """A reported loss as a Python float (detached: it is a value, not part of the graph)."""
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
