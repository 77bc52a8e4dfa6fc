"""Everything the benchmark times: the passes alone, the base optimizer, every flatminima
method, and the implementations users run today.

A contender is built around a fresh copy of the workload's model and returns a function that
runs one whole training step on the workload's fixed batch. All of them share:

* the closure: ``p.grad = None`` for every parameter, forward, loss, backward. Zeroing is part
  of the pass, so a pass timed alone costs exactly what it costs inside a method's step;
* the base optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, ``foreach=True`` — the
  kernels torch picks by default on a GPU. Giving every contender the same base step isolates
  the sharpness-aware part, which is what is compared.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from benchmarks.naive import NaiveLoopSAM, NaiveTiltedSAM
from benchmarks.workloads import Workload
from flatminima.registry import METHODS, start_epoch
from flatminima.step import Cost

Step = Callable[[], None]
"""One whole training step on the workload's fixed batch."""
Closure = Callable[[], Tensor]

BASE_HYPERPARAMETERS: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


class Hooks(Protocol):
    """What the memory tracker needs to see of a step (nothing, when timing)."""

    def forward_backward(self) -> ContextManager[None]: ...

    def base_step(self) -> ContextManager[None]: ...


class NoHooks:
    def forward_backward(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def base_step(self) -> ContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Contender:
    """One row of the tables."""

    key: str
    label: str
    kind: str
    """``passes``, ``base``, ``flatminima`` or ``peer``."""
    method: str
    """The method it implements (``sam``, ``friendly-sam``...), or ``sgd`` / ``passes``."""
    passes: float
    """Closure calls per optimizer step, averaged over one cycle of the method: the compute
    of the peers, and the estimate for flatminima's rows, whose timing reports the compute
    their optimizer counted (:attr:`Prepared.cost`; a subset or a forward-only probe is less
    than a pass)."""
    build: Callable[[Workload, Hooks], Prepared] = field(compare=False, repr=False)


@dataclass
class Prepared:
    """A built contender: its step and the parameters it trains."""

    step: Step
    params: list[Tensor]
    steps_per_call: int = 1
    """Optimizer steps one call of ``step`` runs: a whole cycle for methods whose steps
    differ (LookSAM's refresh every k steps), so that every timed call costs the same."""
    cost: Callable[[], Cost] | None = None
    """The compute the optimizer counted so far (flatminima's ``optimizer.cost``, forward and
    backward passes in whole batches); ``None`` for rows that do not count it."""
    method_state: Callable[[], list[Tensor]] | None = None
    """The tensors of the method's own persistent state (``optimizer.state``, not the base
    optimizer's): the memory report adds up their storage, whenever it was allocated."""


@dataclass
class Setup:
    """A fresh model, its parameters and the closure every contender steps with."""

    model: nn.Module
    params: list[Tensor]
    closure: Closure


def setup(workload: Workload, hooks: Hooks) -> Setup:
    model = workload.build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = workload.build_batch()
    loss = workload.loss

    def closure(evaluation: Any = None) -> Tensor:
        """Forward and backward; given an evaluation (flatminima's methods), on the examples
        it asks for, with a backward only if it wants a gradient, returning per-example losses
        (their mean is backpropagated). Both forms cost the same for a whole-batch pass."""
        with hooks.forward_backward():
            for p in params:
                p.grad = None
            if evaluation is None:  # the plain contract (the base step, the peers)
                value = loss(model(x), y)
                value.backward()
                return value
            rows = evaluation.examples_for(len(y))
            rows = slice(None) if rows is None else rows
            losses = loss(model(x[rows]), y[rows], reduction="none")
            if evaluation.needs_gradient:
                losses.mean().backward()
        return losses

    return Setup(model, params, closure)


def _instrument_base(base: torch.optim.Optimizer, hooks: Hooks) -> None:
    """Runs the base optimizer's step inside ``hooks.base_step()``; nothing when timing."""
    if isinstance(hooks, NoHooks):
        return
    unwrapped = base.step

    @functools.wraps(unwrapped)
    def step(*args: Any, **kwargs: Any) -> Any:
        with hooks.base_step():
            return unwrapped(*args, **kwargs)

    base.step = step  # type: ignore[method-assign]


def _sgd(params: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, **BASE_HYPERPARAMETERS, foreach=True)


# -- the passes alone and the base optimizer --------------------------------------------------


def _build_passes(workload: Workload, hooks: Hooks) -> Prepared:
    built = setup(workload, hooks)
    closure = built.closure
    return Prepared(lambda: closure() and None, built.params)


def _build_base(workload: Workload, hooks: Hooks) -> Prepared:
    built = setup(workload, hooks)
    base = _sgd(built.params)
    _instrument_base(base, hooks)

    def step() -> None:
        built.closure()
        base.step()

    return Prepared(step, built.params)


# -- flatminima ---------------------------------------------------------------------------------


def _build_flatminima(
    method: str, overrides: dict[str, Any], *, learn_first: bool = False
) -> Callable[[Workload, Hooks], Prepared]:
    """``learn_first``: call the per-epoch hook once when building (see below); without it a
    method starts from its initial state (Sparse SAM's Fisher mask all zeros until its first
    refresh, its dynamic mask drawn at the first step, inside what is measured)."""

    def build(workload: Workload, hooks: Hooks) -> Prepared:
        built = setup(workload, hooks)
        base = _sgd(built.params)
        _instrument_base(base, hooks)
        optimizer = METHODS[method].build(base, model=built.model, **overrides)
        # The per-epoch hook a training loop calls (the runner does) before the first epoch,
        # on the workload's batch repeated as often as asked: a method that learns from data
        # outside the step (Sparse SAM's Fisher mask, from 1,024 single examples by default)
        # is timed and measured with what it learnt, not with its initial state. Outside the
        # timed steps; its passes are not counted in the row's.
        if learn_first:
            x, y = workload.build_batch()
            start_epoch(
                optimizer,
                0,
                model=built.model,
                loss_fn=workload.loss,
                batches=lambda: itertools.repeat((x, y)),
            )
        closure = built.closure
        cycle = METHODS[method].cycle(overrides)

        def step() -> None:
            for _ in range(cycle):
                optimizer.step(lambda evaluation: closure(evaluation))

        def method_state() -> list[Tensor]:
            return [
                value
                for entry in optimizer.state.values()
                for value in entry.values()
                if isinstance(value, Tensor)
            ]

        return Prepared(
            step,
            built.params,
            steps_per_call=cycle,
            cost=lambda: optimizer.cost,
            method_state=method_state,
        )

    return build


# -- peers ------------------------------------------------------------------------------------


class _SGDForeachInStep(torch.optim.SGD):
    """SGD that takes its foreach step even when its param groups say ``foreach=None``.

    pytorch_optimizer builds the base optimizer on its own param groups, whose ``foreach``
    entry is pytorch_optimizer's own switch (``None`` by default); plain SGD would read it and
    fall back to its per-tensor loop on CPU. This keeps the peers' base step identical to
    everyone else's without changing how pytorch_optimizer itself runs.
    """

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        saved = [group.get("foreach") for group in self.param_groups]
        for group in self.param_groups:
            group["foreach"] = True
        try:
            return super().step(closure)
        finally:
            for group, value in zip(self.param_groups, saved, strict=True):
                group["foreach"] = value


def _pytorch_optimizer_class(name: str) -> type:
    import pytorch_optimizer

    return getattr(pytorch_optimizer, name)


def _build_pytorch_optimizer(
    name: str, *, cycle: int = 1, **options: Any
) -> Callable[[Workload, Hooks], Prepared]:
    """``cycle``: steps per timed call (LookSAM's k, as for flatminima's rows)."""

    def build(workload: Workload, hooks: Hooks) -> Prepared:
        built = setup(workload, hooks)
        optimizer = _pytorch_optimizer_class(name)(
            built.params, _SGDForeachInStep, **options, **BASE_HYPERPARAMETERS
        )
        _instrument_base(optimizer.base_optimizer, hooks)
        closure = built.closure

        def step() -> None:
            for _ in range(cycle):
                # pytorch_optimizer's contract: gradients at w first, then step(closure).
                closure()
                optimizer.step(closure)

        return Prepared(step, built.params, steps_per_call=cycle)

    return build


def _build_pytorch_optimizer_gsam(workload: Workload, hooks: Hooks) -> Prepared:
    """pytorch_optimizer's GSAM at flatminima's defaults (ρ = 0.05 fixed, α = 0.4): it takes a
    base optimizer instance, the model and a ρ scheduler, and its step runs both passes through
    a closure that returns (outputs, loss)."""
    import pytorch_optimizer

    built = setup(workload, hooks)
    base = _sgd(built.params)
    _instrument_base(base, hooks)
    # ProportionScheduler reads the rate from `.optimizer` when given no torch scheduler; with
    # max_lr = min_lr it returns max_value, a fixed ρ (no scheduler wrapping the base's step).
    lr = BASE_HYPERPARAMETERS["lr"]
    no_scheduler = SimpleNamespace(optimizer=base)
    rho_scheduler = pytorch_optimizer.ProportionScheduler(no_scheduler, lr, lr, 0.05, 0.05)
    optimizer = pytorch_optimizer.GSAM(built.params, base, built.model, rho_scheduler, alpha=0.4)
    closure = torch.enable_grad()(built.closure)  # its step runs under no_grad
    return Prepared(lambda: optimizer.step(lambda: (None, closure())) and None, built.params)


def _build_pytorch_optimizer_wsam(workload: Workload, hooks: Hooks) -> Prepared:
    """pytorch_optimizer's WSAM at its (and flatminima's) defaults: ρ = 0.05, γ = 0.9,
    decoupled; its step runs both passes itself."""
    import pytorch_optimizer

    built = setup(workload, hooks)
    optimizer = pytorch_optimizer.WSAM(
        built.model, built.params, _SGDForeachInStep, rho=0.05, gamma=0.9, **BASE_HYPERPARAMETERS
    )
    _instrument_base(optimizer.base_optimizer, hooks)
    closure = built.closure
    return Prepared(lambda: optimizer.step(closure) and None, built.params)


def _build_naive(workload: Workload, hooks: Hooks) -> Prepared:
    built = setup(workload, hooks)
    base = _sgd(built.params)
    _instrument_base(base, hooks)
    optimizer = NaiveLoopSAM(built.params, base, rho=0.05)
    closure = built.closure

    def step() -> None:
        closure()
        optimizer.first_step()
        closure()
        optimizer.second_step()

    return Prepared(step, built.params)


def _build_naive_tilted(num_samples: int) -> Callable[[Workload, Hooks], Prepared]:
    def build(workload: Workload, hooks: Hooks) -> Prepared:
        built = setup(workload, hooks)
        base = _sgd(built.params)
        _instrument_base(base, hooks)
        hyperparameters = METHODS["tilted-sam"].resolved({"num_samples": num_samples})
        optimizer = NaiveTiltedSAM(built.params, base, **hyperparameters)
        closure = built.closure
        return Prepared(lambda: optimizer.step(closure), built.params)

    return build


def _naive_tilted(num_samples: int) -> Contender:
    return Contender(
        f"naive:tilted-sam:s{num_samples}",
        f"Tilted SAM as released: per-sample gradient clones (s={num_samples})",
        "peer",
        "tilted-sam",
        2 * num_samples,
        _build_naive_tilted(num_samples),
    )


SHOWN_HYPERPARAMETERS = ("k", "beta", "gamma", "micro_batches", "mask", "sparsity")
"""Hyperparameters that change what a step computes, shown in a row's label (by the paper's
symbol) when its method declares them: they decide the row's cost."""


def _configuration_label(spec: Any, overrides: dict[str, Any]) -> str:
    values = spec.resolved(overrides)
    shown = [
        f"{h.symbol if h.symbol != '-' else h.name}={values[h.name]}"
        for h in spec.build_fn.declaration
        if h.name in SHOWN_HYPERPARAMETERS
    ]
    return f" ({', '.join(shown)})" if shown else ""


REFRESH_ONLY_OVERRIDES: dict[str, dict[str, Any]] = {
    "sparse-sam": {"num_samples": 64},
    "fisher-mask-sam": {"num_samples": 64},
}
"""Settings that shape only what a method learns outside the step, never the step's cost: the
Fisher mask from 64 single examples instead of 1,024 (the mask multiplies ε whatever its
ones; 1,024 batch-1 passes would add minutes to every build)."""


def _flatminima_contenders(tilted_samples: int) -> list[Contender]:
    contenders = []
    for name, spec in METHODS.items():
        if spec.build_fn is None:
            continue
        overrides: dict[str, Any] = dict(REFRESH_ONLY_OVERRIDES.get(name, {}))
        label = f"flatminima {spec.build_fn.__name__}"
        key = f"flatminima:{name}"
        if name == "tilted-sam":  # its samples, s, are the benchmark's choice, not a default
            overrides["num_samples"] = tilted_samples
            label += f" (s={tilted_samples})"
            key += f":s{tilted_samples}"
        else:
            label += _configuration_label(spec, overrides)
        contenders.append(
            Contender(
                key=key,
                label=label,
                kind="flatminima",
                method=name,
                passes=spec.mean_passes_per_step(overrides),
                build=_build_flatminima(name, overrides, learn_first=True),
            )
        )
    return contenders


def select(rows: list[Contender], methods: Collection[str] | None) -> list[Contender]:
    """The rows of ``methods`` (flatminima's and the peers implementing them) and the two
    reference rows every ratio needs (the pass alone, the base step); all rows for ``None``."""
    if methods is None:
        return rows
    return [c for c in rows if c.kind in ("passes", "base") or c.method in methods]


def pytorch_optimizer_available() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def contenders(*, peers: bool = True, tilted_samples: int = 3) -> list[Contender]:
    """The rows of one workload's table, in display order."""
    rows = [
        Contender("passes", "forward/backward alone", "passes", "passes", 1, _build_passes),
        Contender("base", "SGD alone (base)", "base", "sgd", 1, _build_base),
        *_flatminima_contenders(tilted_samples),
        Contender("naive:sam", "naive per-parameter loop SAM", "peer", "sam", 2, _build_naive),
        _naive_tilted(tilted_samples),
    ]
    if peers and pytorch_optimizer_available():
        rows += [
            Contender(
                "pytorch_optimizer:sam",
                "pytorch_optimizer SAM (default: per-tensor on CPU)",
                "peer",
                "sam",
                2,
                _build_pytorch_optimizer("SAM", rho=0.05),
            ),
            Contender(
                "pytorch_optimizer:sam-foreach",
                "pytorch_optimizer SAM (foreach=True)",
                "peer",
                "sam",
                2,
                _build_pytorch_optimizer("SAM", rho=0.05, foreach=True),
            ),
            Contender(
                "pytorch_optimizer:friendly-sam",
                "pytorch_optimizer FriendlySAM (default)",
                "peer",
                "friendly-sam",
                2,
                _build_pytorch_optimizer("FriendlySAM", rho=0.2, sigma=1.0, lmbda=0.6),
            ),
            Contender(
                "pytorch_optimizer:gsam",
                "pytorch_optimizer GSAM (foreach, from the base SGD's groups)",
                "peer",
                "gsam",
                2,
                _build_pytorch_optimizer_gsam,
            ),
            Contender(
                "pytorch_optimizer:wsam",
                "pytorch_optimizer WSAM (default: per-tensor on CPU)",
                "peer",
                "wsam",
                2,
                _build_pytorch_optimizer_wsam,
            ),
            # Its step(closure) calls the closure on every step, also between refreshes (at w,
            # where the caller's pass already was): 2 passes per step, and per-tensor maths.
            Contender(
                "pytorch_optimizer:looksam",
                "pytorch_optimizer LookSAM (k=5, alpha=0.2; per tensor)",
                "peer",
                "looksam",
                2,
                _build_pytorch_optimizer("LookSAM", cycle=5, rho=0.1, k=5, alpha=0.2),
            ),
        ]
    return rows


def memory_contenders() -> list[Contender]:
    """The timed rows plus Tilted SAM with more samples: its memory must not grow with s."""
    more_samples = [c for c in _flatminima_contenders(8) if c.method == "tilted-sam"]
    rows = contenders()
    position = max(i for i, c in enumerate(rows) if c.key.startswith("flatminima:tilted")) + 1
    rows = [*rows[:position], *more_samples, *rows[position:]]
    position = max(i for i, c in enumerate(rows) if c.key.startswith("naive:tilted")) + 1
    return [*rows[:position], _naive_tilted(8), *rows[position:]]
