"""torch.compile: a compiled model trains with every method exactly as the eager model does,
BatchNorm statistics included (the engine freezes them on perturbed passes; a compiled
graph must see that)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatminima import methods

METHODS = list(methods.BY_NAME)


def train(name: str, backend: str | None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    forward = net if backend is None else torch.compile(net, backend=backend)
    extra = {"generator": torch.Generator().manual_seed(7)} if name == "tilted-sam" else {}
    optimizer = methods.BY_NAME[name](
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), model=net, **extra
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)

        def closure(x=x, y=y):
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return net


def assert_close_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", METHODS)
def test_a_compiled_model_trains_like_the_eager_one(name):
    torch._dynamo.reset()
    assert_close_state(train(name, "aot_eager"), train(name, None))


@pytest.mark.slow
def test_inductor_compiled_model_trains_like_the_eager_one():
    torch._dynamo.reset()
    assert_close_state(train("sam", "inductor"), train("sam", None))
