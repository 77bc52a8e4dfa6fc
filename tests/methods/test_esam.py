"""ESAM's properties (spec §12, §17 row 16, §19), in float64 on a tiny MLP and a quadratic."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import flatminima
from flatminima import neighborhoods
from flatminima.methods.esam import WEIGHT_PERTURBED, sharpness_sensitive_examples
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    max_abs_difference,
    run,
    snapshot,
    tiny_mlp,
)


def esam(model, *, seed=4, lr=0.1, **hyperparameters):
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return flatminima.ESAM(
        base, model=model, generator=torch.Generator().manual_seed(seed), **hyperparameters
    )


def authors_selection(rise: torch.Tensor, gamma: float) -> torch.Tensor:
    """dydjw9/Efficient_SAM ``utils/Esam.py``, the selection as written there (a boolean
    mask of ``instance_sharpness > cutoff``), as indices."""
    if gamma >= 0.99:
        return torch.arange(len(rise))
    position = int(len(rise) * gamma)
    cutoff, _ = torch.topk(rise, position)
    cutoff = cutoff[-1]
    return (rise > cutoff).nonzero().squeeze(1)


def logging_closure(model, batch, log):
    """The per-example closure, recording what each pass was asked and which tensors took a
    gradient in it."""
    x, y = batch

    def closure(evaluation):
        rows = evaluation.examples_for(len(y))
        log.append(
            {
                "point": evaluation.point,
                "rows": None if rows is None else rows.tolist(),
                "needs_gradient": evaluation.needs_gradient,
                "requires_grad": [p.requires_grad for p in model.parameters()],
                "weights": [p.detach().clone() for p in model.parameters()],
            }
        )
        inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
        losses = F.cross_entropy(model(inputs), targets, reduction="none")
        if evaluation.needs_gradient:
            losses.mean().backward()
        log[-1]["losses"] = losses.detach()
        return losses

    return closure


# -- β = γ = 1 is SAM (row 16) --------------------------------------------------------------------


def test_beta_and_gamma_one_is_sam_with_the_authors_stabiliser(monkeypatch):
    """Bit for bit SAM's parameters once SAM uses ESAM's ξ = 1e-7; with ``model=`` even the
    BatchNorm statistics agree (only the clean pass updates them; in the authors' code the
    probe updates them too)."""
    data = batches(5)
    model = tiny_mlp(batchnorm=True)
    reference = copy.deepcopy(model)
    run(esam(model, rho=0.1, beta=1.0, gamma=1.0), model, data, per_example=True)
    monkeypatch.setattr(neighborhoods, "GRADIENT_NORM_EPSILON", neighborhoods.ESAM_NORM_EPSILON)
    sam = flatminima.SAM(
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        rho=0.1,
        model=reference,
    )
    run(sam, reference, data, per_example=True)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_beta_and_gamma_one_differs_from_sam_only_by_the_stabiliser():
    data = batches(5)
    model, reference = tiny_mlp(), tiny_mlp()
    run(esam(model, rho=0.1, beta=1.0, gamma=1.0), model, data, per_example=True)
    run(
        flatminima.SAM(
            torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            rho=0.1,
        ),
        reference,
        data,
    )
    difference = max_abs_difference(snapshot(model), snapshot(reference))
    assert 0.0 < difference < 1e-7


def test_the_probe_runs_even_when_the_whole_batch_is_kept():
    """As in the authors' code: at γ ≥ 0.99 the forward-only probe still runs (its result is
    unused), so the step is three closure calls and costs 1 + 1/3 full passes more than SGD."""
    model = tiny_mlp()
    log: list = []
    optimizer = esam(model, rho=0.1, beta=1.0, gamma=0.99)
    optimizer.step(logging_closure(model, batches(1)[0], log))
    assert [(e["point"], e["rows"], e["needs_gradient"]) for e in log] == [
        ("start", None, True),
        ("perturbed", None, False),
        ("perturbed", None, True),
    ]
    assert (optimizer.cost.forward, optimizer.cost.backward) == (3.0, 2.0)


# -- sharpness-sensitive data selection ---------------------------------------------------------


SELECTION_CASES = [
    (size, gamma)
    for size in (7, 16, 33, 128)
    for gamma in (0.1, 0.25, 0.5, 0.6, 0.9, 0.98)
    if int(size * gamma) >= 2  # k ≤ 1: the code selects nothing or crashes (tested below)
]


@pytest.mark.parametrize(("size", "gamma"), SELECTION_CASES)
def test_selection_is_the_authors_rule(size, gamma):
    generator = torch.Generator().manual_seed(size)
    rise = torch.randn(size, generator=generator, dtype=torch.float64)
    k = int(size * gamma)
    chosen = sharpness_sensitive_examples(rise, gamma)
    assert chosen is not None
    assert torch.equal(chosen, authors_selection(rise, gamma))
    assert len(chosen) == k - 1  # strict: one fewer than ⌊γB⌋ without ties
    assert set(chosen.tolist()) == set(rise.topk(k - 1).indices.tolist())


def test_the_whole_batch_from_gamma_099():
    rise = torch.randn(16, dtype=torch.float64)
    assert sharpness_sensitive_examples(rise, 0.99) is None
    assert sharpness_sensitive_examples(rise, 1.0) is None
    assert sharpness_sensitive_examples(rise, 0.98) is not None


def test_where_the_authors_code_breaks_the_selection_stays_defined():
    rise = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    # γ·B < 1: the code's topk(…, 0)[-1] fails; here k = 1 and the largest rise is kept.
    assert sharpness_sensitive_examples(rise, 0.2).tolist() == [2]
    # k = 1 without ties: the code keeps nothing (a NaN loss); here the largest rise.
    assert len(authors_selection(rise, 0.25)) == 0
    assert sharpness_sensitive_examples(rise, 0.25).tolist() == [2]
    # Every rise tied (ρ = 0): the code selects nothing (a NaN loss); here the whole batch.
    assert sharpness_sensitive_examples(torch.zeros(8, dtype=torch.float64), 0.5) is None
    # Ties at the cutoff with others above it: the strict rule, as the code.
    tied = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    assert sharpness_sensitive_examples(tied, 0.5).tolist() == [0, 5]
    assert torch.equal(sharpness_sensitive_examples(tied, 0.5), authors_selection(tied, 0.5))
    # Only the top candidates tied: those equal to the cutoff.
    top_tied = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    assert sharpness_sensitive_examples(top_tied, 0.5).tolist() == [0, 1, 2, 5]


def test_a_step_uses_the_examples_whose_loss_rose_most():
    """On the real passes: the rise of each example between the clean pass and the probe,
    the authors' rule on it, and the subset the perturbed gradient is computed on."""
    model = tiny_mlp()
    optimizer = esam(model, rho=0.3, beta=1.0, gamma=0.5)
    for batch in batches(4):
        log: list = []
        optimizer.step(logging_closure(model, batch, log))
        clean, probe, last = log
        rise = probe["losses"] - clean["losses"]
        assert last["rows"] == authors_selection(rise, 0.5).tolist()
        assert len(last["rows"]) == 7
        for a, b in zip(probe["weights"], last["weights"], strict=True):
            assert torch.equal(a, b)  # both at w + ε


