"""Every method follows its plain reference loop (``loops.py``) step by step, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from loops import FriendlyState, ReferenceSGD, gsam_step

import flatminima
from records import RECORDS, MethodRecord
from support import batches, closure_for, tiny_mlp

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
STEPS = 6
TOLERANCE = 1e-12


def grad_fn_for(model: torch.nn.Module, batch):
    """Weights → (loss, grads) of ``model`` on ``batch`` (or on its rows ``examples``), without
    touching its parameters; ``grad_fn.losses(weights)`` gives the per-example losses and
    ``grad_fn.batch_size`` the number of examples (for the data-aware reference loops)."""
    names = [name for name, _ in model.named_parameters()]
    x, y = batch

    def grad_fn(weights, examples=None):
        rows = slice(None) if examples is None else examples
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x[rows],))
        loss = torch.nn.functional.cross_entropy(out, y[rows])
        grads = torch.autograd.grad(loss, leaves)
        return float(loss.detach()), [g.detach() for g in grads]

    def losses(weights):
        with torch.no_grad():
            parameters = dict(zip(names, weights, strict=True))
            out = torch.func.functional_call(model, parameters, (x,))
            return torch.nn.functional.cross_entropy(out, y, reduction="none")

    grad_fn.losses = losses  # type: ignore[attr-defined]
    grad_fn.batch_size = len(y)  # type: ignore[attr-defined]
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
        per_example=record.needs_per_example_closure,
    )


def deviation_from(
    cls, hyperparameters, make_reference, *, foreach=True, extras=None, per_example=False
) -> float:
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

        optimizer.step(closure_for(model, (x, y), per_example=True) if per_example else closure)
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


# -- GSAM and WSAM (issue 9) --------------------------------------------------------------------


def test_clipping_bites_in_the_wsam_lockstep_configurations():
    """max_norm = 0.2 clips every batch at the start (‖g‖ from 0.29 to 0.57), or the clipped
    configurations would test nothing."""
    model = tiny_mlp()
    for batch in batches(STEPS):
        _, g = grad_fn_for(model, batch)([p.detach() for p in model.parameters()])
        assert sum(float((gi * gi).sum()) for gi in g) ** 0.5 > 0.2


SCHEDULE = [0.1, 0.08, 0.05, 0.03, 0.01, 0.0]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"rho": 0.2, "alpha": 0.4, "rho_min": 0.05},
        {"rho": 0.2, "alpha": 0.4, "rho_min": 0.05, "lr_min": 0.01},
        {"rho": 0.5, "alpha": 0.6, "rho_min": 0.1, "adaptive": True},
    ],
    ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()),
)
def test_gsam_radius_follows_the_learning_rate_in_lockstep(hyperparameters, foreach):
    """The group's learning rate changes every step (as a scheduler would change it); ρ_t
    follows it in both, with lr_max the learning rate at construction."""
    model = tiny_mlp()
    optimizer = flatminima.GSAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        foreach=foreach,
        **hyperparameters,
    )
    reference_base = ReferenceSGD(LR, MOMENTUM, WEIGHT_DECAY)
    weights = [p.detach().clone() for p in model.parameters()]
    worst = 0.0
    for lr, (x, y) in zip(SCHEDULE, batches(len(SCHEDULE)), strict=True):
        optimizer.param_groups[0]["lr"] = lr
        reference_base.lr = lr
        weights = gsam_step(
            weights, grad_fn_for(model, (x, y)), reference_base, lr_max=LR, **hyperparameters
        )

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        worst = max(
            worst,
            max(
                float((p.detach() - w).abs().max())
                for p, w in zip(model.parameters(), weights, strict=True)
            ),
        )
    assert worst < TOLERANCE
