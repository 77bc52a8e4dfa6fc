"""Sparse SAM and Fisher-mask FSAM: the spec's properties (§11, §14, §17 row 14) in float64."""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from torch.nn import functional as F

import flatminima
from flatminima import registry
from flatminima.kernels import pack_mask, unpack_mask
from flatminima.methods.sparse_sam import MASK, MASK_SHAPE, death_rate, live_count
from reference import loops
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

DATA = batches(2, seed=3)  # 32 examples to learn masks from


def deviation_from(cls, hyperparameters, make_reference, *, foreach=True, prepare=None):
    """The largest weight difference between ``cls`` and its reference over six steps (SGD
    lr 0.1, momentum 0.9, wd 5e-4, as tests/reference/test_lockstep.py), after
    ``prepare(optimizer, model)``."""
    model = tiny_mlp()
    optimizer = cls(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        foreach=foreach,
        **hyperparameters,
    )
    if prepare is not None:
        prepare(optimizer, model)
    reference_step, reference_base = make_reference(), loops.ReferenceSGD(0.1, 0.9, 5e-4)
    weights = [p.detach().clone() for p in model.parameters()]
    names = [name for name, _ in model.named_parameters()]
    worst = 0.0
    for x, y in batches(6):

        def grad_fn(at, x=x, y=y):
            leaves = [w.detach().clone().requires_grad_(True) for w in at]
            out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
            loss = F.cross_entropy(out, y)
            return float(loss.detach()), [g.detach() for g in torch.autograd.grad(loss, leaves)]

        weights = reference_step(weights, grad_fn, reference_base, **hyperparameters)
        optimizer.step(closure_for(model, (x, y)))
        worst = max(
            worst,
            max(
                float((p.detach() - w).abs().max())
                for p, w in zip(model.parameters(), weights, strict=True)
            ),
        )
    return worst


def masks_of(optimizer, model):
    """The masks, unpacked, checked against the packed state they come from."""
    masks = optimizer.masks()
    for p, m in zip(model.parameters(), masks, strict=True):
        packed = optimizer.state[p][MASK]
        assert packed.dtype == torch.uint8 and packed.numel() == (p.numel() + 7) // 8
        assert optimizer.state[p][MASK_SHAPE] == tuple(p.shape) == tuple(m.shape)
        assert m.dtype == torch.bool
        assert torch.equal(unpack_mask(packed, p.numel()).view(p.shape), m)
    return masks


def live(optimizer, model) -> int:
    return sum(int(m.sum()) for m in masks_of(optimizer, model))


def size_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


def dynamic(model, seed=4, **hyperparameters):
    settings = {"rho": 0.1, "sparsity": 0.5, "mask": "dynamic", "total_epochs": 6}
    return flatminima.SparseSAM(
        make_base("sgd", model.parameters()),
        generator=torch.Generator().manual_seed(seed),
        **{**settings, **hyperparameters},
    )


def fisher(model, **hyperparameters):
    settings = {"rho": 0.1, "sparsity": 0.5, "num_samples": 12}
    return flatminima.SparseSAM(
        make_base("sgd", model.parameters()), **{**settings, **hyperparameters}
    )


def brute_force_fisher(model, data, num_samples):
    """Σᵢ (∇ℓᵢ)² written out: one example, one fresh gradient, one parameter at a time."""
    totals = [torch.zeros_like(p) for p in model.parameters()]
    examples = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(len(y))]
    for x, y in examples[:num_samples]:
        probe = copy.deepcopy(model)
        F.cross_entropy(probe(x), y).backward()
        for total, p in zip(totals, probe.parameters(), strict=True):
            total += p.grad * p.grad
    return totals


