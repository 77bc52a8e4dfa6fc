"""The engine every sharpness-aware method runs on.

A method is a short *program* over one step (``step.py``): a generator that yields the passes
it wants and, between them, perturbs, restores and combines gradients with small parts
(DESIGN.md §2):

* an ascent direction (``directions.py``): which vector to climb along;
* a neighbourhood (``neighborhoods.py``): which ε of size ρ in its metric to step to;
* a combination (``combiners.py``): how the perturbed gradients become the update;
* optionally a start (``starts.py``): where each perturbation begins (Tilted SAM);
* the base optimizer instance (SGD, AdamW, ...), which takes the descent step at w.

The engine owns the mechanics: gradients zeroed before each pass, BatchNorm statistics
updated by exactly one declared pass, DDP's ``no_sync`` on every pass but the one whose
gradient is the update, the weights restored *by copy* in a ``finally`` (also on exceptions
and aborts), the descent through one hooked call (so ``step(closure)``, the manual forms and
:meth:`~SharpnessAwareOptimizer.evaluations` all fire the step hooks and the LR scheduler's
bookkeeping), the step counter, validation of hyperparameters whenever a param group changes,
and the state dict (nothing transient in it). The default program is SAM's shape, which the
first six methods share; the others write their own.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flatminima import accumulation, amp, sharded
from flatminima import hyperparameters as hp
from flatminima.combiners import Combiner, PerturbedGradient
from flatminima.directions import AscentDirection, GradientDirection
from flatminima.groups import GroupView
from flatminima.neighborhoods import EuclideanBall, Neighborhood
from flatminima.passes import pass_context
from flatminima.step import PERTURBED, START, BorrowingView, Cost, Evaluation, Step, _Backup

__all__ = [
    "PERTURBED",
    "START",
    "Cost",
    "Evaluation",
    "Evaluations",
    "SharpnessAwareOptimizer",
    "StartPoint",
    "Step",
    "StepPlan",
]

DEFAULTED_KEY = "flatminima_defaulted"
"""Param-group entry listing the method hyperparameters a wrapper filled in from its own
arguments (as opposed to values the user set per group). A later wrapper around the same base
optimizer overwrites these, and keeps the user's."""

Program = Generator[Evaluation, Evaluation, Any]
"""A method's step: yields passes, receives each back once it has run, returns the loss."""


class StartPoint:
    """Protocol of a start: ``move_(params, backup)`` sets params ← backup + ζ."""

    def move_(self, params: list[Tensor], backup: list[Tensor]) -> None:
        raise NotImplementedError


@dataclass
class StepPlan:
    """How the default program organises a step: perturbations, their combination, starts."""

    samples: int = 1
    combiner: Combiner = field(default_factory=PerturbedGradient)
    start: StartPoint | None = None
    """``None`` starts every perturbation at the weights themselves."""


@dataclass
class StepOutcome:
    """What a finished step reports back."""

    loss: Any = None


