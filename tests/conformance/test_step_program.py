"""The engine's step program: what any method's program gets, whichever way a step is run."""

from __future__ import annotations

import warnings

import pytest
import torch

import flatminima
from flatminima import hyperparameters as hp
from flatminima.engine import SharpnessAwareOptimizer
from records import RECORDS
from support import (
    assert_bitwise_equal,
    batches,
    closure_for,
    make_base,
    manual_pass,
    prepared,
    run,
    snapshot,
    tiny_mlp,
)

by_record = pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)


def build(record, model, base="sgd"):
    optimizer = record.cls(
        make_base(base, model.parameters()), model=model, **record.typical, **record.extras()
    )
    return prepared(record, optimizer, model)


def one_step(optimizer, model, batch, form, per_example=False):
    """One step in ``form``: closure, evaluations, or the two-pass manual form."""
    x, y = batch
    if form == "closure":
        optimizer.step(closure_for(model, batch, per_example=per_example))
    elif form == "evaluations":
        with optimizer.evaluations() as evaluations:
            for evaluation in evaluations:
                manual_pass(model, batch, evaluation, per_example=per_example)
    else:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.first_step()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.second_step()


def forms(record):
    return ["closure", "evaluations", *(["manual"] if record.manual_two_pass else [])]


@by_record
def test_step_hooks_fire_once_per_step_whichever_way_it_is_run(record):
    for form in forms(record):
        model = tiny_mlp()
        optimizer = build(record, model)
        pre, post = [], []
        optimizer.register_step_pre_hook(lambda *args, pre=pre: pre.append(1))
        optimizer.register_step_post_hook(lambda *args, post=post: post.append(1))
        for batch in batches(3):
            one_step(optimizer, model, batch, form, record.needs_per_example_closure)
        assert (len(pre), len(post)) == (3, 3), form


@by_record
def test_a_scheduler_on_the_wrapper_sees_every_form_as_a_step(record):
    """Before, first_step/second_step and evaluations() bypassed the hooked step, and the
    scheduler warned "lr_scheduler.step() before optimizer.step()"."""
    for form in forms(record):
        model = tiny_mlp()
        optimizer = build(record, model)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for batch in batches(2):
                one_step(optimizer, model, batch, form, record.needs_per_example_closure)
                scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025), form


@by_record
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_schedulers_that_read_momentum_work_on_the_wrapper(record, base):
    """OneCycleLR and CyclicLR look for momentum / betas in ``optimizer.defaults``."""
    model = tiny_mlp()
    optimizer = build(record, model, base)
    assert {"lr", *record.cls.hyperparameter_defaults} <= set(optimizer.defaults)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    one_cycle.step()
    model = tiny_mlp()
    optimizer = build(record, model, base)
    cyclic = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2)
    run(optimizer, model, batches(2), per_example=record.needs_per_example_closure)
    cyclic.step()
    momentum_key = "momentum" if base == "sgd" else "betas"
    assert momentum_key in optimizer.param_groups[0]


@by_record
def test_the_step_counter_counts_finished_steps_and_is_saved(record):
    model = tiny_mlp()
    optimizer = build(record, model)
    run(optimizer, model, batches(3), per_example=record.needs_per_example_closure)
    failing = closure_for(model, batches(1)[0], per_example=record.needs_per_example_closure)

    def boom(*evaluation):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        optimizer.step(boom)  # an aborted step is not counted
    assert optimizer.state_dict()["method"]["step"] == 3
    resumed = build(record, tiny_mlp())
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed._step_count == 3
    optimizer.step(failing)
    assert optimizer._step_count == 4


# -- a method written as a program ------------------------------------------------------------