def top_mask(scores, sparsity):
    """The brute-force mask: rank every coordinate by its score, keep the largest K."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    ranked = sorted(range(len(flat)), key=lambda i: float(flat[i]), reverse=True)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[ranked[: live_count(len(flat), sparsity)]] = True
    return [
        piece.reshape(s.shape)
        for piece, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)
    ]


# -- the limits (§17 row 14) ----------------------------------------------------------------


@pytest.mark.parametrize("make", [dynamic, fisher], ids=["dynamic", "fisher"])
def test_sparsity_one_is_bitwise_the_base_optimizer(make):
    data = batches(4)
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = make(model, sparsity=1.0)
    optimizer.refresh_mask(model, F.cross_entropy, DATA, epoch=0)
    assert live(optimizer, model) == 0
    run(optimizer, model, data)
    run_base(make_base("sgd", reference.parameters()), reference, data)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def test_the_fisher_mask_is_all_zeros_until_its_first_refresh():
    """As the authors' SSAMF.init_mask: the steps before the first refresh are the base's."""
    data = batches(3)
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = fisher(model)
    assert live(optimizer, model) == 0
    run(optimizer, model, data)
    run_base(make_base("sgd", reference.parameters()), reference, data)
    assert_bitwise_equal(snapshot(model), snapshot(reference))


def sam_with_the_authors_xi():
    every = loops.SparseState(torch.Generator().manual_seed(0))  # sparsity 0: all ones
    return functools.partial(loops.sparse_sam_step, state=every)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_sparsity_zero_is_sam_with_the_authors_stabiliser(foreach):
    """An all-ones mask is SAM with ξ = 1e-7 (the authors'); SAM's ξ = 1e-12 moves it by O(ξ)."""
    hyperparameters = {"rho": 0.1, "sparsity": 0.0, "mask": "dynamic", "total_epochs": 3}
    deviation = deviation_from(
        flatminima.SparseSAM, hyperparameters, sam_with_the_authors_xi, foreach=foreach
    )
    assert deviation < 1e-12
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = fisher(model, sparsity=0.0)
    optimizer.refresh_mask(model, F.cross_entropy, DATA)
    assert optimizer.mask_density() == 1.0
    run(optimizer, model, batches(5))
    run(flatminima.SAM(make_base("sgd", reference.parameters()), rho=0.1), reference, batches(5))
    assert 0 < max_abs_difference(snapshot(model), snapshot(reference)) < 1e-7


def test_epsilon_is_the_masked_gradient_over_the_unmasked_norm():
    """ε = ρ·m⊙g/(‖g‖ + 1e-7): ‖ε‖ ≤ ρ, zero off the mask, parallel to g on it."""
    model = tiny_mlp()
    optimizer = dynamic(model, sparsity=0.6)
    x, y = batches(1)[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.first_step()
    eps = torch.cat(
        [(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)]
    )
    optimizer.abort_step()
    mask = torch.cat([m.reshape(-1) for m in masks_of(optimizer, model)])
    flat_g = torch.cat([t.reshape(-1) for t in g])
    expected = mask.double() * 0.1 * flat_g / (flat_g.norm() + 1e-7)
    assert torch.allclose(eps, expected, rtol=1e-12, atol=1e-15)
    assert float(eps.norm()) <= 0.1
    assert float(eps.norm()) == pytest.approx(
        0.1 * float((mask * flat_g).norm() / flat_g.norm()), rel=1e-6
    )
    assert bool((eps[~mask] == 0).all())


def test_epsilon_norm_never_exceeds_rho_on_a_quadratic():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=generator, dtype=torch.float64)
    w = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    for sparsity in (0.0, 0.3, 0.7, 1.0):
        optimizer = flatminima.SparseSAM(
            torch.optim.SGD([w], lr=0.0), rho=0.2, sparsity=sparsity, mask="dynamic", total_epochs=1
        )
        optimizer.zero_grad()
        (0.5 * w @ a @ a.T @ w).backward()
        start = w.detach().clone()
        optimizer.first_step()
        assert float((w.detach() - start).norm()) <= 0.2
        optimizer.abort_step()


# -- the mask's density ---------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(
    "strategies",
    [("gradient", "random"), ("weight", "weight"), ("random", "gradient")],
    ids=lambda s: "-".join(s),
)
def test_density_is_exactly_one_minus_s_after_every_dynamic_update(sparsity, strategies):
    """The authors' keep count is not capped, so their density drifts (0.8 → 0.6 at the first
    update with the defaults); ours holds round((1 − s)·N) ones after every update."""
    model = tiny_mlp()
    drop_strategy, growth_strategy = strategies
    optimizer = dynamic(
        model, sparsity=sparsity, drop_strategy=drop_strategy, growth_strategy=growth_strategy
    )
    expected = live_count(size_of(model), sparsity)
    assert live(optimizer, model) == expected
    for epoch in range(6):
        optimizer.start_epoch(epoch, model=model, loss_fn=F.cross_entropy, batches=lambda: DATA)
        assert live(optimizer, model) == expected, epoch
        assert all(m.dtype == torch.bool for m in masks_of(optimizer, model))
        run(optimizer, model, batches(1, seed=epoch))
    assert abs(optimizer.mask_density() - (1 - sparsity)) <= 0.5 / size_of(model)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_density_is_exactly_one_minus_s_after_every_fisher_refresh(sparsity):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    model = model.double()  # N = 15 + 12 = 27: (1 − s)·N is not an integer
    twenty = torch.nn.Linear(4, 4).double()  # N = 20: (1 − s)·N is
    for net in (model, twenty):
        optimizer = fisher(net, sparsity=sparsity)
        for seed in range(3):
            optimizer.refresh_mask(net, F.cross_entropy, batches(2, seed=seed))
            assert live(optimizer, net) == live_count(size_of(net), sparsity)
            if net is twenty:
                assert optimizer.mask_density() == pytest.approx(1 - sparsity, abs=1e-15)
            run(optimizer, net, batches(1, seed=seed))


def test_the_live_count_rounds_and_does_not_floor():
    """int(N·(1 − s)) gives 0 for N = 10, s = 0.9 ((1 − 0.9)·10 = 0.999…); we keep 1."""
    assert int(10 * (1 - 0.9)) == 0
    assert live_count(10, 0.9) == 1
    assert [live_count(51, s) for s in (0.0, 0.5, 1.0)] == [51, 26, 0]


# -- SSAM-D's update ------------------------------------------------------------------------


def test_death_rate_follows_the_cosine():
    assert death_rate(0.5, 0, 10) == 0.5
    assert death_rate(0.5, 5, 10) == pytest.approx(0.25, abs=1e-15)
    assert death_rate(0.5, 10, 10) == pytest.approx(0.0, abs=1e-15)


def test_dynamic_update_drops_the_lowest_death_scores_and_regrows_the_highest_growth_scores():
    model = tiny_mlp()
    optimizer = dynamic(model, sparsity=0.5, drop_strategy="weight", growth_strategy="weight")
    before = torch.cat([m.reshape(-1) for m in masks_of(optimizer, model)])
    weights = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()])
    optimizer.refresh_mask(model, F.cross_entropy, DATA, epoch=2)
    after = torch.cat([m.reshape(-1) for m in masks_of(optimizer, model)])
    target = live_count(len(weights), 0.5)
    drops = math.floor(target * death_rate(0.5, 2, 6))
    kept, grown = after & before, after & ~before
    assert int(kept.sum()) == target - drops and int(grown.sum()) == drops and drops > 0
    # Every kept live weight is at least as large as every dropped one; every regrown dead
    # weight at least as large as every dead one left out.
    assert float(weights[kept].min()) >= float(weights[before & ~after].max())
    assert float(weights[grown].min()) >= float(weights[~before & ~after].max())


def test_the_gradient_score_reads_the_first_batch_and_is_counted():
    model = tiny_mlp()
    optimizer = dynamic(model, sparsity=0.5, drop_strategy="gradient", growth_strategy="gradient")
    before = torch.cat([m.reshape(-1) for m in masks_of(optimizer, model)])
    x, y = DATA[0]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.abs().reshape(-1) for p in model.parameters()])
    model.zero_grad()
    optimizer.refresh_mask(model, F.cross_entropy, DATA, epoch=0)
    after = torch.cat([m.reshape(-1) for m in masks_of(optimizer, model)])
    assert float(g[after & before].min()) >= float(g[before & ~after].max())
    assert float(g[after & ~before].min()) >= float(g[~before & ~after].max())
    assert (optimizer.cost.forward, optimizer.cost.backward) == (1.0, 1.0)


def test_the_dynamic_mask_needs_its_epoch_and_total_epochs():
    model = tiny_mlp()
    with pytest.raises(
        ValueError, match="total_epochs must be an integer >= 1 with mask='dynamic'"
    ):
        flatminima.SparseSAM(make_base("sgd", model.parameters()), mask="dynamic")
    with pytest.raises(ValueError, match="refresh_mask needs epoch="):
        dynamic(model).refresh_mask(model, F.cross_entropy, DATA)


# -- SSAM-F's score --------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_fisher_score_and_mask_equal_a_brute_force_per_example_computation(foreach):
    model = tiny_mlp()
    optimizer = fisher(model, num_samples=20, sparsity=0.3)
    optimizer.foreach = foreach
    params = list(model.parameters())
    scores = optimizer._fisher_scores(model, F.cross_entropy, DATA, params)
    expected = brute_force_fisher(model, DATA, 20)
    for s, e in zip(scores, expected, strict=True):
        assert torch.allclose(s, e, rtol=1e-12, atol=0)
    optimizer.refresh_mask(model, F.cross_entropy, DATA)
    for m, e in zip(masks_of(optimizer, model), top_mask(expected, 0.3), strict=True):
        assert torch.equal(m, e)


def test_the_fisher_refresh_touches_neither_gradients_nor_statistics_nor_the_mode():
    """The authors' refresh adds the first example's gradient to the leftover p.grad and
    updates BatchNorm statistics with single examples; ours does neither."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    ).double()
    data = [(torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    model.train()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = flatminima.SparseSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, num_samples=6, model=model
    )
    optimizer.refresh_mask(model, F.cross_entropy, data)
    assert model.training
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert optimizer.mask_density() == pytest.approx(0.5, abs=1 / 64)


def test_the_fisher_refresh_counts_single_examples_as_fractions_of_a_batch():
    model = tiny_mlp()
    optimizer = fisher(model, num_samples=12)
    optimizer.refresh_mask(model, F.cross_entropy, DATA)  # batches of 16
    assert (optimizer.cost.forward, optimizer.cost.backward) == (0.75, 0.75)
    run(optimizer, model, batches(1))
    assert (optimizer.cost.forward, optimizer.cost.backward) == (2.75, 2.75)


def test_too_few_examples_for_the_fisher_mask_is_an_error():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"num_samples=40 examples .* held 32"):
        fisher(model, num_samples=40).refresh_mask(model, F.cross_entropy, DATA)