def test_the_closure_must_return_per_example_losses():
    model = tiny_mlp()
    optimizer = esam(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="per-example losses"):
        optimizer.step(closure_for(model, batches(1)[0]))
    assert_bitwise_equal(snapshot(model), before)
    assert all(p.requires_grad for p in model.parameters())


# -- stochastic weight perturbation -------------------------------------------------------------


def test_the_first_step_perturbs_every_tensor_with_radius_rho_over_beta():
    model = tiny_mlp()
    rho, beta = 0.2, 0.5
    optimizer = esam(model, rho=rho, beta=beta, gamma=1.0)
    log: list = []
    optimizer.step(logging_closure(model, batches(1)[0], log))
    clean, probe, _ = log
    assert clean["requires_grad"] == [True] * 4
    eps = [b - a for a, b in zip(clean["weights"], probe["weights"], strict=True)]
    assert all(bool(e.abs().max() > 0) for e in eps)
    norm = sum(float(e.square().sum()) for e in eps) ** 0.5
    assert norm == pytest.approx(rho / beta, rel=1e-6)  # ‖g‖/(‖g‖ + 1e-7), ‖g‖ ~ 1


def test_the_subset_is_drawn_one_step_late_from_the_generator():
    """Step t perturbs the tensors the draws at the end of step t − 1 kept: one uniform per
    tensor with a gradient, in parameter order, kept when ≤ β. The others take no weight
    gradient in the clean pass and are not moved, and every tensor is trainable again after
    the pass."""
    model = tiny_mlp()
    beta = 0.5
    optimizer = esam(model, rho=0.2, beta=beta, gamma=1.0, seed=4)
    draws = torch.Generator().manual_seed(4)
    expected = [True] * 4
    seen_partial = False
    for batch in batches(8):
        log: list = []
        optimizer.step(logging_closure(model, batch, log))
        clean, probe, _ = log
        assert clean["requires_grad"] == expected
        moved = [
            not torch.equal(a, b) for a, b in zip(clean["weights"], probe["weights"], strict=True)
        ]
        assert moved == expected
        assert probe["requires_grad"] == [True] * 4
        seen_partial = seen_partial or (any(expected) and not all(expected))
        kept = [float(u) <= beta for u in torch.rand(4, generator=draws, dtype=torch.float64)]
        assert [optimizer.state[p][WEIGHT_PERTURBED] for p in model.parameters()] == kept
        expected = kept if any(kept) else [True] * 4
    assert seen_partial
    assert all(p.requires_grad for p in model.parameters())