class CleanPlusPerturbed(SharpnessAwareOptimizer):
    """A toy method that uses every tool of the step: d = g + g̃ at w, then w ← w − c after
    the base step.

    {hyperparameters}
    """

    declaration = (
        hp.Hyperparameter("rho", 0.1, hp.non_negative, "ρ", "radius"),
        hp.Hyperparameter("shift", 0.0, hp.finite, "c", "moved after the descent"),
    )

    def __init__(self, base, *, rho=0.1, shift=0.0, model=None, fail_at=None):
        super().__init__(base, hyperparameters={"rho": rho, "shift": shift}, model=model)
        self.fail_at = fail_at
        self.seen_counts: list[int] = []

    def program(self, step):
        self.seen_counts.append(step.count)
        clean = yield step.clean_pass()
        kept = step.keep_gradients()
        step.perturb(self.direction, self.neighborhood)
        if self.fail_at == "perturbed":
            raise RuntimeError("failed while perturbed")
        yield step.perturbed_pass()
        step.restore()
        with torch.no_grad():
            for p, g in zip(step.params, kept, strict=True):
                if g is not None and p.grad is not None:
                    p.grad.add_(g)

        def shift():
            if self.fail_at == "after":
                raise RuntimeError("failed after the descent")
            for group in step.groups:
                for p in group["params"]:
                    p.sub_(group["shift"])

        step.after_descent(shift)
        return clean.loss


def test_a_program_combines_the_clean_and_perturbed_gradients():
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = CleanPlusPerturbed(torch.optim.SGD(model.parameters(), lr=0.1), shift=0.01)
    sam = flatminima.SAM(torch.optim.SGD(reference.parameters(), lr=0.1), rho=0.1)
    batch = batches(1)[0]
    x, y = batch
    # Reference: SGD with g + g̃, by hand from SAM's own pieces.
    reference.zero_grad()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    clean = [p.grad.clone() for p in reference.parameters()]
    sam.first_step()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    sam.abort_step()
    with torch.no_grad():
        for p, g in zip(reference.parameters(), clean, strict=True):
            p.sub_(0.1 * (p.grad + g) + 0.01)
    optimizer.step(closure_for(model, batch))
    assert (
        max(
            float((a - b).abs().max())
            for a, b in zip(model.parameters(), reference.parameters(), strict=True)
        )
        < 1e-15
    )
    assert optimizer.seen_counts == [0]
    optimizer.step(closure_for(model, batch))
    assert optimizer.seen_counts == [0, 1]


@pytest.mark.parametrize("fail_at", ["perturbed", "after"])
def test_a_program_that_fails_leaves_the_weights_unperturbed(fail_at):
    model = tiny_mlp()
    optimizer = CleanPlusPerturbed(
        torch.optim.SGD(model.parameters(), lr=0.0), shift=0.0, fail_at=fail_at
    )
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="failed"):
        optimizer.step(closure_for(model, batches(1)[0]))
    assert_bitwise_equal(snapshot(model), before)
    optimizer.fail_at = None
    optimizer.step(closure_for(model, batches(1)[0]))  # usable again


def test_the_base_state_is_read_only_to_a_program():
    model = tiny_mlp()
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run(optimizer, model, batches(1))
    from flatminima.step import Step

    view = Step(optimizer, count=0).base_state(next(model.parameters()))
    assert "momentum_buffer" in view
    with pytest.raises(TypeError):
        view["momentum_buffer"] = None  # type: ignore[index]


