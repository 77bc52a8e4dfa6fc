"""Models: output shapes for the datasets they accept, clear errors for those they do not."""

from __future__ import annotations

import pytest
import torch

from flatminima.experiments.data import DATASETS
from flatminima.experiments.models import MODELS, build_model, check_model

COMPATIBLE = [
    ("mlp", "mnist1d"),
    ("mlp", "digits"),
    ("mlp", "fashion-mnist"),
    ("cnn1d", "mnist1d"),
    ("cnn", "fashion-mnist"),
    ("cnn", "digits"),
    ("resnet20", "fashion-mnist"),
]


@pytest.mark.parametrize(("model_name", "dataset"), COMPATIBLE)
def test_models_map_a_batch_to_class_logits(model_name: str, dataset: str) -> None:
    torch.manual_seed(0)
    input_shape = DATASETS[dataset].input_shape
    model = build_model(model_name, input_shape, num_classes=10)
    logits = model(torch.randn(5, *input_shape))
    assert logits.shape == (5, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_same_seed_gives_the_same_initialisation() -> None:
    torch.manual_seed(3)
    first = build_model("cnn1d", (1, 40), 10)
    torch.manual_seed(3)
    second = build_model("cnn1d", (1, 40), 10)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resnet20_has_batchnorm_and_twenty_weight_layers() -> None:
    model = build_model("resnet20", (1, 28, 28), 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20


@pytest.mark.parametrize(("model_name", "shape"), [("cnn1d", (1, 8, 8)), ("cnn", (1, 40))])
def test_incompatible_inputs_name_the_accepted_models(model_name: str, shape: tuple) -> None:
    with pytest.raises(ValueError, match="accepted for this dataset") as caught:
        check_model(model_name, shape)
    accepted = str(caught.value).split("accepted for this dataset: ")[1].split(", ")
    assert model_name not in accepted and "mlp" in accepted


def test_unknown_model_lists_every_model() -> None:
    with pytest.raises(ValueError, match=", ".join(MODELS)):
        check_model("vgg16")
