"""Micro-batch SAM's properties (spec §13, §17 row 15) and the micro-batch requests it makes
of the engine, in float64 on a tiny MLP."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import flatminima
from flatminima.step import MicroBatch
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    make_base,
    max_abs_difference,
    run,
    run_base,
    snapshot,
    tiny_mlp,
)


def msam(model, **hyperparameters):
    return flatminima.MicroBatchSAM(
        make_base("sgd", model.parameters()), model=model, **hyperparameters
    )


def logging_closure(model, batch, log):
    x, y = batch

    def closure(evaluation):
        rows = evaluation.examples_for(len(y))
        log.append((evaluation.point, None if rows is None else rows.tolist()))
        inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    return closure


# -- the micro-batches ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "count"), [(16, 4), (16, 3), (7, 7), (10, 1), (5, 2)])
def test_micro_batches_partition_the_batch_as_tensor_split(size, count):
    rows = [MicroBatch(k, count).rows(size) for k in range(count)]
    if count == 1:
        assert rows == [None]
        return
    expected = torch.tensor_split(torch.arange(size), count)
    assert [r.tolist() for r in rows] == [e.tolist() for e in expected]


def test_more_micro_batches_than_examples_is_a_clear_error():
    model = tiny_mlp()
    optimizer = msam(model, micro_batches=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="micro_batches must be at most the batch size"):
        optimizer.step(closure_for(model, batches(1, size=4)[0], per_example=True))
    assert_bitwise_equal(snapshot(model), before)


def test_a_closure_reading_examples_of_a_micro_batch_request_is_told_what_to_call():
    model = tiny_mlp()
    optimizer = msam(model, micro_batches=2)
    x, y = batches(1)[0]

    def closure(evaluation):
        rows = evaluation.examples  # cannot be known without the batch size
        return F.cross_entropy(model(x[rows]), y[rows])

    with pytest.raises(ValueError, match=r"evaluation.examples_for\(batch_size\)"):
        optimizer.step(closure)


def test_a_closure_without_argument_serves_one_micro_batch_only():
    model = tiny_mlp()
    msam(model, micro_batches=1).step(closure_for(model, batches(1)[0]))
    with pytest.raises(ValueError, match="the closure must take the evaluation"):
        msam(model, micro_batches=2).step(closure_for(model, batches(1)[0]))


def test_each_micro_batch_runs_a_clean_then_a_perturbed_pass_on_its_rows():
    model = tiny_mlp()
    optimizer = msam(model, rho=0.1, micro_batches=3)
    log: list = []
    optimizer.step(logging_closure(model, batches(1)[0], log))
    parts = [list(range(0, 6)), list(range(6, 11)), list(range(11, 16))]
    assert log == [(point, part) for part in parts for point in ("start", "perturbed")]
    assert (optimizer.cost.forward, optimizer.cost.backward) == pytest.approx((2.0, 2.0))


# -- limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_example", [False, True])
def test_one_micro_batch_is_sam_bit_for_bit(per_example):
    data = batches(5)
    model, reference = tiny_mlp(batchnorm=True), tiny_mlp(batchnorm=True)
    run(msam(model, rho=0.1, micro_batches=1), model, data, per_example=per_example)
    sam = flatminima.SAM(make_base("sgd", reference.parameters()), rho=0.1, model=reference)
    run(sam, reference, data, per_example=per_example)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_rho_zero_is_the_base_optimizer_on_the_batch_gradient(count):
    """Micro-batches weighted by their size: with uneven ones (16 = 6 + 5 + 5) the plain mean
    of the micro-batch gradients would not be the batch gradient."""
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    run(msam(model, rho=0.0, micro_batches=count), model, data, per_example=True)
    run_base(make_base("sgd", reference.parameters()), reference, data)
    assert max_abs_difference(snapshot(model), snapshot(reference)) < 1e-15


def test_unweighted_mean_of_uneven_micro_batches_would_differ():
    """The weighting matters here: Σ_k h_k / M ≠ Σ_k (n_k/B) h_k for 16 = 6 + 5 + 5."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    parts = torch.tensor_split(torch.arange(16), 3)
    grads = []
    for rows in parts:
        model.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        grads.append(model[0].weight.grad.clone())
    weighted = sum(len(r) / 16 * g for r, g in zip(parts, grads, strict=True))
    unweighted = sum(grads) / 3
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(weighted, model[0].weight.grad, rtol=1e-12, atol=1e-15)
    assert float((unweighted - weighted).abs().max()) > 1e-6


def test_each_micro_batch_gets_its_own_perturbation():
    """The update is Σ_k (n_k/B)·∇L_k(w + ε_k), ε_k = ρ g_k/‖g_k‖, built by hand from SAM
    steps on each micro-batch (SGD without momentum is linear in the gradient)."""
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    x, y = batches(1)[0]
    optimizer = flatminima.MicroBatchSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2, micro_batches=4
    )
    optimizer.step(closure_for(model, (x, y), per_example=True))
    helper = flatminima.SAM(torch.optim.SGD(reference.parameters(), lr=0.1), rho=0.2)
    update = [torch.zeros_like(p) for p in reference.parameters()]
    for rows in torch.tensor_split(torch.arange(16), 4):
        helper.zero_grad()
        F.cross_entropy(reference(x[rows]), y[rows]).backward()
        helper.first_step()
        F.cross_entropy(reference(x[rows]), y[rows]).backward()
        update = [u + p.grad / 4 for u, p in zip(update, reference.parameters(), strict=True)]
        helper.abort_step()
    with torch.no_grad():
        for p, u in zip(reference.parameters(), update, strict=True):
            p.sub_(0.1 * u)
    assert max_abs_difference(snapshot(model), snapshot(reference)) < 1e-15


def test_the_step_returns_the_batch_loss_at_w():
    model = tiny_mlp()
    x, y = batches(1)[0]
    expected = float(F.cross_entropy(model(x), y).detach())
    returned = msam(model, rho=0.1, micro_batches=3).step(
        closure_for(model, (x, y), per_example=True)
    )
    assert float(returned) == pytest.approx(expected, rel=1e-14)


def test_batchnorm_statistics_are_those_of_the_first_micro_batch():
    model = tiny_mlp(batchnorm=True)
    probe = copy.deepcopy(model)
    x, y = batches(1)[0]
    msam(model, rho=0.1, micro_batches=4).step(closure_for(model, (x, y), per_example=True))
    probe(x[:4])  # one train-mode forward on the first micro-batch, at w
    for (name, buffer), expected in zip(model[1].named_buffers(), probe[1].buffers(), strict=True):
        assert torch.equal(buffer, expected), name
