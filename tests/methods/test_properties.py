"""The spec's properties (ALGORITHMS.md §17), in float64 on problems with known gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import flatminima
from flatminima.combiners import TiltedAverage
from records import RECORDS
from support import (
    assert_bitwise_equal,
    batches,
    make_base,
    max_abs_difference,
    run,
    snapshot,
    tiny_mlp,
)

XI = 1e-12


def quadratic_problem(seed: int = 0, sizes=(3, 5)):
    """Parameters in two tensors and the loss ½ wᵀAw + bᵀw over their concatenation."""
    generator = torch.Generator().manual_seed(seed)
    dim = sum(sizes)
    q = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = q @ q.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    params = [
        torch.randn(size, generator=generator, dtype=torch.float64, requires_grad=True)
        for size in sizes
    ]

    def loss_fn(scale: float = 1.0):
        w = torch.cat(params)
        return scale * (0.5 * w @ a @ w + b @ w)

    return params, a, b, loss_fn


def capture(optimizer, params, loss_fn, **loss_kwargs):
    """(g, ε, g̃) of one manual two-pass step: the gradient at w, the perturbation, and the
    gradient at w + ε that the base optimizer received."""
    optimizer.zero_grad()
    loss_fn(**loss_kwargs).backward()
    g = torch.cat([p.grad.detach().clone() for p in params])
    before = torch.cat([p.detach().clone() for p in params])
    optimizer.first_step()
    eps = torch.cat([p.detach().clone() for p in params]) - before
    loss_fn(**loss_kwargs).backward()
    optimizer.second_step()
    g_tilde = torch.cat([p.grad.detach().clone() for p in params])
    return g, eps, g_tilde


def frozen(params):
    return torch.optim.SGD(params, lr=0.0)


# -- SAM (row 2) ----------------------------------------------------------------------------


def test_sam_perturbation_has_radius_rho_along_g_and_perturbed_gradient_is_exact():
    params, a, b, loss_fn = quadratic_problem()
    rho = 0.3
    w = torch.cat([p.detach().clone() for p in params])
    g, eps, g_tilde = capture(flatminima.SAM(frozen(params), rho=rho), params, loss_fn)
    norm = g.norm()
    assert float(eps.norm()) == pytest.approx(rho * float(norm / (norm + XI)), rel=1e-12)
    assert float(torch.dot(eps, g) / (eps.norm() * g.norm())) == pytest.approx(1.0, abs=1e-12)
    expected = a @ (w + rho * g / (norm + XI)) + b
    assert torch.allclose(g_tilde, expected, rtol=1e-12, atol=1e-12)


def test_sam_norm_is_global_and_rho_is_per_group():
    params, _, _, loss_fn = quadratic_problem()
    base = torch.optim.SGD([{"params": [params[0]], "rho": 0.1}, {"params": [params[1]]}], lr=0.0)
    optimizer = flatminima.SAM(base, rho=0.4)
    g, eps, _ = capture(optimizer, params, loss_fn)
    unit = g / g.norm()
    assert torch.allclose(eps[:3], 0.1 * unit[:3], atol=1e-14)
    assert torch.allclose(eps[3:], 0.4 * unit[3:], atol=1e-14)


# -- ASAM (rows 4, 5) -------------------------------------------------------------------------


def relu_net_and_rescaled(seed: int = 0):
    """A 1-hidden-layer ReLU network and a copy rescaled per hidden unit (same function)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).double()
    scaled = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).double()
    scaled.load_state_dict(net.state_dict())
    factors = torch.tensor([0.5, 2.0, 3.0, 0.25, 1.5], dtype=torch.float64)
    with torch.no_grad():
        scaled[0].weight.mul_(factors[:, None])
        scaled[0].bias.mul_(factors)
        scaled[2].weight.div_(factors[None, :])
    scaling = [
        factors[:, None].expand(5, 4),
        factors,
        1 / factors[None, :].expand(3, 5),
        torch.ones(3, dtype=torch.float64),
    ]
    return net, scaled, scaling


def perturbation_of(cls, net, x, y, **hyperparameters):
    optimizer = cls(frozen(net.parameters()), **hyperparameters)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.first_step()
    eps = [p.detach() - b for p, b in zip(net.parameters(), before, strict=True)]
    perturbed_loss = float(torch.nn.functional.cross_entropy(net(x), y).detach())
    optimizer.abort_step()
    return eps, perturbed_loss


