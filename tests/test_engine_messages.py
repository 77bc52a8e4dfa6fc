"""The call style of the popular SAM ports is recognised and answered with the one that works."""

from __future__ import annotations

import pytest
import torch

import flatminima


@pytest.mark.parametrize(
    "call",
    [
        # SAM(params, torch.optim.SGD, rho=..., lr=...): the most-copied form.
        lambda params: flatminima.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
        lambda params: flatminima.SAM(params, torch.optim.SGD, rho=0.1),
        lambda params: flatminima.FisherSAM(params, torch.optim.SGD, rho=0.1, lr=0.1),
        # Parameters, or the class, where the instance belongs.
        lambda params: flatminima.SAM(params, rho=0.1),
        lambda params: flatminima.SAM(torch.optim.SGD, rho=0.1),
    ],
)
def test_the_ports_call_style_says_how_to_write_it(call) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError) as raised:
        call(model.parameters())
    message = str(raised.value)
    assert "must be a torch.optim.Optimizer instance" in message
    assert "(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)" in message
    assert "\n" not in message


def test_the_right_call_style_still_works() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    assert optimizer.param_groups[0]["rho"] == 0.1
