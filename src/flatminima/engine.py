"""The engine every sharpness-aware method runs on.

A method is a few small parts (see DESIGN.md §2) plus the base optimizer:

* an ascent direction (``directions.py``): which vector to climb along;
* a neighbourhood (``neighborhoods.py``): which ε of size ρ in its metric to step to;
* a combination (``combiners.py``): how the perturbed gradients become the update;
* optionally a start (``starts.py``): where each perturbation begins (Tilted SAM's random
  starts; the weights themselves otherwise);
* the base optimizer instance (SGD, AdamW, ...), which takes the descent step at w.

The engine owns everything else: the passes, zeroing gradients, the weights' backup and its
restore *by copy*, BatchNorm statistics on perturbed passes, DDP's ``no_sync``, and the state
dict. One generator, :meth:`SharpnessAwareOptimizer._passes`, describes a step; the closure
form (:meth:`~SharpnessAwareOptimizer.step`), the two-pass manual form
(:meth:`~SharpnessAwareOptimizer.first_step` / :meth:`~SharpnessAwareOptimizer.second_step`)
and the general manual form (:meth:`~SharpnessAwareOptimizer.evaluations`) all drive it, so
they cannot disagree.

Memory: the weights' backup is one parameter copy. Before it holds the weights, the same
buffer is lent, on request, to the direction and the neighbourhood as scratch space
(``GroupView.scratch_or_new``), which is how ASAM and Fisher SAM build their metric without a
second copy; when no part asks for it, the backup is simply a clone of the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
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

DEFAULTED_KEY = "flatminima_defaulted"
"""Param-group entry listing the method hyperparameters a wrapper filled in from its own
arguments (as opposed to values the user set per group). A later wrapper around the same base
optimizer overwrites these, and keeps the user's."""


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


class StartPoint:
    """Protocol of a start: ``move_(params, backup)`` sets params ← backup + ζ."""

    def move_(self, params: list[Tensor], backup: list[Tensor]) -> None:
        raise NotImplementedError


@dataclass
class StepPlan:
    """How one step is organised: perturbations, their combination, their start points."""

    samples: int = 1
    combiner: Combiner = field(default_factory=PerturbedGradient)
    start: StartPoint | None = None
    """``None`` starts every perturbation at the weights themselves."""


@dataclass
class StepOutcome:
    """What a finished step reports back."""

    loss: Any = None


class Evaluations:
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
        # The generator holds the outcome, not this object: no reference cycle, so dropping an
        # unfinished iteration (a `break`) closes the generator, and restores the weights, at
        # once rather than at some later garbage collection.
        self._outcome = StepOutcome()
        self._generator = optimizer._start_step(self._outcome, zero_first=True)

    @property
    def loss(self) -> Any:
        return self._outcome.loss

    def __iter__(self) -> Iterator[Evaluation]:
        return self._generator

    def __enter__(self) -> Evaluations:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._generator.close()  # runs the engine's restore if the loop did not finish