def test_asam_with_eta_zero_is_invariant_to_relu_rescaling_and_sam_is_not():
    net, scaled, scaling = relu_net_and_rescaled()
    x, y = batches(1)[0]
    eps, loss = perturbation_of(flatminima.ASAM, net, x, y, rho=0.5, eta=0.0)
    eps_scaled, loss_scaled = perturbation_of(flatminima.ASAM, scaled, x, y, rho=0.5, eta=0.0)
    for e, e_scaled, a in zip(eps, eps_scaled, scaling, strict=True):
        assert torch.allclose(e_scaled, a * e, rtol=1e-12, atol=1e-14)
    assert loss_scaled == pytest.approx(loss, rel=1e-12)

    sam, _ = perturbation_of(flatminima.SAM, net, x, y, rho=0.5)
    sam_scaled, _ = perturbation_of(flatminima.SAM, scaled, x, y, rho=0.5)
    error = max(
        float((s - a * e).abs().max()) for s, e, a in zip(sam_scaled, sam, scaling, strict=True)
    )
    assert error > 1e-3


def test_asam_metric_radius_and_constant_scale_is_sam():
    params, _, _, loss_fn = quadratic_problem()
    rho, eta = 0.3, 0.05
    w = torch.cat([p.detach().clone() for p in params])
    g, eps, _ = capture(flatminima.ASAM(frozen(params), rho=rho, eta=eta), params, loss_fn)
    t = w.abs() + eta
    assert float((eps / t).norm()) == pytest.approx(rho, rel=1e-12)

    c = 0.7
    with torch.no_grad():
        for p in params:
            p.copy_(c * torch.sign(p))
    g, eps, _ = capture(flatminima.ASAM(frozen(params), rho=rho, eta=0.0), params, loss_fn)
    assert torch.allclose(eps, c * rho * g / g.norm(), rtol=1e-12, atol=1e-15)


# -- Fisher SAM (row 6) -----------------------------------------------------------------------


def test_fisher_sam_metric_radius_and_euclidean_bound():
    params, _, _, loss_fn = quadratic_problem()
    rho, eta = 0.2, 0.7
    g, eps, _ = capture(flatminima.FisherSAM(frozen(params), rho=rho, eta=eta), params, loss_fn)
    fisher = 1 + eta * g * g
    assert float(eps @ (fisher * eps)) == pytest.approx(rho**2, rel=1e-11)
    assert float(eps.norm()) < rho
    u = g / fisher
    assert torch.allclose(eps, rho * u / torch.sqrt(g @ u), rtol=1e-11, atol=1e-15)


def test_fisher_sam_with_eta_zero_is_sam_and_constant_fisher_shrinks_the_radius():
    params, _, _, loss_fn = quadratic_problem()
    _, eps_fisher, _ = capture(
        flatminima.FisherSAM(frozen(params), rho=0.2, eta=0.0), params, loss_fn
    )
    _, eps_sam, _ = capture(flatminima.SAM(frozen(params), rho=0.2), params, loss_fn)
    assert torch.allclose(eps_fisher, eps_sam, rtol=1e-12, atol=1e-15)

    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    k, eta, rho = 1.5, 0.4, 0.2
    weights = [
        torch.zeros(3, dtype=torch.float64, requires_grad=True),
        torch.zeros(5, dtype=torch.float64, requires_grad=True),
    ]

    def linear_loss():
        return k * signs @ torch.cat(weights)

    g, eps, _ = capture(
        flatminima.FisherSAM(frozen(weights), rho=rho, eta=eta), weights, linear_loss
    )
    c = 1 + eta * k * k
    assert torch.allclose(eps, rho / math.sqrt(c) * g / g.norm(), rtol=1e-12, atol=1e-15)