def test_epsilon_of_the_kept_tensors_is_rescaled_by_one_over_beta():
    """ε = ρ·g_S/(‖g_S‖ + 1e-7)/β on the kept tensors S (the norm over S only), 0 elsewhere."""
    model = tiny_mlp()
    rho, beta = 0.2, 0.25
    optimizer = esam(model, rho=rho, beta=beta, gamma=1.0)
    kept = [True, False, False, True]
    for p, keep in zip(model.parameters(), kept, strict=True):
        optimizer.state[p][WEIGHT_PERTURBED] = keep
    x, y = batches(1)[0]
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    g = [p.grad if keep else None for p, keep in zip(reference.parameters(), kept, strict=True)]
    norm = sum(float(gi.square().sum()) for gi in g if gi is not None) ** 0.5
    log: list = []
    optimizer.step(logging_closure(model, (x, y), log))
    clean, probe, _ = log
    for a, b, gi in zip(clean["weights"], probe["weights"], g, strict=True):
        expected = torch.zeros_like(a) if gi is None else gi * (rho / (norm + 1e-7) / beta)
        torch.testing.assert_close(b - a, expected, rtol=1e-12, atol=1e-15)


def test_a_draw_that_keeps_no_tensor_perturbs_them_all():
    """The authors' code crashes there (the next backward has nothing to differentiate)."""
    model = tiny_mlp()
    optimizer = esam(model, rho=0.2, beta=0.5, gamma=1.0)
    for p in model.parameters():
        optimizer.state[p][WEIGHT_PERTURBED] = False
    log: list = []
    optimizer.step(logging_closure(model, batches(1)[0], log))
    assert log[0]["requires_grad"] == [True] * 4
    assert all(
        not torch.equal(a, b) for a, b in zip(log[0]["weights"], log[1]["weights"], strict=True)
    )


def test_a_failing_clean_pass_leaves_every_tensor_trainable_and_the_flags_unchanged():
    model = tiny_mlp()
    optimizer = esam(model)
    kept = [False, True, True, False]
    for p, keep in zip(model.parameters(), kept, strict=True):
        optimizer.state[p][WEIGHT_PERTURBED] = keep
    seen = []

    def failing(evaluation):
        seen.append([p.requires_grad for p in model.parameters()])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        optimizer.step(failing)
    assert seen == [kept]
    assert all(p.requires_grad for p in model.parameters())
    assert [optimizer.state[p][WEIGHT_PERTURBED] for p in model.parameters()] == kept


def test_a_frozen_parameter_stays_frozen_and_unperturbed():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    before = model[0].bias.detach().clone()
    optimizer = esam(model, rho=0.2, beta=0.5, gamma=0.5)
    run(optimizer, model, batches(6), per_example=True)
    assert not model[0].bias.requires_grad
    assert torch.equal(model[0].bias, before)
    assert WEIGHT_PERTURBED not in optimizer.state[model[0].bias]


# -- compute ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [(16, (2.4375, 1.4375)), (1000, (2.499, 1.499))])
def test_compute_at_beta_and_gamma_one_half(size, expected):
    """A full forward and backward, a full forward, and the k − 1 examples (k = γB) forward and
    backward: (2.5 F + 1.5 B) per step for a large batch, 11/6 ≈ 1.83 SGD steps in passes
    (a backward counted as two forwards); the weight gradients SWP skips are not credited."""
    model = tiny_mlp()
    optimizer = esam(model, rho=0.05, beta=0.5, gamma=0.5)
    run(optimizer, model, batches(1, size=size), per_example=True)
    assert (optimizer.cost.forward, optimizer.cost.backward) == pytest.approx(expected)
    assert optimizer.cost.passes == pytest.approx((expected[0] + 2 * expected[1]) / 3)
