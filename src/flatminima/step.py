"""One optimizer step, as a method's program sees it.

A method describes its step as a generator, ``program(step)``, that yields the passes it wants
(:class:`Evaluation`) and, between them, moves the weights and combines gradients through the
:class:`Step` it is handed. The engine runs the passes (zeroing gradients first, freezing
BatchNorm statistics, DDP's ``no_sync``), takes the descent step once the program returns, and
restores the weights by copy in a ``finally``, whatever happened. A program reads like its
paper's algorithm box::

    def program(self, step):
        clean = yield step.clean_pass()
        g = step.keep_gradients()
        step.perturb(self.direction, self.neighborhood)
        yield step.perturbed_pass()
        step.restore()
        ...                                      # combine p.grad with g
        return clean.loss

The step holds everything transient (the weights' backup, kept gradients): it is dropped when
the step ends, so none of it reaches ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flatminima import kernels
from flatminima.groups import GroupView, all_grads
from flatminima.passes import all_reduce_mean_

if TYPE_CHECKING:
    from flatminima.directions import AscentDirection
    from flatminima.engine import SharpnessAwareOptimizer
    from flatminima.neighborhoods import Neighborhood

START = "start"
"""An evaluation at the point a perturbation starts from (the weights themselves for SAM)."""
PERTURBED = "perturbed"
"""An evaluation at a perturbed point w + ε."""


class Evaluation:
    """One forward/backward pass the method asks for.

    ``point`` is :data:`START` or :data:`PERTURBED`; ``index`` counts the perturbations of the
    step (0 for methods with one). Report the pass's loss with :meth:`report`: methods that
    weigh their passes by the loss (Tilted SAM) or choose examples by it (ESAM) need it; the
    others return the first pass's loss from ``step``.

    What the pass must compute:

    * ``examples``: ``None`` for the whole batch, else a 1-D index tensor into the batch
      (``x[evaluation.examples]``). A method that splits the batch before any pass has seen it
      (micro-batch SAM) asks for a :class:`MicroBatch` instead, which only the closure can turn
      into rows: :meth:`examples_for` does that for every request, so a closure written as
      ``rows = evaluation.examples_for(len(x))`` serves every method;
    * ``needs_gradient``: ``False`` for a forward-only probe (the engine runs it under
      ``torch.no_grad()``; skip the backward).

    A closure may return the per-example losses (a 1-D tensor, ``reduction="none"``, after a
    backward on their mean): they are kept in :attr:`losses` for the method, and :attr:`loss`
    is their mean. ``updates_statistics`` (the one pass of a step that may update BatchNorm's
    running statistics) and ``synchronise`` (the pass whose gradient DDP may all-reduce during
    backward, because it *is* the update) are the engine's business.
    """

    def __init__(
        self,
        index: int,
        point: str,
        *,
        updates_statistics: bool,
        synchronise: bool,
        examples: Tensor | MicroBatch | None = None,
        needs_gradient: bool = True,
        fraction: float = 1.0,
    ) -> None:
        self.index = index
        self.point = point
        self.updates_statistics = updates_statistics
        self.synchronise = synchronise
        self._requested = examples
        self._examples = None if isinstance(examples, MicroBatch) else examples
        self.needs_gradient = needs_gradient
        self._fraction = fraction
        self.batch_size: int | None = None
        """The batch size the closure gave :meth:`examples_for` (``None`` until then)."""
        self.loss: Tensor | float | None = None
        self.losses: Tensor | None = None

    @property
    def examples(self) -> Tensor | None:
        """The rows of the batch this pass runs on (``None``: all of them)."""
        if isinstance(self._requested, MicroBatch) and self.batch_size is None:
            raise ValueError(
                f"this pass runs on micro-batch {self._requested.index} of "
                f"{self._requested.count}, which depends on the batch size: read its rows with "
                "evaluation.examples_for(batch_size)"
            )
        return self._examples

    def examples_for(self, batch_size: int) -> Tensor | None:
        """The rows of a batch of ``batch_size`` examples this pass runs on (``None``: all)."""
        self.batch_size = int(batch_size)
        if isinstance(self._requested, MicroBatch):
            self._examples = self._requested.rows(self.batch_size)
        return self._examples

    @property
    def fraction(self) -> float:
        """The share of the batch this pass runs on (its cost in full passes)."""
        if isinstance(self._requested, MicroBatch) and self._examples is not None:
            return len(self._examples) / self.batch_size  # type: ignore[operator]
        return self._fraction

    @property
    def whole_batch_with_gradient(self) -> bool:
        """What a closure that takes no argument can run: every example, with a backward."""
        return self._requested is None and self.needs_gradient

    def report(self, loss: Tensor | float | None) -> None:
        """Records the pass's loss: a scalar, or the per-example losses (a 1-D tensor)."""
        if isinstance(loss, Tensor) and loss.dim() == 1:
            self.losses = loss.detach()
            self.loss = self.losses.mean()
        else:
            self.loss = loss

    def __repr__(self) -> str:
        return f"Evaluation(index={self.index}, point={self.point!r})"