class _Descent:
    """The argument ``step`` receives when the engine routes a manual form's descent through
    it, so that step hooks and LR-scheduler bookkeeping fire exactly once per step."""


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

    def __init__(self, optimizer: SharpnessAwareOptimizer, *, hooked: bool = True) -> None:
        # The generator holds the outcome, not this object: no reference cycle, so dropping an
        # unfinished iteration (a `break`) closes the generator, and restores the weights, at
        # once rather than at some later garbage collection.
        self._outcome = StepOutcome()
        self._generator = optimizer._start_step(
            self._outcome, caller_ran_first_pass=False, hooked=hooked
        )

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
    """A base optimizer wrapped with a sharpness-aware step.

    Subclasses (one per method, in ``flatminima.methods``) declare their hyperparameters
    (:attr:`declaration`), choose their parts, and, where SAM's shape does not fit, write
    their own :meth:`program`. ``param_groups`` *is* the base optimizer's list (same list,
    same dicts), so LR schedulers, ``add_param_group`` and per-group hyperparameters work on
    either object, and every method hyperparameter can be set per group
    (``{"params": ..., "rho": 0.1}``). ``defaults`` holds the base optimizer's defaults and
    the method's, so every ``torch.optim.lr_scheduler`` (``OneCycleLR``, ``CyclicLR``...)
    works on the wrapper.

    Conventions (and where they differ from the authors' codes):

    * Weight decay stays in the base optimizer: it is applied at w and is not part of the
      ascent direction, as in every PyTorch code (the JAX SAM puts L2 into the loss,
      PITFALLS P5).
    * Dropout draws fresh masks on each pass, the PyTorch convention (the JAX SAM reuses the
      first pass's key, P15). Seed the pass yourself if you need the same mask.
    * Every parameter the step moves is restored by copy, whether or not it has a gradient on
      a later pass (P2, P3).
    * Sparse gradients, complex parameters and a base optimizer with ``maximize=True`` are
      refused with a clear error (negate the loss instead of maximizing).
    * FSDP2 (``fully_shard``) works: every norm and sum is global over the shards, so ε is the
      unsharded model's (``sharded.py``; the README's "Sharded training"). FSDP1's flattened
      parameters are refused; other sharding schemes (DeepSpeed ZeRO) are not detected and
      would give per-shard norms (P4).
    """

    declaration: ClassVar[tuple[hp.Hyperparameter, ...]] = ()
    """The method's hyperparameters, declared once (see :mod:`flatminima.hyperparameters`)."""

    hyperparameter_defaults: ClassVar[dict[str, Any]] = {}
    """Name → default, derived from :attr:`declaration` (read by the registry and the CLI)."""

    paper: ClassVar[str] = ""
    """Authors and venue, for the README's method table and ``flatminima methods``."""

    passes_text: ClassVar[str] = "2"
    """Forward/backward passes per step, in words (the README's table)."""

    extra_memory: ClassVar[str] = "1 P"
    """Extra parameter copies at the step's peak, in words (P = one copy of the parameters)."""

    memory_copies: ClassVar[float] = 1.0
    """The same as a number: the benchmarks hold the measured peak to it."""

    _step_supports_amp_scaling: ClassVar[bool] = True
    """``torch.amp.GradScaler``'s contract: its ``step`` hands this optimizer the scale instead
    of unscaling the gradients present at the call (the later passes would stay scaled); see
    :mod:`flatminima.amp`."""

    needs_per_example_closure: ClassVar[bool] = False
    """Whether the closure must take its evaluation (which examples, whether a gradient) and
    return per-example losses: data-aware methods (ESAM, micro-batch SAM)."""

    manual_two_pass: ClassVar[bool] = True
    """Whether ``first_step()`` / ``second_step()`` apply: one pass at w, then one at w + ε."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "declaration" in cls.__dict__:
            cls.hyperparameter_defaults = hp.defaults_of(cls.declaration)
            cls.__doc__ = _with_symbol_table(cls.__doc__, cls.declaration)

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
        direction: AscentDirection | None = None,
        neighborhood: Neighborhood | None = None,
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
            self._check_group({**group, **hyperparameters, **_user_set(group, hyperparameters)})
        self.base_optimizer = base_optimizer
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.direction = direction or GradientDirection()
        self.neighborhood = neighborhood or EuclideanBall()
        self._method_defaults = dict(hyperparameters)
        self._step_count = 0
        self.cost = Cost()
        """Forward and backward passes run so far, in full batches (a subset counts its
        share, a forward-only probe no backward): what a step really costs."""
        self._validated: dict[int, tuple[dict[str, Any], tuple[Any, ...]]] = {}
        self._pending: Generator[Evaluation, Evaluation, None] | None = None
        self._open_step: weakref.ref[Generator[Evaluation, Evaluation, None]] | None = None
        # torch.optim.Optimizer.__init__ calls add_param_group for each group: ours fills in
        # the method's hyperparameters and leaves the groups where they are, in the base.
        super().__init__(base_optimizer.param_groups, dict(hyperparameters))
        # Schedulers read the base optimizer's defaults (OneCycleLR looks for momentum/betas).
        self.defaults = {**base_optimizer.defaults, **self._method_defaults}
        self._check_groups_agree(self.param_groups)

    # -- what a method defines -------------------------------------------------------------

    @classmethod
    def _check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` naming the argument and its accepted range."""
        hp.check_values(cls.declaration, values)

    def _check_groups_agree(self, groups: list[dict[str, Any]]) -> None:
        """Raises ``ValueError`` if a step-level hyperparameter differs between ``groups``, and
        refuses parameters sharded in a way whose norms would be per shard (``sharded.py``)."""
        hp.check_groups_agree(self.declaration, groups, type(self).__name__)
        sharded.check_parameters(
            (p for group in groups for p in group.get("params", ())), type(self).__name__
        )

    @classmethod
    def passes_per_step(
        cls, hyperparameters: Mapping[str, Any] | None = None, step: int = 0
    ) -> int:
        """Forward/backward passes of step number ``step`` (counted from 0) with these
        hyperparameters: a start pass and a perturbed pass unless the method says otherwise."""
        return 2

    def _step_plan(self) -> StepPlan:
        """The organisation of this step for the default program."""
        return StepPlan()

    def program(self, step: Step) -> Program:
        """SAM's shape, for each of the plan's samples: a pass at the start point, ε from its
        gradient, a pass at the perturbed point, the weights restored; then the combiner
        turns the perturbed gradients into the update. Returns the first start pass's loss
        (or the combiner's objective, e.g. Tilted SAM's tilted loss)."""
        plan = self._step_plan()
        first_loss = None
        for sample in range(plan.samples):
            if plan.start is not None:
                step.move_to_start(plan.start)
            # Exactly one pass per step updates BatchNorm statistics: the first start pass.
            start = yield step.clean_pass(index=sample, update_statistics=sample == 0)
            if sample == 0:
                first_loss = start.loss
            step.perturb(self.direction, self.neighborhood)
            last = sample == plan.samples - 1
            perturbed = yield step.perturbed_pass(
                index=sample, synchronise=last and plan.combiner.synchronised_by_last_pass
            )
            loss = perturbed.loss
            plan.combiner.add(
                step.params,
                None if loss is None or not plan.combiner.needs_loss else _global_loss(loss, step),
                foreach=step.foreach,
            )
            step.restore()
        plan.combiner.finish(step.params, foreach=step.foreach)
        objective = plan.combiner.objective()
        return first_loss if objective is None else torch.tensor(objective, dtype=torch.float64)

    def start_epoch(
        self,
        epoch: int,
        *,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Callable[[], Iterable[Any]],
    ) -> None:
        """Called by training loops (the runner does) before each epoch, counted from 0.

        Methods that learn something from data outside the step override it (Sparse SAM
        refreshes its Fisher mask every few epochs); the others do nothing. ``batches()``
        gives a fresh iterable of ``(inputs, targets)`` training batches and ``loss_fn(output,
        targets)`` the mean loss.
        """

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
        values = {**self._method_defaults, **_user_set(param_group, self._method_defaults)}
        self._check_hyperparameters(values)
        is_new = not any(param_group is group for group in self.base_optimizer.param_groups)
        if is_new:
            self._check_group({**param_group, **values})
            self._check_groups_agree([*self.param_groups, values])
            self.base_optimizer.add_param_group(param_group)
        self._fill_defaults(param_group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """What a group may not hold whatever the method: ``maximize=True``, complex
        parameters, and method hyperparameters out of range."""
        name = type(self).__name__
        if group.get("maximize", False):
            raise ValueError(
                f"{name} does not support a base optimizer with maximize=True (the "
                "perturbation would climb the objective it should guard against); minimise "
                "the negated loss instead"
            )
        params = group.get("params", [])
        if isinstance(params, Tensor):
            params = [params]
        for p in params if isinstance(params, (list, tuple)) else []:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"{name} does not support complex parameters (got a {p.dtype} tensor of "
                    f"shape {tuple(p.shape)}); view them as real with torch.view_as_real"
                )
        self._check_hyperparameters(
            {k: group[k] for k in self.hyperparameter_defaults if k in group}
        )

    def _fill_defaults(self, group: dict[str, Any]) -> None:
        defaults = self._method_defaults
        defaulted = [name for name in defaults if name not in _user_set(group, defaults)]
        for name in defaulted:
            group[name] = defaults[name]
        group[DEFAULTED_KEY] = tuple(sorted(set(defaulted) | set(group.get(DEFAULTED_KEY, ()))))

    def _prepare_groups(self) -> None:
        """Before each step: groups added to the base optimizer directly (its
        ``add_param_group``, its ``load_state_dict`` of a plain checkpoint) get the method's
        hyperparameters, and any group whose values changed since the last step (a scheduler,
        a user's edit) is validated again, with the constructor's messages."""
        names = tuple(self._method_defaults)
        changed = False
        for group in self.param_groups:
            if any(name not in group for name in names):
                self._fill_defaults(group)
            signature = (*(group[name] for name in names), group.get("maximize", False))
            seen = self._validated.get(id(group))
            if seen is not None and seen[0] is group and _same(seen[1], signature):
                continue
            self._check_group(group)
            self._validated[id(group)] = (group, signature)
            changed = True
        if changed:
            self._check_groups_agree(self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The method's persistent state *and* the base optimizer's whole state (P1).

        Nothing transient is in it: the weights' backup exists only inside a step. The
        method's name is recorded, so that another method's checkpoint is refused.
        """
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base_optimizer": self.base_optimizer.state_dict(),
            "method": {
                "name": type(self).__name__,
                "step": self._step_count,
                "cost": (self.cost.forward, self.cost.backward),
                **self._extra_state(),
            },
        }

    def load_state_dict(
        self, state_dict: dict[str, Any], *, base_optimizer_only: bool = False
    ) -> None:
        """Loads a checkpoint of the same method. ``base_optimizer_only=True`` takes only the
        base optimizer's part (its momentum, its learning rates) from a checkpoint of any
        flatminima method, and keeps this method's own hyperparameters and state."""
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "state_dict has no 'base_optimizer' entry: it was not saved by a flatminima "
                "optimizer (load a bare base optimizer's state into .base_optimizer instead)"
            )
        if base_optimizer_only:
            self._load_base_part(state_dict["base_optimizer"])
            return
        self._check_same_method(state_dict)
        method = state_dict.get("method", {})
        # Maps the method's per-parameter state onto the current parameters; the group dicts
        # it builds are dropped (see the param_groups setter), the base's load restores them.
        super().load_state_dict(
            {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._step_count = int(method.get("step", 0))
        self.cost = Cost(*method.get("cost", (0.0, 0.0)))
        self._load_extra_state(method)
        self._validated.clear()

    def _load_base_part(self, base_state: dict[str, Any]) -> None:
        """The base optimizer's state and group settings from another method's checkpoint;
        that method's hyperparameters are dropped from the groups and ours kept."""
        ours = [
            {k: g[k] for k in (*self._method_defaults, DEFAULTED_KEY) if k in g}
            for g in self.param_groups
        ]
        self.base_optimizer.load_state_dict(base_state)
        foreign = _known_hyperparameter_names() | {DEFAULTED_KEY}
        for group, own in zip(self.param_groups, ours, strict=True):
            for name in foreign & set(group):
                del group[name]
            group.update(own)
        self._validated.clear()

    def _check_same_method(self, state_dict: Mapping[str, Any]) -> None:
        ours = type(self).__name__
        theirs = state_dict.get("method", {}).get("name")
        hint = "or pass base_optimizer_only=True to take only the base optimizer's state"
        if theirs is None:
            # Saved before checkpoints named their method: judge by the hyperparameter names.
            known = _known_hyperparameter_names()
            saved = {k for g in state_dict["param_groups"] for k in g if k in known}
            if saved != set(self._method_defaults):
                raise ValueError(
                    f"this checkpoint holds the hyperparameters {sorted(saved)}, not {ours}'s "
                    f"({sorted(self._method_defaults)}): it is another method's; {hint}"
                )
        elif theirs != ours:
            raise ValueError(
                f"this checkpoint is {theirs}'s, not {ours}'s; load it into {theirs}, {hint}"
            )

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the transient step (copies and pickles of an optimizer between
        steps work and share nothing with the original)."""
        if self._open_step is not None and self._open_step() is not None:
            raise RuntimeError(
                "cannot copy or pickle an optimizer in the middle of a step; finish or abort it"
            )
        state = dict(self.__dict__)
        state["_pending"] = None
        state["_open_step"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    # -- the three ways to run a step ------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: calls ``closure`` (forward + backward, returns the loss) as often as the
        method needs, zeroing the gradients before each call, and returns the loss at the
        unperturbed weights (Tilted SAM, which never evaluates them: its tilted loss)."""
        if isinstance(closure, _Descent):
            return self.base_optimizer.step()  # a manual form's descent, hooked through here
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that runs the forward and "
                "backward pass and returns the loss; without one, use first_step()/"
                "second_step() or evaluations() (Lightning, Hugging Face Trainer, accelerate: "
                "see flatminima.integrations)"
            )
        with_evaluation = _takes_an_argument(closure)
        with Evaluations(self, hooked=False) as evaluations:
            for evaluation in evaluations:
                if with_evaluation:
                    loss = closure(evaluation)  # type: ignore[call-arg]
                elif evaluation.whole_batch_with_gradient:
                    loss = closure()
                else:
                    raise ValueError(
                        f"{type(self).__name__} asks for a pass on part of the batch or without "
                        "a gradient: the closure must take the evaluation, "
                        "`def closure(evaluation): ...` (see flatminima.Evaluation)"
                    )
                evaluation.report(loss)
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
        if not self.manual_two_pass:
            passes = self.passes_per_step(self.param_groups[0], self._step_count)
            raise TypeError(
                f"{type(self).__name__} needs {passes} passes per step, passes of its own "
                "shape or the passes' losses: use step(closure) or evaluations()"
            )
        passes = self._start_step(StepOutcome(), caller_ran_first_pass=True, hooked=True)
        next(passes, None)  # builds ε, perturbs, stops before the perturbed pass (or ends the
        # step at once when pass 1 overflowed under a GradScaler; second_step is then a no-op)
        self._pending = passes

    def second_step(self) -> None:
        """Manual form, after the caller's forward/backward at w + ε: restores w and lets
        the base optimizer step with the perturbed gradient."""
        if self._pending is None:
            raise RuntimeError("second_step() called without first_step()")
        passes, self._pending = self._pending, None
        for _ in passes:
            passes.close()
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
                BorrowingView(hyperparameters=group, params=params, grads=grads, lender=lender)
            )
        return views

    def _start_step(
        self, outcome: StepOutcome, *, caller_ran_first_pass: bool, hooked: bool
    ) -> Generator[Evaluation, None, None]:
        """A new step's generator, after checking that no other step is open."""
        open_step = None if self._open_step is None else self._open_step()
        if open_step is not None:
            raise RuntimeError(
                "the previous step is unfinished (its weights may still be perturbed): finish "
                "its passes, call abort_step(), or run evaluations() inside a `with` block"
            )
        self._prepare_groups()
        passes = self._run_program(
            outcome, caller_ran_first_pass=caller_ran_first_pass, hooked=hooked
        )
        self._open_step = weakref.ref(passes)
        return passes

    def _run_program(
        self, outcome: StepOutcome, *, caller_ran_first_pass: bool, hooked: bool
    ) -> Generator[Evaluation, None, None]:
        """Runs the method's program, handing each pass it asks for to the caller.

        The caller runs the pass between two ``next`` calls. Closing this generator early
        (an exception in the pass, :meth:`abort_step`) restores the weights by copy. With
        ``caller_ran_first_pass`` (``first_step``), the program's first pass is the one the
        caller already ran.
        """
        step = Step(self, count=self._step_count)
        program = self.program(step)
        try:
            scaling = amp.pass_scaling(self)  # None without an attached GradScaler
            try:
                evaluation = first = next(program)
                handed = 0
                while True:
                    if not (handed == 0 and caller_ran_first_pass):
                        if handed == 0:
                            accumulation.refuse_new_gradients(self)
                        self._clear_grads()
                        with (
                            pass_context(
                                self.model,
                                freeze_statistics=not evaluation.updates_statistics,
                                synchronise=evaluation.synchronise,
                            ),
                            torch.set_grad_enabled(evaluation.needs_gradient),
                        ):
                            yield evaluation
                    step._ran(evaluation)
                    self.cost.add(evaluation)
                    handed += 1
                    if scaling is not None and scaling.unscale_(self):
                        outcome.loss = first.loss  # an overflow: no further pass, no descent
                        return
                    evaluation = program.send(evaluation)
            except StopIteration as finished:
                loss = finished.value
            step._synchronise_update()
            if hooked:
                self.step(_Descent())  # type: ignore[arg-type]
            else:
                self.base_optimizer.step()
            step._finish()
            self._step_count += 1
            outcome.loss = loss
        finally:
            program.close()
            step._close()
            self._open_step = None
            accumulation.mark_left_gradients(self)


