"""Every method follows its plain reference loop (``loops.py``) step by step, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from loops import FriendlyState, ReferenceSGD

import flatminima
from records import RECORDS, MethodRecord
from support import batches, tiny_mlp

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
STEPS = 6
TOLERANCE = 1e-12


def grad_fn_for(model: torch.nn.Module, batch):
    """Weights → (loss, grads) of ``model`` on ``batch``, without touching its parameters."""
    names = [name for name, _ in model.named_parameters()]
    x, y = batch

    def grad_fn(weights):
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
        grads = torch.autograd.grad(loss, leaves)
        return float(loss.detach()), [g.detach() for g in grads]

    return grad_fn


CASES = [
    pytest.param(record, name, id=f"{record.id}-{name}")
    for record in RECORDS
    if record.reference is not None
    for name in record.lockstep
]


def lockstep_deviation(record: MethodRecord, configuration: str, foreach: bool = True) -> float:
    """Runs the optimizer and its reference side by side; the largest weight difference."""
    return deviation_from(
        record.cls,
        record.configurations[configuration],
        record.reference,  # type: ignore[arg-type]
        foreach=foreach,
        extras=record.extras(),
    )


def deviation_from(cls, hyperparameters, make_reference, *, foreach=True, extras=None) -> float:
    model = tiny_mlp()
    optimizer = cls(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        foreach=foreach,
        **hyperparameters,
        **(extras or {}),
    )
    reference_step = make_reference()
    reference_base = ReferenceSGD(LR, MOMENTUM, WEIGHT_DECAY)
    weights = [p.detach().clone() for p in model.parameters()]
    worst = 0.0
    for x, y in batches(STEPS):
        grad_fn = grad_fn_for(model, (x, y))
        weights = reference_step(weights, grad_fn, reference_base, **hyperparameters)

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        step_deviation = max(
            float((p.detach() - w).abs().max())
            for p, w in zip(model.parameters(), weights, strict=True)
        )
        worst = max(worst, step_deviation)
    return worst


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(("record", "configuration"), CASES)
def test_method_follows_its_reference_loop(record, configuration, foreach):
    deviation = lockstep_deviation(record, configuration, foreach)
    assert deviation < TOLERANCE, f"{record.id} drifted {deviation:.2e} from its reference"


def test_every_method_has_a_reference_loop():
    assert all(record.reference is not None for record in RECORDS)


def test_friendly_sam_does_not_follow_the_ema_of_the_debiased_gradient():
    """The popular port feeds the EMA with g − σm (PITFALLS P10); the authors' code, and ours,
    with the raw g. The lockstep above would not catch a port that agreed with itself, so
    check that the two rules really produce different weights here."""

    def port_step(weights, grad_fn, base, state, *, rho, sigma, lmbda):
        _, g = grad_fn(weights)
        if state.m is None:
            state.m, d = [gi.clone() for gi in g], [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, state.m, strict=True)]
            state.m = [lmbda * mi + (1 - lmbda) * di for mi, di in zip(state.m, d, strict=True)]
        n = sum(float((di * di).sum()) for di in d) ** 0.5
        eps = [rho * di / (n + 1e-12) for di in d]
        _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
        return base.step(weights, g_tilde)

    deviation = deviation_from(
        flatminima.FriendlySAM,
        {"rho": 0.1, "sigma": 1.0, "lmbda": 0.6},
        lambda: functools.partial(port_step, state=FriendlyState()),
    )
    assert deviation > 1e-6