@dataclass(frozen=True)
class MicroBatch:
    """Micro-batch ``index`` of ``count`` near-equal, contiguous parts of the batch.

    The parts are those of ``torch.tensor_split``: with B examples the first B mod count parts
    hold ⌈B/count⌉ examples, the others ⌊B/count⌋. A request the closure resolves with
    :meth:`Evaluation.examples_for`, because the batch size is known only there.
    """

    index: int
    count: int

    def rows(self, batch_size: int) -> Tensor | None:
        """The part's row indices in a batch of ``batch_size`` (``None`` for the whole)."""
        if self.count > batch_size:
            raise ValueError(
                f"micro_batches must be at most the batch size: {self.count} micro-batches of a "
                f"batch of {batch_size} examples would leave some empty"
            )
        if self.count == 1:
            return None
        small, extra = divmod(batch_size, self.count)
        start = self.index * small + min(self.index, extra)
        stop = start + small + (1 if self.index < extra else 0)
        return torch.arange(start, stop)


@dataclass
class Cost:
    """Compute an optimizer ran, in full batches: forward passes and backward passes.

    A pass on a quarter of the batch counts 0.25; a forward-only probe counts in ``forward``
    only. :attr:`passes` weighs a backward as two forwards (the usual rule of thumb), so one
    full forward and backward is 1.
    """

    forward: float = 0.0
    backward: float = 0.0

    @property
    def passes(self) -> float:
        return (self.forward + 2.0 * self.backward) / 3.0

    def add(self, evaluation: Evaluation) -> None:
        self.forward += evaluation.fraction
        if evaluation.needs_gradient:
            self.backward += evaluation.fraction