@pytest.mark.parametrize("cls", [flatminima.SparseSAM, flatminima.FisherMaskSAM])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_a_learnt_fisher_mask_steps_in_lockstep_with_the_reference(cls, foreach):
    """The suite's lockstep has no data to learn a mask from; here the optimizer learns its
    own and the reference is handed the brute-force Fisher mask."""
    expected = top_mask(brute_force_fisher(tiny_mlp(), DATA, 24), 0.4)
    deviation = deviation_from(
        cls,
        {"rho": 0.1, "sparsity": 0.4, "num_samples": 24},
        lambda: functools.partial(loops.sparse_sam_step, state=loops.SparseState(masks=expected)),
        foreach=foreach,
        prepare=lambda optimizer, model: optimizer.refresh_mask(model, F.cross_entropy, DATA),
    )
    assert deviation < 1e-12


# -- the hook, the state --------------------------------------------------------------------


def test_start_epoch_refreshes_every_update_every_epochs():
    model = tiny_mlp()
    optimizer = fisher(model, num_samples=4, update_every=2)
    refreshed = []
    for epoch in range(6):
        before = optimizer.cost.forward
        registry.start_epoch(
            optimizer, epoch, model=model, loss_fn=F.cross_entropy, batches=lambda: DATA
        )
        if optimizer.cost.forward > before:
            refreshed.append(epoch)
    assert refreshed == [0, 2, 4]


