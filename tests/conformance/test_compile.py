"""``torch.compile`` of a whole optimizer step: one graph for every step, the eager numbers.

The factor ρ/‖g‖ changes at every step; as a Python float it was baked into the compiled graph
and forced a recompilation at each step until the recompile limit, after which the step ran
eagerly and slower. The backend is ``aot_eager``: it traces and partitions like inductor but
needs no C++ compiler, which keeps the test short.
"""

from __future__ import annotations

import pytest
import torch

from records import RECORDS
from support import batches, closure_for, make_base, tiny_mlp

COMPILABLE = [r for r in RECORDS if r.compiles_without_recompiling]


def period_of(record) -> int:
    """The period of the record's pass pattern (LookSAM's k; 1 for most methods)."""
    pattern = [record.passes(record.typical, step) for step in range(16)]
    return next(p for p in range(1, 9) if pattern[p:] == pattern[:-p])


def check_compiled_step(record):
    """Each distinct step of the method's cycle is compiled, then compiled again once with
    the numbers that change every step made dynamic: after two cycles no step may compile."""
    torch._dynamo.reset()
    period = period_of(record)
    per_example = record.needs_per_example_closure
    warm_up = 2 * period
    data = batches(max(6, warm_up + 2 * period))
    eager_model, compiled_model = tiny_mlp(), tiny_mlp()
    # extras: the same seeded generator on both sides (Sparse SAM's random initial mask)
    eager = record.cls(
        make_base("sgd", eager_model.parameters()), **record.typical, **record.extras()
    )
    compiled = record.cls(
        make_base("sgd", compiled_model.parameters()), **record.typical, **record.extras()
    )
    step = torch.compile(compiled.step, backend="aot_eager")
    for index, batch in enumerate(data):
        eager.step(closure_for(eager_model, batch, per_example=per_example))
        if index == warm_up:  # the first steps compile the graph and its one-time variants
            torch._dynamo.config.error_on_recompile = True
        try:
            step(closure_for(compiled_model, batch, per_example=per_example))
        finally:
            torch._dynamo.config.error_on_recompile = False
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_compiled_step_does_not_recompile_and_matches_eager():
    check_compiled_step(COMPILABLE[0])


@pytest.mark.slow
@pytest.mark.parametrize("record", COMPILABLE, ids=lambda r: r.id)
def test_every_compilable_method_keeps_one_graph(record):
    check_compiled_step(record)
