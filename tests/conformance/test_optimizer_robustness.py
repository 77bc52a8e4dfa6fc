"""Nothing silent: what an adversarial pass over the optimizers found (issue 15, items 1–7).

Each test reproduces a failure seen before the fix, for every method where it applies.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch

import flatminima
from flatminima import kernels
from records import RECORDS
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    make_base,
    prepared,
    run,
    snapshot,
    tiny_mlp,
)

by_record = pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)


def build(record, model, **overrides):
    optimizer = record.cls(
        make_base("sgd", model.parameters()),
        model=model,
        **{**record.typical, **overrides},
        **record.extras(),
    )
    return prepared(record, optimizer, model)


# -- 1. copies ------------------------------------------------------------------------------


def _copy_by_pickle(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


def _copy_by_torch_save(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@by_record
@pytest.mark.parametrize("how", [copy.deepcopy, _copy_by_pickle, _copy_by_torch_save])
def test_a_copy_steps_like_the_original_and_shares_nothing(record, how):
    model = tiny_mlp()
    optimizer = build(record, model)
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    # Copy the model and the optimizer together, as one object graph, so that the copy's
    # optimizer steps the copy's parameters.
    pair = how((model, optimizer)) if how is not _copy_by_torch_save else None
    if pair is None:
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        pair = torch.load(buffer, weights_only=False)
    model_copy, optimizer_copy = pair
    assert repr(optimizer_copy) == repr(optimizer)
    assert optimizer_copy.param_groups is optimizer_copy.base_optimizer.param_groups
    assert optimizer_copy.param_groups[0]["params"][0] is next(model_copy.parameters())
    data = batches(4)[2:]
    torch.manual_seed(3)
    run(optimizer, model, data, per_example=record.needs_per_example_closure)
    torch.manual_seed(3)
    run(optimizer_copy, model_copy, data, per_example=record.needs_per_example_closure)
    assert_bitwise_equal(snapshot(model_copy), snapshot(model))
    original = {id(t) for t in model.parameters()}
    assert not original & {id(t) for t in model_copy.parameters()}


def test_copying_in_the_middle_of_a_step_is_refused():
    model = tiny_mlp()
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer.zero_grad()
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="middle of a step"):
        copy.deepcopy(optimizer)
    optimizer.abort_step()
    copy.deepcopy(optimizer)


# -- 2. maximize ----------------------------------------------------------------------------


@by_record
def test_maximize_is_refused_at_construction_and_when_set_later(record):
    model = tiny_mlp()
    with pytest.raises(ValueError, match="maximize=True"):
        record.cls(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True),
            **record.typical,
        )
    optimizer = build(record, model)
    optimizer.param_groups[0]["maximize"] = True
    before = snapshot(model)
    with pytest.raises(ValueError, match="maximize=True"):
        optimizer.step(closure_for(model, batches(1)[0]))
    assert_bitwise_equal(snapshot(model), before)


# -- 3. norms that overflow ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("foreach", [True, False])
def test_a_finite_vector_has_a_finite_norm(dtype, foreach):
    big = 1e19 if dtype != torch.float64 else 1e200
    tensors = [torch.full((10,), big, dtype=dtype), torch.ones(3, dtype=dtype)]
    exact = math.sqrt(10) * float(tensors[0][0])  # the three ones are below the rounding

    assert kernels.global_norm(tensors, foreach=foreach) == pytest.approx(exact, rel=1e-6)
    assert math.isinf(kernels.global_norm([torch.tensor([math.inf, 1.0])], foreach=foreach))
    assert math.isnan(kernels.global_norm([torch.tensor([math.nan, 1.0])], foreach=foreach))


def test_sam_keeps_its_radius_for_a_huge_float32_gradient():
    """‖g‖ ≈ 3e19 made Σg² infinite: the guard fired and SAM silently became SGD."""
    weight = torch.nn.Parameter(torch.ones(10))
    optimizer = flatminima.SAM(torch.optim.SGD([weight], lr=0.0), rho=0.05)
    optimizer.zero_grad()
    (weight * 1e19).sum().backward()
    optimizer.first_step()
    moved = float((weight.detach() - 1.0).norm())
    optimizer.abort_step()
    assert moved == pytest.approx(0.05, rel=1e-5)


# -- 4. another method's checkpoint ---------------------------------------------------------


def test_another_methods_checkpoint_is_refused_naming_both():
    model = tiny_mlp()
    asam = flatminima.ASAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    run(asam, model, batches(1))
    saved = asam.state_dict()
    sam = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    with pytest.raises(ValueError, match="ASAM's, not SAM's"):
        sam.load_state_dict(saved)
    assert sam.param_groups[0]["rho"] == 0.05
    sam.load_state_dict(saved, base_optimizer_only=True)
    assert sam.param_groups[0]["rho"] == 0.05  # the method's own hyperparameters are kept
    assert "eta" not in sam.param_groups[0]
    momentum = sam.base_optimizer.state[next(model.parameters())]["momentum_buffer"]
    expected = asam.base_optimizer.state[next(model.parameters())]["momentum_buffer"]
    assert torch.equal(momentum, expected)


def test_friendly_sams_state_is_not_carried_into_sam():
    model = tiny_mlp()
    friendly = flatminima.FriendlySAM(torch.optim.SGD(model.parameters(), lr=0.1))
    run(friendly, model, batches(2))
    sam = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="FriendlySAM's, not SAM's"):
        sam.load_state_dict(friendly.state_dict())
    sam.load_state_dict(friendly.state_dict(), base_optimizer_only=True)
    assert all(not sam.state[p] for p in model.parameters())


def test_a_checkpoint_without_a_method_name_is_judged_by_its_hyperparameters():
    model = tiny_mlp()
    asam = flatminima.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    saved = asam.state_dict()
    del saved["method"]  # as saved before checkpoints named their method
    with pytest.raises(ValueError, match=r"hyperparameters \['eta', 'rho'\], not SAM's"):
        flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1)).load_state_dict(saved)
    asam_again = flatminima.ASAM(torch.optim.SGD(model.parameters(), lr=0.1))
    asam_again.load_state_dict(saved)
    assert asam_again.param_groups[0]["rho"] == 0.5


# -- 5. hyperparameters edited after construction --------------------------------------------


@by_record
def test_a_group_edited_to_a_bad_value_is_refused_at_the_next_step(record):
    for kwargs, message in record.invalid:
        model = tiny_mlp()
        optimizer = build(record, model)
        run(optimizer, model, batches(1), per_example=record.needs_per_example_closure)
        before = snapshot(model)
        optimizer.param_groups[0].update(kwargs)
        with pytest.raises(ValueError, match=message):
            optimizer.step(closure_for(model, batches(2)[1]))
        assert_bitwise_equal(snapshot(model), before)


def test_tilted_sam_num_samples_edited_to_zero_or_a_fraction_is_refused():
    model = tiny_mlp()
    optimizer = flatminima.TiltedSAM(torch.optim.SGD(model.parameters(), lr=0.1))
    for bad in (0, 2.5):
        optimizer.param_groups[0]["num_samples"] = bad
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            optimizer.step(closure_for(model, batches(1)[0]))


def test_a_step_level_hyperparameter_edited_in_one_group_only_is_refused():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1
    )
    optimizer = flatminima.TiltedSAM(base)
    optimizer.param_groups[1]["tilt"] = 5.0
    with pytest.raises(ValueError, match="tilt shapes the whole TiltedSAM step"):
        optimizer.step(closure_for(model, batches(1)[0]))


# -- 6. a huge tilt --------------------------------------------------------------------------


def test_tilted_sam_with_a_huge_finite_tilt_stays_finite():
    model = tiny_mlp()
    optimizer = flatminima.TiltedSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), tilt=1e308, num_samples=3, radius=0.05
    )
    for batch in batches(2):
        loss = optimizer.step(closure_for(model, batch))
        assert math.isfinite(float(loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 7. clear errors ----------------------------------------------------------------------------


@by_record
def test_complex_parameters_are_refused_clearly(record):
    weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters"):
        record.cls(torch.optim.SGD([weight], lr=0.1, momentum=0.9), **record.typical)


def test_a_loss_that_is_neither_a_scalar_nor_per_example_is_a_clear_error():
    """A 1-D tensor is read as per-example losses (their mean is the pass's loss); anything
    else that is not one number is refused, the weights left as they were."""
    model = tiny_mlp()
    optimizer = flatminima.TiltedSAM(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    before = snapshot(model)

    def closure():
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses.reshape(4, -1)

    with pytest.raises(ValueError, match="must be a scalar"):
        optimizer.step(closure)
    assert_bitwise_equal(snapshot(model), before)


def test_per_example_losses_count_as_their_mean():
    model, reference = tiny_mlp(), tiny_mlp()
    x, y = batches(1)[0]
    losses_seen = []
    for net, per_example in ((model, True), (reference, False)):
        optimizer = flatminima.TiltedSAM(
            torch.optim.SGD(net.parameters(), lr=0.1), generator=torch.Generator().manual_seed(0)
        )

        def closure(net=net, per_example=per_example):
            losses = torch.nn.functional.cross_entropy(net(x), y, reduction="none")
            losses.mean().backward()
            return losses if per_example else losses.mean()

        losses_seen.append(float(optimizer.step(closure)))
    assert losses_seen[0] == pytest.approx(losses_seen[1], rel=1e-15)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


@by_record
@pytest.mark.parametrize("scalar", [np.float32, np.float64, np.float16])
def test_numpy_scalars_are_accepted_as_hyperparameters(record, scalar):
    model = tiny_mlp()

    def as_numpy(value):
        if isinstance(value, float):
            return scalar(value)
        return np.int64(value) if isinstance(value, int) else value  # strings stay

    hyperparameters = {name: as_numpy(value) for name, value in record.typical.items()}
    optimizer = record.cls(make_base("sgd", model.parameters()), **hyperparameters)
    run(optimizer, model, batches(1), per_example=record.needs_per_example_closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