def _wrap_an_instance(method: str, given: Any) -> str:
    """The error for anything but an optimizer instance, saying how to write the call (the
    popular ports take ``SAM(params, torch.optim.SGD, rho=..., lr=...)``)."""
    what = given.__name__ if isinstance(given, type) else type(given).__name__
    return (
        f"base_optimizer must be a torch.optim.Optimizer instance, got {what}; write "
        f"{method}(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05), "
        f"not {method}(model.parameters(), torch.optim.SGD, rho=..., lr=...)"
    )


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """A base optimizer wrapped with a sharpness-aware perturbation.

    Subclasses (one per method, in ``flatminima.methods``) choose the parts and validate their
    hyperparameters; nothing else. ``param_groups`` *is* the base optimizer's list (same list,
    same dicts), so LR schedulers, ``add_param_group`` and per-group hyperparameters work on
    either object, and every method hyperparameter can be set per group
    (``{"params": ..., "rho": 0.1}``).

    Conventions (and where they differ from the authors' codes):

    * Weight decay stays in the base optimizer: it is applied at w and is not part of the
      ascent direction, as in every PyTorch code (the JAX SAM puts L2 into the loss,
      PITFALLS P5).
    * Dropout draws fresh masks on each pass, the PyTorch convention (the JAX SAM reuses the
      first pass's key, P15). Seed the pass yourself if you need the same mask.
    * Every parameter the step moves is restored by copy, whether or not it has a gradient on
      a later pass (P2, P3). Methods that start at the weights (all but Tilted SAM) move only
      the parameters with a gradient on the start pass; Tilted SAM's random start moves every
      parameter with ``requires_grad``.
    * Sparse gradients are refused with a clear error; FSDP / ZeRO sharded gradients are not
      supported (the norm would be per shard, P4).
    """

    hyperparameter_defaults: ClassVar[dict[str, Any]] = {}
    """The method's hyperparameters and their defaults (read by the registry and the CLI)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SharpnessAwareOptimizer:
        # SAM(params, torch.optim.SGD, rho=..., lr=...) fails in __init__'s signature (an
        # "unexpected keyword argument 'lr'") before any check could name the fix.
        if (
            len(args) > 1
            and isinstance(args[1], type)
            and issubclass(args[1], torch.optim.Optimizer)
        ):
            raise TypeError(_wrap_an_instance(cls.__name__, args[0]))
        return super().__new__(cls)

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
            raise TypeError(_wrap_an_instance(type(self).__name__, base_optimizer))
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
            self._check_hyperparameters({**hyperparameters, **_user_set(group, hyperparameters)})
        self.base_optimizer = base_optimizer
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.direction = direction
        self.neighborhood = neighborhood
        self._pending: Generator[Evaluation, None, None] | None = None
        self._open_step: weakref.ref[Generator[Evaluation, None, None]] | None = None
        # torch.optim.Optimizer.__init__ calls add_param_group for each group: ours fills in
        # the method's hyperparameters and leaves the groups where they are, in the base.
        super().__init__(base_optimizer.param_groups, dict(hyperparameters))
        self._check_groups_agree(self.param_groups)

    # -- what a method defines -------------------------------------------------------------

    @classmethod
    def _check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` naming the argument and its accepted range."""

    def _check_groups_agree(self, groups: list[dict[str, Any]]) -> None:
        """Raises ``ValueError`` if hyperparameters that shape the whole step differ between
        ``groups`` (none do for two-pass methods)."""

    @classmethod
    def passes_per_step(cls, hyperparameters: Mapping[str, Any] | None = None) -> int:
        """Forward/backward passes of one step: a start pass and a perturbed pass."""
        return 2

    def _step_plan(self) -> StepPlan:
        """The organisation of this step; multi-sample methods override it."""
        return StepPlan()

    def _extra_state(self) -> dict[str, Any]:
        """Method state that is not per parameter (saved by ``state_dict``)."""
        return {}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        """Restores what :meth:`_extra_state` saved."""

    # -- param groups and state ------------------------------------------------------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups, always (also after its ``load_state_dict``)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty list before adding the groups one by
        # one; the groups live in the base optimizer, so that assignment is dropped.
        if groups:
            self.base_optimizer.param_groups = groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer too; method hyperparameters default to the
        constructor's values and are validated before anything is added."""
        values = {**self.defaults, **_user_set(param_group, self.defaults)}
        self._check_hyperparameters(values)
        is_new = not any(param_group is group for group in self.base_optimizer.param_groups)
        if is_new:
            self._check_groups_agree([*self.param_groups, values])
            self.base_optimizer.add_param_group(param_group)
        self._fill_defaults(param_group)

    def _fill_defaults(self, group: dict[str, Any]) -> None:
        defaulted = [name for name in self.defaults if name not in _user_set(group, self.defaults)]
        for name in defaulted:
            group[name] = self.defaults[name]
        group[DEFAULTED_KEY] = tuple(sorted(set(defaulted) | set(group.get(DEFAULTED_KEY, ()))))

    def _complete_groups(self) -> None:
        """Groups added to the base optimizer directly (its ``add_param_group``, its
        ``load_state_dict`` of a plain checkpoint) get the method's hyperparameters."""
        for group in self.param_groups:
            if any(name not in group for name in self.defaults):
                self._check_hyperparameters({**self.defaults, **_user_set(group, self.defaults)})
                self._fill_defaults(group)

    def state_dict(self) -> dict[str, Any]:
        """The method's persistent state *and* the base optimizer's whole state (P1).

        Nothing transient is in it: the weights' backup exists only inside a step.
        """
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base_optimizer": self.base_optimizer.state_dict(),
            "method": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "state_dict has no 'base_optimizer' entry: it was not saved by a flatminima "
                "optimizer (load a bare base optimizer's state into .base_optimizer instead)"
            )
        # Maps the method's per-parameter state onto the current parameters; the group dicts
        # it builds are dropped (see the param_groups setter), the base's load restores them.
        super().load_state_dict(
            {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._load_extra_state(state_dict.get("method", {}))

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
        return Evaluations(self)

    def first_step(self) -> None:
        """Manual form, after the caller's forward/backward at w: moves to w + ε.

        Zeroes the gradients; the caller then runs the second forward/backward and calls
        :meth:`second_step`. If the second pass fails, call :meth:`abort_step` to put the
        weights back. Under DistributedDataParallel, run the caller's first pass (forward
        and backward) inside ``model.no_sync()`` yourself: the engine cannot wrap a pass it
        does not run (:meth:`step` and :meth:`evaluations` do it for you).
        """
        plan = self._step_plan()
        if plan.samples != 1 or plan.start is not None or plan.combiner.needs_loss:
            raise TypeError(
                f"{type(self).__name__} needs {self.passes_per_step(self.param_groups[0])} "
                "passes per step, a start point of its own or the passes' losses: use "
                "step(closure) or evaluations()"
            )
        passes = self._start_step(StepOutcome(), zero_first=False, plan=plan)
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

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)``: the same loop over every parameter of every group,
        without the profiler range and the per-call set-up of ``Optimizer.zero_grad``, which
        runs two or more times a step."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _trainable_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _views(self, lender: _Backup | None = None) -> list[GroupView]:
        """The parameters with a gradient, per group, in one pass over the parameters; with
        ``lender``, the views borrow their scratch from the weights' backup."""
        views: list[GroupView] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad and p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    "(e.g. nn.Embedding(sparse=True)); use dense gradients"
                )
            views.append(
                _BorrowingView(hyperparameters=group, params=params, grads=grads, lender=lender)
            )
        return views

    def _start_step(
        self, outcome: StepOutcome, *, zero_first: bool, plan: StepPlan | None = None
    ) -> Generator[Evaluation, None, None]:
        """A new step's generator, after checking that no other step is open."""
        open_step = None if self._open_step is None else self._open_step()
        if open_step is not None:
            raise RuntimeError(
                "the previous step is unfinished (its weights may still be perturbed): finish "
                "its passes, call abort_step(), or run evaluations() inside a `with` block"
            )
        passes = self._passes(outcome, zero_first=zero_first, plan=plan)
        self._open_step = weakref.ref(passes)
        return passes

    def _passes(
        self, outcome: StepOutcome, *, zero_first: bool, plan: StepPlan | None = None
    ) -> Generator[Evaluation, None, None]:
        """One step, as a generator that yields before each forward/backward pass.

        The caller runs the pass between two ``next`` calls. Closing the generator early
        (an exception in the pass, :meth:`abort_step`) restores the weights by copy.
        """
        self._complete_groups()
        plan = plan or self._step_plan()
        foreach = self.foreach
        params = self._trainable_params()
        backup = _Backup(foreach)
        start_losses: list[Any] = []
        try:
            for sample in range(plan.samples):
                if plan.start is not None:
                    with torch.no_grad():
                        backup.take(params)
                        backup.moved = True
                        plan.start.move_(params, backup.values)
                if zero_first or sample > 0:
                    self._clear_grads()
                start = Evaluation(sample, START)
                # Exactly one pass per step updates BatchNorm statistics: the first start pass
                # (the clean pass for SAM and kin).
                with pass_context(self.model, freeze_statistics=sample > 0, synchronise=False):
                    yield start
                start_losses.append(start.loss)

                with torch.no_grad():
                    self._perturb(backup)
                self._clear_grads()

                last = sample == plan.samples - 1
                perturbed = Evaluation(sample, PERTURBED)
                # Every pass but the last runs under DDP's no_sync, forward and backward: the
                # ascent gradient stays per process (SAM's m-sharpness), one all-reduce a step.
                with pass_context(
                    self.model,
                    freeze_statistics=True,
                    synchronise=last and plan.combiner.synchronised_by_last_pass,
                ):
                    yield perturbed
                loss = perturbed.loss
                plan.combiner.add(
                    params,
                    None if loss is None or not plan.combiner.needs_loss else _as_float(loss),
                    foreach=foreach,
                )
                with torch.no_grad():
                    backup.restore()

            plan.combiner.finish(params, foreach=foreach)
            if not plan.combiner.synchronised_by_last_pass:
                all_reduce_mean_(self.model, params)
            self.base_optimizer.step()
            objective = plan.combiner.objective()
            outcome.loss = (
                start_losses[0]
                if objective is None
                else torch.tensor(objective, dtype=torch.float64)
            )
        finally:
            with torch.no_grad():
                backup.restore()
            self._open_step = None

    def _perturb(self, backup: _Backup) -> None:
        """From the start point's gradients: direction, ε, and w ← w + ε (the backup taken
        first if no start point took it)."""
        lend_scratch = not backup.taken
        views = self._views(backup if lend_scratch else None)
        if lend_scratch:
            backup.lend_to(views)
        self.direction.direction_(views, self.state, foreach=self.foreach)
        self.neighborhood.perturbation_(views, foreach=self.foreach)
        if lend_scratch:
            backup.fill()
        backup.moved = True
        kernels.add_(
            [p for view in views for p in view.params], all_grads(views), foreach=self.foreach
        )


