"""The shared conformance suite: every method × {SGD with momentum, AdamW} × foreach on/off.

Everything a method claims about itself comes from its record in ``records.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from records import RECORDS, MethodRecord
from support import (
    BATCH_SIZE,
    assert_bitwise_equal,
    batches,
    closure_for,
    closure_of,
    make_base,
    manual_pass,
    max_abs_difference,
    prepared,
    run,
    run_base,
    snapshot,
    tiny_mlp,
)

BASES = ["sgd", "adamw"]
STEPS = 4

by_record = pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
by_base = pytest.mark.parametrize("base", BASES)
by_foreach = pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])


def build(record: MethodRecord, model, base: str, foreach: bool = True, **overrides):
    hyperparameters = {**record.typical, **overrides}
    optimizer = record.cls(
        make_base(base, model.parameters()),
        model=model,
        foreach=foreach,
        **hyperparameters,
        **record.extras(),
    )
    return prepared(record, optimizer, model)


@by_record
@by_base
@by_foreach
def test_identity_setting_is_bitwise_the_base_optimizer(record, base, foreach):
    data = batches(STEPS)
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    run(
        build(record, model, base, foreach, **record.identity),
        model,
        data,
        per_example=record.needs_per_example_closure,
    )
    run_base(make_base(base, reference.parameters()), reference, data)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


@by_record
@by_base
def test_closure_is_called_the_declared_number_of_times(record, base):
    model = tiny_mlp()
    for name, hyperparameters in record.configurations.items():
        optimizer = build(record, model, base, **hyperparameters)
        for step, batch in enumerate(batches(6)):
            calls: list[int] = []
            optimizer.step(
                closure_for(model, batch, calls, per_example=record.needs_per_example_closure)
            )
            expected = record.passes(hyperparameters, step)
            assert len(calls) == expected, (name, step)
            assert record.cls.passes_per_step(hyperparameters, step) == expected, (name, step)


@by_record
@by_base
def test_foreach_and_per_tensor_loop_agree(record, base):
    data = batches(STEPS)
    results = []
    for foreach in (True, False):
        model = tiny_mlp()
        torch.manual_seed(7)
        optimizer = build(record, model, base, foreach)
        run(optimizer, model, data, per_example=record.needs_per_example_closure)
        state = {
            f"{i}.{key}": value
            for i, p in enumerate(model.parameters())
            for key, value in optimizer.state[p].items()
        }
        results.append((snapshot(model), state))
    (params_a, state_a), (params_b, state_b) = results
    assert max_abs_difference(params_a, params_b) < 1e-13
    assert state_a.keys() == state_b.keys()
    if state_a:
        assert max_abs_difference(state_a, state_b) < 1e-13


@by_record
@by_base
def test_state_dict_round_trip_continues_bitwise(record, base):
    data = batches(2 * STEPS)
    model = tiny_mlp()
    optimizer = build(record, model, base)
    run(optimizer, model, data[:STEPS], per_example=record.needs_per_example_closure)
    saved_weights = snapshot(model)
    saved_state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(11)
    run(optimizer, model, data[STEPS:], per_example=record.needs_per_example_closure)
    expected = snapshot(model)

    resumed_model = tiny_mlp(seed=99)  # different initial weights, overwritten by the load
    resumed_model.load_state_dict(saved_weights)
    resumed = build(record, resumed_model, base, rho=123.0)  # hyperparameters come from the file
    resumed.load_state_dict(saved_state)
    torch.manual_seed(11)
    run(resumed, resumed_model, data[STEPS:], per_example=record.needs_per_example_closure)
    assert_bitwise_equal(snapshot(resumed_model), expected)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["rho"] == record.typical["rho"]


@by_record
@by_base
def test_state_dict_holds_base_state_and_only_persistent_method_state(record, base):
    model = tiny_mlp()
    optimizer = build(record, model, base)
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    saved = optimizer.state_dict()
    base_state = saved["base_optimizer"]["state"]
    assert len(base_state) == len(list(model.parameters()))
    momentum_keys = {"momentum_buffer"} if base == "sgd" else {"exp_avg", "exp_avg_sq"}
    assert all(momentum_keys <= set(entry) for entry in base_state.values())
    for entry in saved["state"].values():
        assert set(entry) == set(record.persistent_state)
    if not record.persistent_state:
        assert saved["state"] == {}


@by_record
def test_lr_zero_leaves_weights_untouched(record):
    model = tiny_mlp()
    before = snapshot(model)
    optimizer = record.cls(
        torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), model=model, **record.typical
    )
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    assert_bitwise_equal(snapshot(model), before)


@by_record
@by_foreach
def test_exception_in_any_pass_restores_the_weights(record, foreach):
    passes = record.passes(record.typical, 0)
    for failing_pass in range(passes):
        model = tiny_mlp()
        optimizer = build(record, model, "sgd", foreach)
        before = snapshot(model)
        calls: list[int] = []
        per_example = record.needs_per_example_closure
        inner = closure_for(model, batches(1)[0], calls, per_example=per_example)

        def failing(*evaluation, inner=inner, calls=calls, failing_pass=failing_pass):
            if len(calls) == failing_pass:
                raise RuntimeError("boom")
            return inner(*evaluation)

        # A closure that takes the evaluation only when the record's closures do.
        closure = failing if per_example else lambda failing=failing: failing()
        with pytest.raises(RuntimeError, match="boom"):
            optimizer.step(closure)
        assert_bitwise_equal(snapshot(model), before)
        # The optimizer is usable again afterwards.
        optimizer.step(closure_for(model, batches(1)[0], per_example=per_example))


@by_record
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_are_kept(record, dtype):
    model = tiny_mlp(dtype=dtype)
    optimizer = build(record, model, "sgd")
    run(optimizer, model, batches(2, dtype=dtype), per_example=record.needs_per_example_closure)
    assert all(p.dtype == dtype for p in model.parameters())
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor):  # ESAM's flags are Python bools
                assert value.dtype == (torch.uint8 if key in record.packed_state else dtype), key


@by_record
@by_foreach
def test_zero_gradient_gives_no_nan_and_degenerates_to_the_base_step(record, foreach):
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    optimizer = build(record, model, "sgd", foreach)

    def zero_loss_closure_for(net, per_example):
        def zero_losses(rows):
            count = BATCH_SIZE if rows is None else len(rows)
            return 0.0 * sum(p.sum() for p in net.parameters()) + torch.zeros(count)

        return closure_of(zero_losses, BATCH_SIZE, per_example=per_example)

    for _ in range(3):
        optimizer.step(zero_loss_closure_for(model, record.needs_per_example_closure))
    base = make_base("sgd", reference.parameters())
    for _ in range(3):
        base.zero_grad()
        base.step(zero_loss_closure_for(reference, False))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_bitwise_equal(snapshot(model), snapshot(reference))


@by_record
def test_non_finite_gradient_gives_no_nan_in_the_perturbation(record):
    model = tiny_mlp()
    optimizer = build(record, model, "sgd", rho=record.typical["rho"])
    optimizer.base_optimizer.param_groups[0]["lr"] = 0.0
    before = snapshot(model)
    calls: list[int] = []
    seen: list[dict[str, torch.Tensor]] = []

    def losses(rows):
        seen.append(snapshot(model))
        count = BATCH_SIZE if rows is None else len(rows)
        weight = model[0].weight
        loss = (weight * float("inf")).sum() if len(calls) == 1 else weight.sum()
        return loss + torch.zeros(count)

    per_example = record.needs_per_example_closure
    optimizer.step(closure_of(losses, BATCH_SIZE, per_example=per_example, calls=calls))
    for weights in seen:  # no pass ran at a NaN point
        assert all(torch.isfinite(value).all() for value in weights.values())
    if not record.descends_with_first_pass_gradient:
        # (otherwise the infinite gradient is part of the update, as for the base alone)
        assert_bitwise_equal(snapshot(model), before)


@by_record
def test_scheduler_on_the_wrapper_moves_the_base_learning_rate(record):
    model = tiny_mlp()
    optimizer = build(record, model, "sgd")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    run(optimizer, model, batches(1), per_example=record.needs_per_example_closure)
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@by_record
def test_bad_hyperparameters_raise_naming_the_argument(record):
    model = tiny_mlp()
    for kwargs, name in record.invalid:
        with pytest.raises(ValueError, match=name):
            record.cls(make_base("sgd", model.parameters()), **{**record.typical, **kwargs})
    with pytest.raises(ValueError, match="rho"):
        build(record, model, "sgd").add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "rho": -1.0}
        )


@by_record
def test_missing_closure_is_a_clear_error(record):
    optimizer = build(record, tiny_mlp(), "sgd")
    with pytest.raises(TypeError, match="closure"):
        optimizer.step()


@by_record
def test_base_optimizer_must_be_an_instance(record):
    model = tiny_mlp()
    with pytest.raises(TypeError, match="base_optimizer"):
        record.cls(torch.optim.SGD, **record.typical)
    with pytest.raises(TypeError, match="base_optimizer"):
        record.cls(list(model.parameters()), **record.typical)


@by_record
def test_running_statistics_are_those_of_one_pass(record):
    """With ``model=``, BatchNorm buffers after a step equal those right after the step's
    first pass (for SAM and kin, the clean pass); ``num_batches_tracked`` included (P14)."""
    model = tiny_mlp(batchnorm=True)
    model[1].momentum = None  # cumulative average: wrong under the momentum=0 trick
    optimizer = build(record, model, "sgd")
    x, y = batches(1)[0]
    after_first_pass = None
    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            manual_pass(model, (x, y), evaluation, per_example=record.needs_per_example_closure)
            if after_first_pass is None:
                after_first_pass = {n: b.clone() for n, b in model.named_buffers()}
    assert after_first_pass is not None
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, after_first_pass[name]), name
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize(
    "record", [r for r in RECORDS if r.passes(r.typical, 0) >= 2], ids=lambda r: r.id
)
def test_parameter_without_gradient_on_a_later_pass_is_restored(record):
    """A branch used on the first pass only (stochastic depth, MoE routing) must not stay at
    w + ε (PITFALLS P2)."""
    model = tiny_mlp()
    optimizer = record.cls(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, **record.typical
    )
    branch = model[2]  # the last Linear
    before = {n: t.clone() for n, t in branch.named_parameters()}
    x, y = batches(1)[0]
    calls: list[int] = []

    def losses(rows):
        inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
        hidden = model[1](model[0](inputs))
        out = model[2](hidden) if len(calls) == 1 else hidden[:, :3]
        return torch.nn.functional.cross_entropy(out, targets, reduction="none")

    per_example = record.needs_per_example_closure
    optimizer.step(closure_of(losses, len(y), per_example=per_example, calls=calls))
    for name, value in branch.named_parameters():
        # The branch had no gradient in the perturbed pass, so the base step skips it.
        assert torch.equal(value, before[name]), name


@by_record
def test_per_group_hyperparameters_and_added_groups(record):
    model = tiny_mlp()
    first, second = model[0], model[2]
    base = torch.optim.SGD([{"params": first.parameters(), "rho": 0.0}], lr=0.1, momentum=0.9)
    optimizer = record.cls(base, model=model, **record.typical)
    assert base.param_groups[0]["rho"] == 0.0  # a value already in the group wins
    optimizer.add_param_group({"params": list(second.parameters())})
    assert len(base.param_groups) == 2
    assert base.param_groups[1]["rho"] == record.typical["rho"]
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@by_record
def test_manual_forms_match_the_closure_form(record):
    data = batches(3)
    closure_model = tiny_mlp()
    torch.manual_seed(3)
    run(
        build(record, closure_model, "sgd"),
        closure_model,
        data,
        per_example=record.needs_per_example_closure,
    )

    manual_model = tiny_mlp()
    optimizer = build(record, manual_model, "sgd")
    torch.manual_seed(3)
    for x, y in data:
        with optimizer.evaluations() as evaluations:
            for evaluation in evaluations:
                per_example = record.needs_per_example_closure
                manual_pass(manual_model, (x, y), evaluation, per_example=per_example)
    assert_bitwise_equal(snapshot(manual_model), snapshot(closure_model))

    assert record.cls.manual_two_pass == record.manual_two_pass
    if record.manual_two_pass:
        two_step_model = tiny_mlp()
        optimizer = build(record, two_step_model, "sgd")
        for x, y in data:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(two_step_model(x), y).backward()
            optimizer.first_step()
            torch.nn.functional.cross_entropy(two_step_model(x), y).backward()
            optimizer.second_step()
        assert_bitwise_equal(snapshot(two_step_model), snapshot(closure_model))
    else:
        with pytest.raises(TypeError, match="passes per step"):
            build(record, tiny_mlp(), "sgd").first_step()
