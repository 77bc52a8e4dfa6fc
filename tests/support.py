"""Small models, data and loops shared by the optimizer tests."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flatminima import Evaluation

Batch = tuple[torch.Tensor, torch.Tensor]


def tiny_mlp(
    *, dtype: torch.dtype = torch.float64, seed: int = 0, batchnorm: bool = False
) -> nn.Module:
    """A 4 → 6 → 3 network; with ``batchnorm`` a BatchNorm1d sits after the first layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(dtype)


BATCH_SIZE = 16
"""Examples per batch of :func:`batches` unless told otherwise."""


def batches(
    count: int, *, dtype: torch.dtype = torch.float64, seed: int = 1, size: int = BATCH_SIZE
) -> list[Batch]:
    """``count`` classification batches of ``size`` examples, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 4, generator=generator, dtype=dtype),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def make_base(kind: str, params: Any, lr: float = 0.1) -> torch.optim.Optimizer:
    """The two base optimizers the conformance suite runs every method over."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr * 0.1, weight_decay=1e-2)
    raise ValueError(kind)


def closure_for(
    model: nn.Module, batch: Batch, calls: list[int] | None = None, *, per_example: bool = False
) -> Callable[..., torch.Tensor]:
    """Forward + backward on ``batch``; counts its calls in ``calls`` when given.

    With ``per_example`` the closure takes the evaluation and returns per-example losses
    (:func:`evaluation_pass`), the form data-aware methods need and every method accepts.
    """
    x, y = batch
    if per_example:

        def per_example_closure(evaluation: Evaluation) -> torch.Tensor:
            if calls is not None:
                calls.append(1)
            return evaluation_pass(model, batch, evaluation)

        return per_example_closure

    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def evaluation_pass(model: nn.Module, batch: Batch, evaluation: Evaluation) -> torch.Tensor:
    """What a closure that takes the evaluation does: the rows it asks for, their per-example
    losses, a backward on their mean when it needs a gradient."""
    return per_example_pass(
        lambda rows: F.cross_entropy(
            model(batch[0] if rows is None else batch[0][rows]),
            batch[1] if rows is None else batch[1][rows],
            reduction="none",
        ),
        len(batch[1]),
        evaluation,
    )


def per_example_pass(
    losses_of: Callable[[torch.Tensor | None], torch.Tensor],
    batch_size: int,
    evaluation: Evaluation,
) -> torch.Tensor:
    """``losses_of(rows)`` (per-example losses of those rows, ``None``: all) for the rows the
    evaluation asks for, with a backward on their mean when it needs a gradient."""
    losses = losses_of(evaluation.examples_for(batch_size))
    if evaluation.needs_gradient:
        losses.mean().backward()
    return losses


def closure_of(
    losses_of: Callable[[torch.Tensor | None], torch.Tensor],
    batch_size: int,
    *,
    per_example: bool,
    calls: list[int] | None = None,
) -> Callable[..., torch.Tensor]:
    """A closure over any per-example loss: taking the evaluation and returning the losses
    (``per_example``), or plain, returning their mean."""
    if per_example:

        def per_example_closure(evaluation: Evaluation) -> torch.Tensor:
            if calls is not None:
                calls.append(1)
            return per_example_pass(losses_of, batch_size, evaluation)

        return per_example_closure

    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        loss = losses_of(None).mean()
        loss.backward()
        return loss

    return closure


def manual_pass(
    model: nn.Module, batch: Batch, evaluation: Evaluation, *, per_example: bool = False
) -> None:
    """One pass of the manual form (``evaluations()``), reported to the evaluation."""
    if per_example:
        evaluation.report(evaluation_pass(model, batch, evaluation))
        return
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    evaluation.report(loss)


def run(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    data: list[Batch],
    *,
    per_example: bool = False,
) -> list[float]:
    """One closure step per batch; the losses the optimizer returned."""
    return [
        float(optimizer.step(closure_for(model, batch, per_example=per_example)).detach())
        for batch in data
    ]


def run_base(optimizer: torch.optim.Optimizer, model: nn.Module, data: list[Batch]) -> None:
    """The bare base optimizer on the same batches (it does not zero gradients itself)."""
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        optimizer.step(closure_for(model, batch))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), (
            f"{name} differs: max {(a[name] - b[name]).abs().max()}"
        )


def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest elementwise difference; values that are not tensors (flags) must be equal
    (infinity otherwise)."""

    def difference(x: Any, y: Any) -> float:
        if isinstance(x, torch.Tensor):
            return float((x.double() - y.double()).abs().max())
        return 0.0 if x == y else float("inf")

    return max(difference(a[n], b[n]) for n in a)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# -- memory of one method, in parameter copies (GSAM and WSAM, issue 9) ---------------------------


def parameter_copies_held(
    method: str, hyperparameters: dict[str, Any], steps: int = 3, *, hidden: tuple[int, ...] = (64,)
):
    """What a registered method holds during and between its steps, in copies of the model's
    parameters, measured by the benchmarks' allocation tracker (exact on CPU) on an MLP
    32 → ``hidden`` → 10 with tanh between layers (by default 2.8 k parameters: large enough
    that the 0-d tensors of norms are < 1 % of a copy)."""
    from benchmarks.contenders import Contender, _build_flatminima
    from benchmarks.memory import measure
    from benchmarks.workloads import Workload

    def build_model() -> nn.Module:
        torch.manual_seed(0)
        widths = [32, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], 10))

    def build_batch() -> Batch:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(16, 32, generator=generator), torch.randint(
            0, 10, (16,), generator=generator
        )

    workload = Workload("memory-probe", "", build_model, build_batch, F.cross_entropy)
    contender = Contender(
        method, method, "flatminima", method, 2, _build_flatminima(method, hyperparameters)
    )
    return measure(contender, workload, steps=steps)


def compiled_step_matches_eager(cls: type, hyperparameters: dict[str, Any], steps: int = 6) -> None:
    """``torch.compile`` of ``cls``'s step keeps one graph after its first steps (a factor that
    changes every step must stay a traced tensor) and follows the eager optimizer."""
    torch._dynamo.reset()
    data = batches(steps)
    eager_model, compiled_model = tiny_mlp(), tiny_mlp()
    eager = cls(make_base("sgd", eager_model.parameters()), **hyperparameters)
    compiled = cls(make_base("sgd", compiled_model.parameters()), **hyperparameters)
    step = torch.compile(compiled.step, backend="aot_eager")
    for index, batch in enumerate(data):
        eager.step(closure_for(eager_model, batch))
        if index == 2:  # the first steps compile the graph and its one-time variants
            torch._dynamo.config.error_on_recompile = True
        try:
            step(closure_for(compiled_model, batch))
        finally:
            torch._dynamo.config.error_on_recompile = False
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def prepared(record: Any, optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """``optimizer`` after its record's ``prepare`` (what a training loop does before the
    first step, e.g. learning Sparse SAM's mask) on two fixed batches of the model's dtype."""
    if record.prepare is not None:
        dtype = next(model.parameters()).dtype
        record.prepare(optimizer, model, batches(2, dtype=dtype, seed=3))
    return optimizer
