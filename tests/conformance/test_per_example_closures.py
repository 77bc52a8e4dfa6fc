"""Every method takes a closure that receives its evaluation and returns per-example losses
(the form the data-aware methods need, so one training loop serves them all)."""

from __future__ import annotations

import pytest
import torch

from records import RECORDS
from support import batches, make_base, max_abs_difference, run, snapshot, tiny_mlp


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
def test_every_method_takes_a_per_example_closure(record):
    data = batches(3)
    trajectories = []
    forms = [True] if record.needs_per_example_closure else [True, False]
    for per_example in forms:
        model = tiny_mlp()
        optimizer = record.cls(
            make_base("sgd", model.parameters()), model=model, **record.typical, **record.extras()
        )
        torch.manual_seed(5)
        losses = run(optimizer, model, data, per_example=per_example)
        assert all(torch.isfinite(torch.tensor(losses)))
        trajectories.append(snapshot(model))
    if len(trajectories) == 2:  # the mean of per-example losses is the plain closure's loss
        assert max_abs_difference(*trajectories) < 1e-13
