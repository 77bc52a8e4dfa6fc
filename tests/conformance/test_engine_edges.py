"""Engine behaviour at the edges: group sharing, re-wrapping, abandoned steps, half precision,
AMP, sparse gradients, non-finite gradients. Method-generic where it can be (records)."""

from __future__ import annotations

import copy

import pytest
import torch

import flatminima
from records import RECORDS
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    closure_of,
    make_base,
    manual_pass,
    per_example_pass,
    run,
    snapshot,
    tiny_mlp,
)

by_record = pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)


@pytest.mark.parametrize(
    "record", [r for r in RECORDS if r.perturbs_along_a_pass_gradient], ids=lambda r: r.id
)
def test_non_finite_start_gradient_gives_epsilon_zero(record):
    """Whatever the start point, a non-finite gradient there must not move the weights on to a
    perturbed point (ε = 0), and nothing may become NaN."""
    model = tiny_mlp()
    optimizer = record.cls(
        torch.optim.SGD(model.parameters(), lr=0.0), model=model, **record.typical
    )
    x, y = batches(1)[0]
    at_start, at_perturbed = None, None

    def overflowing(rows):
        return (model[0].weight * float("inf")).sum() + torch.zeros(len(x[rows]))

    def finite(rows):
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")

    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            if evaluation.point == "start":
                at_start = [p.detach().clone() for p in model.parameters()]
                losses_of = overflowing
            else:
                at_perturbed = [p.detach().clone() for p in model.parameters()]
                losses_of = finite
            if record.needs_per_example_closure:
                losses = per_example_pass(
                    lambda rows, losses_of=losses_of: losses_of(_all(rows)), len(y), evaluation
                )
            else:
                losses = losses_of(slice(None)).mean()
                losses.backward()
            evaluation.report(losses.detach().clamp(max=1e30))
    for a, b in zip(at_start, at_perturbed, strict=True):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


def _all(rows):
    """Row indices as an index: ``None`` (every row) becomes ``slice(None)``."""
    return slice(None) if rows is None else rows


@pytest.mark.parametrize("record", [r for r in RECORDS if r.starts_at_weights], ids=lambda r: r.id)
def test_returned_loss_is_that_of_the_start_pass(record):
    """(Multi-pass methods return their own objective: tested in tests/methods.)"""
    model = tiny_mlp()
    x, y = batches(1)[0]
    expected = float(torch.nn.functional.cross_entropy(model(x), y).detach())
    optimizer = record.cls(
        make_base("sgd", model.parameters()), **record.typical, **record.extras()
    )
    per_example = record.needs_per_example_closure
    returned = float(optimizer.step(closure_for(model, (x, y), per_example=per_example)).detach())
    if per_example:  # assembled from per-example or per-micro-batch losses: rounding differs
        assert returned == pytest.approx(expected, rel=1e-13)
    else:
        assert returned == expected


def test_friendly_sam_survives_a_non_finite_gradient():
    model = tiny_mlp()
    optimizer = flatminima.FriendlySAM(torch.optim.SGD(model.parameters(), lr=0.0))
    run(optimizer, model, batches(1))
    ema_before = {p: v["friendly_sam_gradient_ema"].clone() for p, v in optimizer.state.items()}

    def overflowing():
        loss = (model[0].weight * float("inf")).sum()
        loss.backward()
        return loss

    optimizer.zero_grad()
    overflowing()
    optimizer.first_step()
    optimizer.abort_step()  # what an AMP loop does after an overflow
    for p, value in ema_before.items():
        assert torch.equal(optimizer.state[p]["friendly_sam_gradient_ema"], value)
    x, y = batches(2)[1]
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.first_step()
    moved = sum(
        float((p - b).square().sum()) for p, b in zip(model.parameters(), before, strict=True)
    )
    optimizer.abort_step()
    assert moved**0.5 == pytest.approx(optimizer.param_groups[0]["rho"], rel=1e-9)


def test_groups_stay_shared_after_the_base_optimizer_loads_a_plain_checkpoint():
    model = tiny_mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_state = plain.state_dict()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = flatminima.SAM(base, rho=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    base.load_state_dict(plain_state)  # new group dicts, without "rho"
    assert optimizer.param_groups is base.param_groups
    run(optimizer, model, batches(1))
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert base.param_groups[0]["rho"] == 0.2


def test_group_added_to_the_base_optimizer_directly_gets_the_method_defaults():
    model = tiny_mlp()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    optimizer = flatminima.ASAM(base, rho=0.3, eta=0.0)
    base.add_param_group({"params": list(model[2].parameters()), "rho": 0.1})
    run(optimizer, model, batches(1))
    assert base.param_groups[1]["rho"] == 0.1  # set by the user
    assert base.param_groups[1]["eta"] == 0.0  # the wrapper's value


def test_wrapping_the_same_base_again_takes_the_new_values_and_keeps_the_users():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "rho": 0.01}, {"params": model[2].parameters()}], lr=0.1
    )
    flatminima.SAM(base, rho=0.05)
    assert [g["rho"] for g in base.param_groups] == [0.01, 0.05]
    flatminima.SAM(base, rho=0.5)
    assert [g["rho"] for g in base.param_groups] == [0.01, 0.5]
    flatminima.ASAM(base)
    assert [g["rho"] for g in base.param_groups] == [0.01, 0.5]