def test_fisher_sam_damps_large_gradient_coordinates():
    weights = [torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    scales = torch.tensor([1.0, 10.0], dtype=torch.float64)
    _g, eps, _ = capture(
        flatminima.FisherSAM(frozen(weights), rho=0.1, eta=1.0),
        weights,
        lambda: scales @ weights[0],
    )
    # ε_i ∝ g_i / (1 + η g_i²): the coordinate with the 10× gradient moves less.
    assert float(eps[1]) < float(eps[0])
    assert float(eps[1] / eps[0]) == pytest.approx((10 / 101) / (1 / 2), rel=1e-12)


# -- Monge SAM (row 7) ------------------------------------------------------------------------


@pytest.mark.parametrize("loss_scale", [1e-3, 1.0, 1e3])
def test_monge_sam_metric_radius_adaptive_norm_and_sam_direction(loss_scale):
    params, _, _, loss_fn = quadratic_problem()
    rho = 0.3
    g, eps, _ = capture(
        flatminima.MongeSAM(frozen(params), rho=rho), params, loss_fn, scale=loss_scale
    )
    n = float(g.norm())
    metric = eps @ eps + (g @ eps) ** 2
    assert float(metric) == pytest.approx(rho**2 * (n / (n + XI)) ** 2, rel=1e-11)
    assert float(eps.norm()) == pytest.approx(rho / math.sqrt(1 + n * n) * n / (n + XI), rel=1e-11)
    assert float(eps @ g / (eps.norm() * g.norm())) == pytest.approx(1.0, abs=1e-12)


def test_monge_sam_limits():
    params, _, _, loss_fn = quadratic_problem()
    _, small, _ = capture(flatminima.MongeSAM(frozen(params), rho=0.3), params, loss_fn, scale=1e-9)
    _, sam, _ = capture(flatminima.SAM(frozen(params), rho=0.3), params, loss_fn, scale=1e-9)
    assert torch.allclose(small, sam, rtol=1e-9)
    _, large, _ = capture(flatminima.MongeSAM(frozen(params), rho=0.3), params, loss_fn, scale=1e9)
    assert float(large.norm()) < 1e-8


# -- loss-scale (in)variance (row 8) ----------------------------------------------------------


@pytest.mark.parametrize("record", [r for r in RECORDS if r.manual_two_pass], ids=lambda r: r.id)
def test_loss_scale_changes_epsilon_only_for_metric_methods(record):
    perturbations = []
    for scale in (1.0, 50.0):
        params, _, _, loss_fn = quadratic_problem()
        optimizer = record.cls(frozen(params), **record.typical)
        capture(optimizer, params, loss_fn, scale=scale)  # a first step (F-SAM's EMA starts)
        _, eps, _ = capture(optimizer, params, loss_fn, scale=scale)
        perturbations.append(eps)
    same = torch.allclose(perturbations[0], perturbations[1], rtol=1e-10, atol=1e-14)
    assert same == record.loss_scale_invariant


# -- the SAM limits of the other methods (rows 6, 10, 11) ---------------------------------------


@pytest.mark.parametrize("record", [r for r in RECORDS if r.sam_equivalent], ids=lambda r: r.id)
def test_sam_equivalent_setting_follows_sams_trajectory(record):
    data = batches(5)
    model, reference = tiny_mlp(), tiny_mlp()
    hyperparameters = {**record.typical, **record.sam_equivalent}
    run(record.cls(make_base("sgd", model.parameters()), **hyperparameters), model, data)
    run(
        flatminima.SAM(make_base("sgd", reference.parameters()), rho=hyperparameters["rho"]),
        reference,
        data,
    )
    assert max_abs_difference(snapshot(model), snapshot(reference)) < 1e-12


def test_friendly_sam_first_step_is_sam():
    data = batches(1)
    model, reference = tiny_mlp(), tiny_mlp()
    run(
        flatminima.FriendlySAM(make_base("sgd", model.parameters()), rho=0.1, sigma=1.0, lmbda=0.6),
        model,
        data,
    )
    run(flatminima.SAM(make_base("sgd", reference.parameters()), rho=0.1), reference, data)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_friendly_sam_code_direction_is_parallel_to_the_paper_form_for_sigma_one():
    params, _, _, loss_fn = quadratic_problem()
    lmbda = 0.6
    optimizer = flatminima.FriendlySAM(frozen(params), rho=0.1, sigma=1.0, lmbda=lmbda)
    g1, _, _ = capture(optimizer, params, loss_fn)
    with torch.no_grad():
        params[0].add_(0.3)  # a different point, hence a different gradient
    g2, eps2, _ = capture(optimizer, params, loss_fn)
    m2 = lmbda * g1 + (1 - lmbda) * g2
    paper = g2 - m2  # g_t − σ m_t with σ = 1
    cosine = float(eps2 @ paper / (eps2.norm() * paper.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-12)
    assert float(eps2.norm()) == pytest.approx(0.1, rel=1e-10)


def test_friendly_sam_constant_gradient_gives_zero_perturbation():
    weights = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    optimizer = flatminima.FriendlySAM(frozen(weights), rho=0.1, sigma=1.0, lmbda=0.6)
    capture(optimizer, weights, lambda: direction @ weights[0])
    _, eps, _ = capture(optimizer, weights, lambda: direction @ weights[0])
    assert torch.equal(eps, torch.zeros(3, dtype=torch.float64))


# -- Tilted SAM (rows 9, 10) ------------------------------------------------------------------


def tilted_combination(losses, grads, tilt):
    """Feeds (loss, gradient) pairs through the streaming combiner; the combined gradient."""
    combiner = TiltedAverage(tilt)
    holder = [torch.zeros_like(grads[0], requires_grad=True)]
    for loss, grad in zip(losses, grads, strict=True):
        holder[0].grad = grad.clone()
        combiner.add(holder, loss, foreach=True)
    combiner.finish(holder, foreach=True)
    return holder[0].grad, combiner.objective()


def test_tilted_weights_are_a_stable_softmax():
    losses = [0.3, 1.2, 0.7, 1.1]
    # One-hot gradients expose each sample's weight.
    grads = [torch.eye(4, dtype=torch.float64)[j] for j in range(4)]
    for tilt in (0.0, 0.5, 3.0):
        weights, objective = tilted_combination(losses, [g.view(4) for g in grads], tilt)
        expected = torch.softmax(tilt * torch.tensor(losses, dtype=torch.float64), 0)
        assert torch.allclose(weights, expected, rtol=1e-12, atol=1e-15)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-14)
        shifted, _ = tilted_combination([loss + 100.0 for loss in losses], grads, tilt)
        assert torch.allclose(shifted, weights, rtol=1e-12, atol=1e-15)
        mean_loss = sum(losses) / 4
        if tilt == 0.0:
            assert torch.allclose(weights, torch.full((4,), 0.25, dtype=torch.float64))
            assert objective == pytest.approx(mean_loss)
        else:
            assert mean_loss <= objective <= max(losses)
    huge, _ = tilted_combination([1000.0, 1001.0, 999.0, 1000.5], grads, 100.0)
    assert torch.isfinite(huge).all()
    assert float(huge[1]) == pytest.approx(1.0, abs=1e-12)


def test_tilted_objective_is_monotone_in_tilt():
    losses = [0.3, 1.2, 0.7, 1.1]
    grads = [torch.ones(1, dtype=torch.float64)] * 4
    objectives = [tilted_combination(losses, grads, t)[1] for t in (0.0, 0.1, 1.0, 10.0, 100.0)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(objectives))
    assert objectives[-1] == pytest.approx(max(losses), abs=0.02)


def test_tilted_sam_draws_its_start_noise_per_parameter_in_order():
    model = tiny_mlp()
    theta = [p.detach().clone() for p in model.parameters()]
    radius, scale = 0.05, 2.0
    optimizer = flatminima.TiltedSAM(
        make_base("sgd", model.parameters()),
        rho=0.05,
        num_samples=1,
        radius=radius,
        noise_scale=scale,
    )
    torch.manual_seed(123)
    x, y = batches(1)[0]
    starts = []
    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            if evaluation.point == "start":
                starts.append([p.detach().clone() for p in model.parameters()])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            evaluation.report(loss)
    torch.manual_seed(123)
    noise = [torch.randn_like(p) * scale for p in theta]  # the authors' draw
    nu = math.sqrt(sum(float((n * n).sum()) for n in noise))
    for start, t, n in zip(starts[0], theta, noise, strict=True):
        assert torch.allclose(start, t + n * min(nu, radius) / nu, rtol=1e-12, atol=1e-15)


def test_tilted_sam_generator_argument_makes_runs_reproducible():
    data = batches(3)
    results = []
    for global_seed in (0, 1):
        model = tiny_mlp()
        torch.manual_seed(global_seed)
        optimizer = flatminima.TiltedSAM(
            make_base("sgd", model.parameters()),
            radius=0.1,
            generator=torch.Generator().manual_seed(9),
        )
        run(optimizer, model, data)
        results.append(snapshot(model))
    assert_bitwise_equal(*results)


def test_tilted_sam_returns_the_tilted_loss():
    model = tiny_mlp()
    x, y = batches(1)[0]
    optimizer = flatminima.TiltedSAM(
        frozen(model.parameters()), tilt=2.0, num_samples=3, radius=0.1
    )
    losses = []
    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            evaluation.report(loss)
            if evaluation.point == "perturbed":
                losses.append(float(loss))
    expected = math.log(sum(math.exp(2.0 * v) for v in losses) / 3) / 2.0
    assert float(evaluations.loss) == pytest.approx(expected, rel=1e-12)


def test_tilted_sam_step_level_hyperparameters_must_agree_across_groups():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "tilt": 5.0}, {"params": model[2].parameters()}], lr=0.1
    )
    with pytest.raises(ValueError, match="tilt"):
        flatminima.TiltedSAM(base, tilt=1.0)
    optimizer = flatminima.TiltedSAM(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="num_samples"):
        optimizer.add_param_group({"params": list(model[2].parameters()), "num_samples": 5})


@pytest.mark.parametrize("foreach", [True, False])
def test_fisher_sam_in_float16_keeps_a_large_gradient_coordinate(foreach: bool) -> None:
    # In float16 g² overflows beyond |g| = 256: f would be inf, that coordinate would drop out
    # of the norm and inflate every other one (by 73% here). √f is built in float32 instead.
    gradient = torch.tensor([300.0, 1.0, 0.01, 0.001], dtype=torch.float64)
    fisher = 1 + gradient**2
    expected = 0.1 * (gradient / fisher) / (gradient**2 / fisher).sum().sqrt()
    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    optimizer = flatminima.FisherSAM(
        torch.optim.SGD([weight], lr=0.1), rho=0.1, eta=1.0, foreach=foreach
    )
    weight.grad = gradient.to(torch.float16)
    optimizer.first_step()
    torch.testing.assert_close(weight.detach().double(), expected, rtol=2e-3, atol=1e-6)