def test_only_one_pass_of_a_step_may_update_batchnorm_statistics():
    class TwoStatisticsPasses(CleanPlusPerturbed):
        def program(self, step):
            yield step.clean_pass()
            yield step.clean_pass()  # a second statistics pass: a programming error

    model = tiny_mlp(batchnorm=True)
    optimizer = TwoStatisticsPasses(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="BatchNorm statistics on one pass only"):
        optimizer.step(closure_for(model, batches(1)[0]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# -- passes on part of the batch, forward-only probes, and their cost ----------------------------


class ProbeThenHalf(CleanPlusPerturbed):
    """A toy data-aware step: a clean pass with per-example losses, a forward-only probe at
    w + ε, then the perturbed gradient on the half of the batch whose loss rose most."""

    def program(self, step):
        clean = yield step.clean_pass()
        if clean.losses is None:
            raise ValueError("this toy method needs per-example losses")
        step.perturb(self.direction, self.neighborhood)
        probe = yield step.perturbed_pass(needs_gradient=False)
        self.probe_had_grad = probe.grad_enabled
        rise = probe.losses - clean.losses
        chosen = rise.topk(len(rise) // 2).indices
        self.chosen = chosen
        yield step.perturbed_pass(examples=chosen)
        step.restore()
        return clean.loss


def per_example_closure(model, batch, log):
    x, y = batch

    def closure(evaluation):
        rows = slice(None) if evaluation.examples is None else evaluation.examples
        losses = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")
        evaluation.grad_enabled = torch.is_grad_enabled()
        log.append((evaluation.point, None if evaluation.examples is None else len(rows)))
        if evaluation.needs_gradient:
            losses.mean().backward()
        return losses

    return closure


def test_a_closure_taking_the_evaluation_runs_subsets_and_probes_and_the_cost_counts_them():
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = ProbeThenHalf(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    batch = batches(1)[0]
    log: list = []
    optimizer.step(per_example_closure(model, batch, log))
    assert log == [("start", None), ("perturbed", None), ("perturbed", 8)]
    assert optimizer.probe_had_grad is False
    assert (optimizer.cost.forward, optimizer.cost.backward) == (2.5, 1.5)
    assert optimizer.cost.passes == pytest.approx((2.5 + 3.0) / 3)
    # The update is SAM's perturbed gradient on the chosen half, by hand.
    x, y = batch
    sam = flatminima.SAM(torch.optim.SGD(reference.parameters(), lr=0.1), rho=0.1)
    reference.zero_grad()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    sam.first_step()
    chosen = optimizer.chosen
    torch.nn.functional.cross_entropy(reference(x[chosen]), y[chosen]).backward()
    sam.second_step()
    assert (
        max(
            float((a - b).detach().abs().max())
            for a, b in zip(model.parameters(), reference.parameters(), strict=True)
        )
        < 1e-15
    )
    saved = optimizer.state_dict()["method"]["cost"]
    assert saved == (2.5, 1.5)


def test_a_subset_asked_of_a_closure_without_argument_is_a_clear_error():
    model = tiny_mlp()
    optimizer = ProbeThenHalf(torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model)
    x, y = batches(1)[0]

    def closure():  # per-example losses, but it cannot be told which examples to use
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(ValueError, match="the closure must take the evaluation"):
        optimizer.step(closure)
    assert_bitwise_equal(snapshot(model), before)


def test_the_manual_loop_sees_the_same_requests_and_probes_run_without_grad():
    model = tiny_mlp()
    optimizer = ProbeThenHalf(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    seen = []
    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            rows = slice(None) if evaluation.examples is None else evaluation.examples
            seen.append((evaluation.needs_gradient, torch.is_grad_enabled()))
            losses = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")
            evaluation.grad_enabled = torch.is_grad_enabled()
            if evaluation.needs_gradient:
                losses.mean().backward()
            evaluation.report(losses)
    assert seen == [(True, True), (False, False), (True, True)]


def test_every_method_costs_its_declared_compute():
    """Full passes cost what the record declares; a data-aware method's record says what its
    subsets and probes add up to."""
    for record in RECORDS:
        model = tiny_mlp()
        optimizer = build(record, model)
        for step, batch in enumerate(batches(3)):
            before = optimizer.cost.passes
            optimizer.step(closure_for(model, batch, per_example=record.needs_per_example_closure))
            if record.compute is None:
                expected = float(record.passes(record.typical, step))
            else:
                expected = record.compute(record.typical, step, len(batch[1]))
            assert optimizer.cost.passes - before == pytest.approx(expected), record.id