class Step:
    """What a method's program may see and do during one step.

    Attributes:
        params: the trainable parameters of every group, in group order.
        count: the number of steps this optimizer completed before this one (saved in
            ``state_dict()``): LookSAM's every-k refresh reads it.
        state: the method's persistent per-parameter state (``optimizer.state``).
        foreach: whether the kernels take the ``torch._foreach_*`` path.
    """

    def __init__(self, optimizer: SharpnessAwareOptimizer, *, count: int) -> None:
        self._optimizer = optimizer
        self.foreach = optimizer.foreach
        self.count = count
        self.state = optimizer.state
        self.params = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        self._backup = _Backup(self.foreach)
        self._after_descent: list[Callable[[], None]] = []
        self._statistics_pass_taken = False
        self._synchronised = False
        self._batch_size: int | None = None

    # -- what the program reads ----------------------------------------------------------------

    @property
    def groups(self) -> list[dict[str, Any]]:
        """The param groups (hyperparameters as they are at this step)."""
        return self._optimizer.param_groups

    def base_state(self, param: Tensor) -> Mapping[str, Any]:
        """The base optimizer's state for ``param``, read-only (empty before its first step)."""
        return MappingProxyType(self._optimizer.base_optimizer.state.get(param, {}))

    def views(self) -> list[GroupView]:
        """The parameters that have a gradient now, per group, with their gradients."""
        return self._optimizer._views()

    def gradients(self) -> list[Tensor | None]:
        """``p.grad`` of every trainable parameter (``None`` where it has none)."""
        return [p.grad for p in self.params]

    # -- passes ------------------------------------------------------------------------------------

    def clean_pass(
        self,
        *,
        index: int = 0,
        update_statistics: bool = True,
        examples: Tensor | MicroBatch | None = None,
        needs_gradient: bool = True,
    ) -> Evaluation:
        """A pass at the start point (the weights themselves unless a start moved them)."""
        return self._evaluation(
            index, START, update_statistics, False, examples=examples, needs_gradient=needs_gradient
        )

    def perturbed_pass(
        self,
        *,
        index: int = 0,
        synchronise: bool = False,
        update_statistics: bool = False,
        examples: Tensor | MicroBatch | None = None,
        needs_gradient: bool = True,
    ) -> Evaluation:
        """A pass at the perturbed point. ``synchronise=True`` only for the last pass of a
        step whose gradient is the update as it stands (SAM): DDP all-reduces it during
        backward; otherwise the engine all-reduces the final update once.
        ``update_statistics=True`` for a method whose only pass is perturbed (Momentum-SAM).
        ``examples`` (indices into the batch) and ``needs_gradient=False`` (a forward-only
        probe) ask for less than a full pass; :attr:`batch_size` must then be known, unless
        ``examples`` is a :class:`MicroBatch`, which the closure resolves."""
        return self._evaluation(
            index,
            PERTURBED,
            update_statistics,
            synchronise,
            examples=examples,
            needs_gradient=needs_gradient,
        )

    @property
    def batch_size(self) -> int | None:
        """The number of examples in the batch, known once a pass of this step resolved its
        rows (:meth:`Evaluation.examples_for`) or a whole-batch pass reported per-example
        losses."""
        return self._batch_size

    def _evaluation(
        self,
        index: int,
        point: str,
        update_statistics: bool,
        synchronise: bool,
        *,
        examples: Tensor | MicroBatch | None,
        needs_gradient: bool,
    ) -> Evaluation:
        if update_statistics:
            if self._statistics_pass_taken:
                raise RuntimeError(
                    "internal error: a step may update BatchNorm statistics on one pass only"
                )
            self._statistics_pass_taken = True
        if self._synchronised:
            raise RuntimeError("internal error: a synchronising pass must be the step's last")
        if synchronise and (examples is not None or not needs_gradient):
            raise RuntimeError("internal error: only a whole-batch gradient pass synchronises")
        fraction = 1.0
        if examples is not None and not isinstance(examples, MicroBatch):
            if self._batch_size is None:
                raise RuntimeError(
                    "internal error: a pass on a subset needs the batch size, known from an "
                    "earlier pass's per-example losses"
                )
            fraction = len(examples) / self._batch_size
        self._synchronised = synchronise
        return Evaluation(
            index,
            point,
            updates_statistics=update_statistics,
            synchronise=synchronise,
            examples=examples,
            needs_gradient=needs_gradient,
            fraction=fraction,
        )

    def _ran(self, evaluation: Evaluation) -> None:
        """Called by the engine after each pass: learns the batch size from the closure
        (:meth:`Evaluation.examples_for`) or from the per-example losses of a whole-batch pass."""
        if evaluation.batch_size is not None:
            self._batch_size = evaluation.batch_size
        elif evaluation._requested is None and evaluation.losses is not None:
            self._batch_size = len(evaluation.losses)

    # -- moving the weights -----------------------------------------------------------------------

    def perturb(self, direction: AscentDirection, neighborhood: Neighborhood) -> None:
        """w ← w + ε, ε built in place in ``p.grad`` from the gradients now there: first the
        direction, then the neighbourhood. The backup is taken first (if nothing took it yet)
        and its memory is lent to the parts as scratch until then, which is how ASAM and
        Fisher SAM build their metric without a second parameter copy."""
        backup = self._backup
        with torch.no_grad():
            lend_scratch = not backup.taken
            views = self._optimizer._views(backup if lend_scratch else None)
            if lend_scratch:
                backup.lend_to(views)
            direction.direction_(views, self.state, foreach=self.foreach)
            neighborhood.perturbation_(views, foreach=self.foreach)
            if lend_scratch:
                backup.fill()
            backup.moved = True
            kernels.add_(
                [p for view in views for p in view.params], all_grads(views), foreach=self.foreach
            )

    def move_weights(
        self, params: list[Tensor], deltas: list[Tensor], alphas: list[float | Tensor]
    ) -> None:
        """w ← w + αᵢ·δᵢ for each parameter (after backing up every trainable parameter):
        for perturbations built outside ``p.grad`` (Momentum-SAM's −ρ·v/‖v‖).

        Each αᵢ is a Python float, or a 0-d tensor under ``torch.compile`` (a factor that
        changes every step, from :func:`kernels.traced_factor`: a float would be baked into
        the graph and recompile it every step). Consecutive parameters that share the same
        α *object* move in one kernel call: pass one object per group, not one per
        parameter (α is never compared by value, which would specialise a compiled graph)."""
        with torch.no_grad():
            self.back_up()
            self._backup.moved = True
            runs: list[tuple[float | Tensor, list[Tensor], list[Tensor]]] = []
            for p, d, a in zip(params, deltas, alphas, strict=True):
                if not runs or runs[-1][0] is not a:
                    runs.append((a, [], []))
                runs[-1][1].append(p)
                runs[-1][2].append(d)
            for alpha, targets, sources in runs:
                kernels.add_scaled_(targets, sources, alpha, foreach=self.foreach)

    def move_to_start(self, start: Any) -> None:
        """Backs the weights up and lets ``start`` move them to w + ζ (Tilted SAM)."""
        with torch.no_grad():
            self.back_up()
            self._backup.moved = True
            start.move_(self.params, self._backup.values)

    def back_up(self) -> None:
        """Copies every trainable parameter now, once per step."""
        if not self._backup.taken:
            with torch.no_grad():
                self._backup.take(self.params)

    def restore(self) -> None:
        """Puts the weights back, by copy (never by subtracting ε)."""
        with torch.no_grad():
            self._backup.restore()

    # -- gradients -------------------------------------------------------------------------

    def keep_gradients(self) -> list[Tensor | None]:
        """A copy of every trainable parameter's gradient (``None`` where it has none): one
        parameter copy, freed when the step ends."""
        with torch.no_grad():
            return [None if p.grad is None else p.grad.clone() for p in self.params]

    def all_reduce(self, tensors: list[Tensor]) -> None:
        """Averages ``tensors`` over DDP's processes (nothing without DDP): for a kept
        gradient that enters the update outside ``p.grad`` (WSAM's decoupled correction).
        Nothing under FSDP either: every pass's gradient is already averaged there."""
        model = self._optimizer.model
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel) or not tensors:
            return
        import torch.distributed as dist

        group = model.process_group
        world_size = dist.get_world_size(group)
        for t in tensors:
            dist.all_reduce(t, group=group)
            t.div_(world_size)

    def after_descent(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` (under ``torch.no_grad()``) after the base optimizer's step."""
        self._after_descent.append(callback)

    # -- the engine's side ----------------------------------------------------------------------

    def _synchronise_update(self) -> None:
        """All-reduces the update unless DDP did it during the last pass's backward."""
        if not self._synchronised:
            all_reduce_mean_(self._optimizer.model, self.params)

    def _finish(self) -> None:
        with torch.no_grad():
            for callback in self._after_descent:
                callback()

    def _close(self) -> None:
        self.restore()
        self._after_descent = []


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
class BorrowingView(GroupView):
    """A view whose scratch, when a part asks for it, is the weights' backup's memory."""

    lender: _Backup | None = None

    def scratch_or_new(self) -> list[Tensor]:
        if self.scratch is None and self.lender is not None:
            self.lender.allocate_for_borrowers()
        return super().scratch_or_new()