@pytest.mark.parametrize(
    "record", [r for r in RECORDS if r.passes(r.typical, 0) >= 2], ids=lambda r: r.id
)
def test_an_abandoned_iteration_restores_the_weights_at_once(record):
    model = tiny_mlp()
    optimizer = record.cls(make_base("sgd", model.parameters()), **record.typical)
    before = snapshot(model)
    x, y = batches(1)[0]
    for evaluation in optimizer.evaluations():
        manual_pass(model, (x, y), evaluation, per_example=record.needs_per_example_closure)
        if evaluation.point == "perturbed":
            break
    assert_bitwise_equal(snapshot(model), before)
    run(optimizer, model, batches(1), per_example=record.needs_per_example_closure)  # a new step


def test_a_new_step_is_refused_while_an_unfinished_one_is_held():
    model = tiny_mlp()
    optimizer = flatminima.SAM(make_base("sgd", model.parameters()))
    x, y = batches(1)[0]
    held = optimizer.evaluations()
    iterator = iter(held)
    next(iterator)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    next(iterator)  # the weights are now perturbed
    with pytest.raises(RuntimeError, match="unfinished"):
        run(optimizer, model, batches(1))
    held.__exit__(None, None, None)
    run(optimizer, model, batches(1))


def test_multi_pass_methods_refuse_the_two_pass_manual_form():
    for num_samples in (1, 3):
        optimizer = flatminima.TiltedSAM(
            make_base("sgd", tiny_mlp().parameters()), num_samples=num_samples
        )
        with pytest.raises(TypeError, match="evaluations"):
            optimizer.first_step()


def test_tilted_sam_generator_is_checkpointed():
    data = batches(6)

    def build(model):
        return flatminima.TiltedSAM(
            make_base("sgd", model.parameters()),
            radius=0.05,
            generator=torch.Generator().manual_seed(3),
        )

    model = tiny_mlp()
    optimizer = build(model)
    run(optimizer, model, data[:3])
    weights, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    run(optimizer, model, data[3:])
    resumed_model = tiny_mlp()
    resumed_model.load_state_dict(weights)
    resumed = build(resumed_model)
    resumed.load_state_dict(state)
    run(resumed, resumed_model, data[3:])
    assert_bitwise_equal(snapshot(resumed_model), snapshot(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@by_record
def test_foreach_and_loop_agree_in_half_precision(record, dtype):
    results = []
    for foreach in (True, False):
        model = tiny_mlp(dtype=dtype)
        torch.manual_seed(2)
        optimizer = record.cls(
            make_base("sgd", model.parameters()), foreach=foreach, **record.typical
        )
        data = [(x, y) for x, y in batches(2, dtype=dtype)]
        run(optimizer, model, data, per_example=record.needs_per_example_closure)
        results.append(snapshot(model))
    assert_bitwise_equal(*results)


@by_record
def test_sparse_gradients_are_refused_clearly_and_the_weights_kept(record):
    embedding = torch.nn.Embedding(10, 3, sparse=True).double()
    optimizer = record.cls(
        torch.optim.SGD(embedding.parameters(), lr=0.1, momentum=0.9), **record.typical
    )
    before = snapshot(embedding)
    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    closure = closure_of(
        lambda rows: embedding(tokens if rows is None else tokens[rows]).sum(1),
        len(tokens),
        per_example=record.needs_per_example_closure,
    )
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step(closure)
    assert_bitwise_equal(snapshot(embedding), before)


def test_amp_recipe_from_the_readme_matches_unscaled_training():
    """PITFALLS P12: the second-pass gradient must be unscaled too, or the update is ×scale."""
    data = batches(3, dtype=torch.float32)
    reference_model = tiny_mlp(dtype=torch.float32)
    model = copy.deepcopy(reference_model)
    run(
        flatminima.SAM(torch.optim.SGD(reference_model.parameters(), lr=0.1), rho=0.1),
        reference_model,
        data,
    )

    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in data:
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(optimizer)
        optimizer.first_step()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(optimizer.base_optimizer)
        if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            optimizer.second_step()
        else:
            optimizer.abort_step()
        scaler.update()
    # Scaling by a power of two and back is exact.
    assert_bitwise_equal(snapshot(model), snapshot(reference_model))