def test_the_registry_hook_does_nothing_for_other_optimizers():
    model = tiny_mlp()
    for optimizer in (
        flatminima.SAM(make_base("sgd", model.parameters())),
        make_base("sgd", model.parameters()),
    ):
        registry.start_epoch(
            optimizer, 0, model=model, loss_fn=F.cross_entropy, batches=lambda: DATA
        )


def test_the_mask_is_saved_packed_with_its_shape_and_restored():
    model = tiny_mlp()
    optimizer = fisher(model)
    optimizer.refresh_mask(model, F.cross_entropy, DATA)
    saved = optimizer.state_dict()
    for entry, p in zip(saved["state"].values(), model.parameters(), strict=True):
        assert entry[MASK].dtype == torch.uint8
        assert entry[MASK].numel() == (p.numel() + 7) // 8
        assert entry[MASK_SHAPE] == tuple(p.shape)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed = fisher(tiny_mlp())  # all-zeros mask until the load
    resumed.load_state_dict(torch.load(buffer))
    for p, q in zip(model.parameters(), resumed.param_groups[0]["params"], strict=True):
        assert resumed.state[q][MASK].dtype == torch.uint8
        assert torch.equal(resumed.state[q][MASK], optimizer.state[p][MASK])
    for a, b in zip(resumed.masks(), optimizer.masks(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_a_state_dict_with_the_earlier_bool_masks_still_loads(dtype):
    """Checkpoints written before the masks were packed held one bool per coordinate and no
    shape entry; they load (cast to the parameters' dtype by torch on the way) and step as
    the optimizer that saved them."""
    model = tiny_mlp(dtype=dtype)
    optimizer = dynamic(model, sparsity=0.3, drop_strategy="weight")  # no data read
    optimizer.refresh_mask(model, F.cross_entropy, DATA, epoch=1)
    expected = optimizer.masks()
    saved = optimizer.state_dict()
    for entry, mask in zip(saved["state"].values(), expected, strict=True):
        entry[MASK] = mask.clone()  # the earlier format
        del entry[MASK_SHAPE]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    twin = tiny_mlp(dtype=dtype)
    resumed = dynamic(twin, sparsity=0.3, seed=9)  # another random mask until the load
    resumed.load_state_dict(torch.load(buffer))
    for p, mask in zip(twin.parameters(), expected, strict=True):
        assert resumed.state[p][MASK].dtype == torch.uint8
        assert resumed.state[p][MASK_SHAPE] == tuple(p.shape)
        assert torch.equal(resumed.state[p][MASK], pack_mask(mask))
    for a, b in zip(resumed.masks(), expected, strict=True):
        assert torch.equal(a, b)


def test_a_parameter_added_later_is_not_perturbed_until_the_next_refresh():
    model = tiny_mlp()
    first, last = model[0], model[2]
    optimizer = flatminima.SparseSAM(
        torch.optim.SGD(first.parameters(), lr=0.1), sparsity=0.5, mask="dynamic", total_epochs=2
    )
    optimizer.step(closure_for(model, batches(1)[0]))  # the mask is drawn here
    optimizer.add_param_group({"params": list(last.parameters())})
    last.zero_grad()  # left by the first step's backward while not yet the optimizer's
    optimizer.step(closure_for(model, batches(1)[0]))
    assert all(not bool(optimizer.state[p][MASK].any()) for p in last.parameters())
    optimizer.refresh_mask(model, F.cross_entropy, DATA, epoch=0)
    assert live(optimizer, model) == live_count(size_of(model), 0.5)


def test_fisher_mask_sam_is_sparse_sams_fisher_mask():
    model, twin = tiny_mlp(), tiny_mlp()
    preset = flatminima.FisherMaskSAM(
        make_base("sgd", model.parameters()), sparsity=0.5, num_samples=12
    )
    general = fisher(twin, rho=0.05, sparsity=0.5, num_samples=12)
    for optimizer, net in ((preset, model), (general, twin)):
        optimizer.refresh_mask(net, F.cross_entropy, DATA)
        run(optimizer, net, batches(3))
    assert_bitwise_equal(snapshot(model), snapshot(twin))
    assert preset.param_groups[0]["mask"] == "fisher"


# -- memory (the benchmarks' tracker; a measurement of bytes, not of time) ------------------


@pytest.mark.parametrize("mask", ["fisher", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_mask_costs_one_bit_per_weight_beyond_the_backup(dtype, mask):
    """Packed bits, not bools nor a float copy: ⌈n/8⌉ bytes per tensor of n weights, 1/32 of
    a float32 copy (1/64 of a float64 one) between steps, the backup and that at a step's
    peak. The dynamic mask's first draw (the step that makes it) also holds, once and before
    the backup exists, an int32 permutation of the coordinates and a bool per coordinate:
    1.25 float32 copies."""
    from benchmarks.contenders import Contender, _build_flatminima
    from benchmarks.memory import measure
    from benchmarks.workloads import Workload

    def build_model():
        layers = [torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)]
        return torch.nn.Sequential(*layers).to(dtype)

    workload = Workload(
        name="tiny",
        description="tiny MLP",
        build_model=build_model,
        build_batch=lambda: (torch.randn(8, 32, dtype=dtype), torch.randint(0, 10, (8,))),
        loss=F.cross_entropy,
    )
    overrides = {"mask": mask, "total_epochs": 2, "sparsity": 0.5}
    contender = Contender(
        "sparse",
        "sparse",
        "flatminima",
        "sparse-sam",
        2,
        _build_flatminima("sparse-sam", overrides),
    )
    result = measure(contender, workload, steps=3)
    params = list(build_model().parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    packed_share = sum((p.numel() + 7) // 8 for p in params) / weight_bytes
    assert packed_share == pytest.approx(1 / (8 * params[0].element_size()), rel=0.01)
    assert result.between_steps == pytest.approx(packed_share, abs=1e-9)
    draw = (4 + 1) / params[0].element_size() if mask == "dynamic" else 0.0
    assert result.peak == pytest.approx(max(1 + packed_share, draw), abs=0.01)
    assert result.peak <= flatminima.SparseSAM.memory_copies + 0.01


def test_the_top_k_breaks_ties_by_coordinate_order_and_ranks_every_float():
    """The rule the sharded top-k reproduces: scores above the k-th largest, then ties in the
    order of the coordinates (the brute-force stable sort); negative scores, ±0, inf and NaN
    (ranked above inf, as torch.topk ranks it) in their float order."""
    from flatminima import sharded
    from flatminima.methods.sparse_sam import _top_coordinates

    values = [-2.0, -0.0, 0.0, 0.5, 0.5, math.inf, -math.inf, 0.5, -2.0, 1.0]
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        scores = [
            torch.tensor(values, dtype=dtype)[torch.randint(0, 10, (4, 5), generator=generator)],
            torch.tensor(values, dtype=dtype)[torch.randint(0, 10, (7,), generator=generator)],
        ]
        scores[1][3] = math.nan
        layout = sharded.CoordinateLayout(scores)
        for sparsity in (0.0, 0.2, 0.5, 0.7, 0.95, 1.0):
            got = _top_coordinates(scores, None, live_count(27, sparsity), layout)
            flat = torch.cat([s.reshape(-1) for s in scores]).double().tolist()
            # Python's sort is stable, also reversed: equal keys keep the lowest index first.
            ranked = sorted(
                range(27),
                key=lambda i: (
                    math.isnan(flat[i]),
                    0.0 if math.isnan(flat[i]) else flat[i],
                    math.copysign(1.0, flat[i]),  # -0 below +0, as their bits order them
                ),
                reverse=True,
            )
            ranked = sorted(ranked[: live_count(27, sparsity)])
            expected = torch.zeros(27, dtype=torch.bool)
            expected[ranked] = True
            assert torch.equal(torch.cat([g.reshape(-1) for g in got]), expected), sparsity