class _Backup:
    """The weights' backup: one parameter copy, restored by copy (never by subtracting ε)."""

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach
        self.params: list[Tensor] = []
        self.values: list[Tensor] = []
        self.taken = False
        self.moved = False
        self._borrowers: list[GroupView] = []

    def take(self, params: list[Tensor]) -> None:
        """Copies ``params`` now (once per step). Called under ``torch.no_grad()``, where a
        clone has no autograd history already: no ``detach()``, one tensor object fewer per
        parameter."""
        if not self.taken:
            if torch.is_grad_enabled():
                raise RuntimeError("internal error: the backup is taken under torch.no_grad()")
            self.params, self.values = params, [p.clone() for p in params]
            self.taken = True

    def lend_to(self, views: list[GroupView]) -> None:
        """Backs up the parameters of ``views`` at :meth:`fill`; until then a view that asks
        for scratch space (``scratch_or_new``) gets its slice of the backup's memory."""
        self.params = [p for view in views for p in view.params]
        self._borrowers = views

    def allocate_for_borrowers(self) -> None:
        """Allocates the backup now, on the first request for scratch, and hands every
        borrowing view its slice (taken from one list in order: no per-tensor matching)."""
        if self.values or not self.params:
            return
        self.values = kernels.empty_like(self.params)
        offset = 0
        for view in self._borrowers:
            view.scratch = self.values[offset : offset + len(view.params)]
            offset += len(view.params)

    def fill(self) -> None:
        """Copies the weights into the backup. When no part borrowed scratch (SAM, Monge SAM)
        the memory is allocated and filled by one ``clone`` per tensor instead of an
        allocation and a separate copy."""
        if self.values:
            kernels.copy_(self.values, self.params, foreach=self.foreach)
        else:
            self.values = [p.clone() for p in self.params]
        self._borrowers = []
        self.taken = True

    def restore(self) -> None:
        if self.moved:
            kernels.copy_(self.params, self.values, foreach=self.foreach)
            self.moved = False


@dataclass
class _BorrowingView(GroupView):
    """A view whose scratch, when a part asks for it, is the weights' backup's memory."""

    lender: _Backup | None = None

    def scratch_or_new(self) -> list[Tensor]:
        if self.scratch is None and self.lender is not None:
            self.lender.allocate_for_borrowers()
        return super().scratch_or_new()


def _user_set(group: Mapping[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    """The method hyperparameters in ``group`` that the user set (not a wrapper's defaults)."""
    defaulted = set(group.get(DEFAULTED_KEY, ()))
    return {name: group[name] for name in names if name in group and name not in defaulted}


def _as_float(loss: Tensor | float) -> float:
    """A reported loss as a Python float (detached: it is a value, not part of the graph)."""
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
