"""Momentum-SAM's properties (spec §10, §19), in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import flatminima
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    make_base,
    run,
    snapshot,
    tiny_mlp,
)

XI = 1e-12


def momentum_of(base: torch.optim.Optimizer, key: str) -> list[torch.Tensor]:
    return [base.state[p][key].clone() for g in base.param_groups for p in g["params"]]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def weights_seen_by_the_pass(optimizer, model, batch) -> list[torch.Tensor]:
    """Runs one step and returns the weights its only pass ran at."""
    seen: list[list[torch.Tensor]] = []
    inner = closure_for(model, batch)

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return inner()

    optimizer.step(closure)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    ("kind", "key"), [("sgd", "momentum_buffer"), ("adamw", "exp_avg")], ids=["sgd", "adamw"]
)
def test_the_pass_runs_at_radius_rho_against_the_momentum(kind, key):
    rho = 0.7
    model = tiny_mlp()
    base = make_base(kind, model.parameters())
    optimizer = flatminima.MomentumSAM(base, rho=rho)
    data = batches(3)
    first = weights_seen_by_the_pass(optimizer, model, data[0])  # no momentum yet: at w
    assert all(torch.equal(a, p) for a, p in zip(first, tiny_mlp().parameters(), strict=True))
    for batch in data[1:]:
        w = flat(model.parameters())
        v = flat(momentum_of(base, key))
        at = flat(weights_seen_by_the_pass(optimizer, model, batch))
        perturbation = at - w
        norm = float(v.norm())
        assert float(perturbation.norm()) == pytest.approx(rho * norm / (norm + XI), rel=1e-12)
        assert float(perturbation.norm()) == pytest.approx(rho, rel=1e-9)
        expected = -rho * v / (v.norm() + XI)
        assert torch.allclose(perturbation, expected, rtol=0, atol=1e-14)


def test_first_step_is_the_base_step_at_w():
    data = batches(1)
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = flatminima.MomentumSAM(make_base("sgd", model.parameters()), rho=3.0)
    first = weights_seen_by_the_pass(optimizer, model, data[0])
    assert all(torch.equal(a, b) for a, b in zip(first, reference.parameters(), strict=True))
    base = make_base("sgd", reference.parameters())
    base.step(closure_for(reference, data[0]))
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_weights_are_back_at_w_and_the_base_steps_from_there():
    """After each step the weights are the base optimizer's step from w with the gradient taken
    at w̃: the same step a bare SGD takes when handed that gradient."""
    data = batches(4)
    model = tiny_mlp()
    optimizer = flatminima.MomentumSAM(make_base("sgd", model.parameters()), rho=0.5)
    twin = copy.deepcopy(model)
    twin_base = make_base("sgd", twin.parameters())
    for batch in data:
        before = [p.detach().clone() for p in model.parameters()]
        at = weights_seen_by_the_pass(optimizer, model, batch)
        with torch.no_grad():
            for p, w in zip(twin.parameters(), at, strict=True):
                p.copy_(w)
        twin_base.zero_grad(set_to_none=True)
        closure_for(twin, batch)()
        with torch.no_grad():
            for p, w in zip(twin.parameters(), before, strict=True):
                p.copy_(w)  # back at w, keeping the gradient from w̃
        twin_base.step()
        assert_bitwise_equal(snapshot(model), snapshot(twin))


def test_norm_is_global_and_rho_is_per_group():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "rho": 0.2}, {"params": model[2].parameters()}],
        lr=0.1,
        momentum=0.9,
    )
    optimizer = flatminima.MomentumSAM(base, rho=0.6)
    data = batches(2)
    run(optimizer, model, data[:1])
    v = momentum_of(base, "momentum_buffer")
    total = float(flat(v).norm())
    w = [p.detach().clone() for p in model.parameters()]
    at = weights_seen_by_the_pass(optimizer, model, data[1])
    first = flat(a - b for a, b in zip(at[:2], w[:2], strict=True))
    second = flat(a - b for a, b in zip(at[2:], w[2:], strict=True))
    assert float(first.norm()) == pytest.approx(0.2 * float(flat(v[:2]).norm()) / total, rel=1e-11)
    assert float(second.norm()) == pytest.approx(0.6 * float(flat(v[2:]).norm()) / total, rel=1e-11)


def test_base_optimizers_without_momentum_are_refused_by_name():
    params = list(tiny_mlp().parameters())
    with pytest.raises(ValueError, match=r"SGD.*momentum"):
        flatminima.MomentumSAM(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(TypeError, match="RMSprop"):
        flatminima.MomentumSAM(torch.optim.RMSprop(params, lr=0.1, momentum=0.9))
    flatminima.MomentumSAM(torch.optim.Adam(params, lr=0.1))  # exp_avg: accepted


def test_a_group_without_momentum_added_later_is_refused_at_the_step():
    model = tiny_mlp()
    optimizer = flatminima.MomentumSAM(torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9))
    optimizer.add_param_group({"params": list(model[2].parameters()), "momentum": 0.0})
    before = snapshot(model)
    with pytest.raises(ValueError, match="momentum"):
        run(optimizer, model, batches(1))
    assert_bitwise_equal(snapshot(model), before)


def test_non_finite_momentum_gives_no_perturbation_and_no_nan():
    model = tiny_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    optimizer = flatminima.MomentumSAM(base, rho=1.0)
    data = batches(2)
    run(optimizer, model, data[:1])
    base.state[model[0].weight]["momentum_buffer"].fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    at = weights_seen_by_the_pass(optimizer, model, data[1])
    assert all(torch.equal(a, b) for a, b in zip(at, before, strict=True))


def test_a_parameter_without_gradient_this_step_is_restored():
    model = tiny_mlp()
    optimizer = flatminima.MomentumSAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=1.0
    )
    x, y = batches(1)[0]
    run(optimizer, model, [(x, y)])  # every parameter gets a buffer
    branch = model[2]
    before = {n: t.detach().clone() for n, t in branch.named_parameters()}

    def closure():
        hidden = model[1](model[0](x))
        loss = torch.nn.functional.cross_entropy(hidden[:, :3], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    for name, value in branch.named_parameters():
        assert torch.equal(value, before[name]), name  # moved to w̃, back, and not stepped


def test_the_one_pass_updates_batchnorm_statistics_every_step():
    model = tiny_mlp(batchnorm=True)
    optimizer = flatminima.MomentumSAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model
    )
    data = batches(3)
    for step, batch in enumerate(data, start=1):
        mean_before = model[1].running_mean.clone()
        run(optimizer, model, [batch])
        assert int(model[1].num_batches_tracked) == step
        assert not torch.equal(model[1].running_mean, mean_before)


def test_an_abandoned_perturbed_pass_restores_the_weights():
    model = tiny_mlp()
    optimizer = flatminima.MomentumSAM(make_base("sgd", model.parameters()), rho=1.0)
    data = batches(2)
    run(optimizer, model, data[:1])
    before = snapshot(model)
    x, y = data[1]
    for evaluation in optimizer.evaluations():
        assert evaluation.point == "perturbed"
        assert not torch.equal(model[0].weight, before["0.weight"])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        break
    assert_bitwise_equal(snapshot(model), before)


def test_a_run_config_without_momentum_is_refused_up_front():
    pytest.importorskip("numpy")  # the runner is the experiments extra (the fresh-venv check)
    from flatminima.experiments.config import ConfigError, make_run_config

    with pytest.raises(ConfigError, match="momentum"):
        make_run_config(dataset="digits", model="mlp", method="momentum-sam", momentum=0.0)
    for optimizer, momentum in (("sgd", 0.9), ("adamw", None)):
        config = make_run_config(
            dataset="digits",
            model="mlp",
            method="momentum-sam",
            optimizer=optimizer,
            momentum=momentum,
        )
        assert config.hyperparameters == {"rho": 3.0}