def _takes_an_argument(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` takes the evaluation (one positional parameter without default)."""
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: the plain LBFGS contract
        return False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if (
            parameter.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and parameter.default is inspect.Parameter.empty
        ):
            return True
    return False


def _with_symbol_table(doc: str | None, declaration: hp.Declaration) -> str | None:
    """Replaces the ``{hyperparameters}`` line of a method's docstring by its symbol table."""
    if not doc or "{hyperparameters}" not in doc:
        return doc
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "{hyperparameters}":
            indent = line[: len(line) - len(line.lstrip())]
            table = [
                indent + row if row else row for row in hp.symbol_table(declaration).splitlines()
            ]
            lines[i : i + 1] = table
            break
    return "\n".join(lines)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal, element by element, with identity first (tensors in a group compare by value
    only at a cost, and ``nan != nan`` must count as a change)."""
    return len(a) == len(b) and all(
        x is y or (type(x) is type(y) and x == y) for x, y in zip(a, b, strict=True)
    )


def _known_hyperparameter_names() -> set[str]:
    """Every hyperparameter name of every registered method (imported late: methods import
    this module)."""
    from flatminima import methods

    return {name for cls in methods.BY_NAME.values() for name in cls.hyperparameter_defaults}


def _user_set(group: Mapping[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    """The method hyperparameters in ``group`` that the user set (not a wrapper's defaults)."""
    defaulted = set(group.get(DEFAULTED_KEY, ()))
    return {name: group[name] for name in names if name in group and name not in defaulted}


def _global_loss(loss: Tensor | float, step: Step) -> float:
    """A pass's loss for a combiner that weighs by it: under FSDP the mean over the processes,
    so that every shard of the update gets the same weights (the gradients it weighs are
    already averaged over the processes); the process's own loss otherwise (under DDP each
    process combines its own gradients, which are averaged afterwards)."""
    return sharded.mean_over_processes(_as_float(loss), step.params)


def _as_float(loss: Tensor | float) -> float:
    """A reported loss as a Python float (detached: it is a value, not part of the graph)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the loss a pass reports must be a scalar (one number), got a tensor of shape "
                f"{tuple(loss.shape)}; reduce it with .mean() before returning it"
            )
        return float(loss.detach())
    return float(loss)
