"""Run configurations: validated in full, hashed canonically."""

from __future__ import annotations

import pytest

from flatminima.experiments.config import ConfigError, make_run_config
from flatminima.registry import get_method, method_names


def test_hash_is_canonical_over_types_and_defaults(tiny: dict) -> None:
    explicit = make_run_config(method="sam", hyperparameters={"rho": 0.05}, **tiny)
    from_text = make_run_config(method="sam", hyperparameters={"rho": "0.05"}, **tiny)
    defaults = make_run_config(method="sam", **tiny)
    assert explicit.config_hash == from_text.config_hash == defaults.config_hash
    assert defaults.hyperparameters == dict(get_method("sam").hyperparameters)


def test_every_field_that_changes_the_numbers_changes_the_hash(tiny: dict) -> None:
    base = make_run_config(method="sam", **tiny)
    variants = [
        make_run_config(method="sam", **{**tiny, "epochs": 3}),
        make_run_config(method="sam", **{**tiny, "label_noise": 0.2}),
        make_run_config(method="sam", **{**tiny, "train_size": 300}),
        make_run_config(method="sam", seed=1, **tiny),
        make_run_config(method="sam", lr=0.1, **tiny),
        make_run_config(method="sam", optimizer="adamw", **tiny),
        make_run_config(method="sam", hyperparameters={"rho": 0.1}, **tiny),
        make_run_config(method="sgd", **tiny),
    ]
    hashes = {base.config_hash} | {variant.config_hash for variant in variants}
    assert len(hashes) == len(variants) + 1


def test_defaults_are_filled_in() -> None:
    config = make_run_config(dataset="digits", model="mlp", method="sgd", optimizer="adamw")
    assert config.train_size == 1297 and config.lr == 1e-3 and config.momentum is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "adamsam"}, "unknown method 'adamsam'; accepted: " + ", ".join(method_names())),
        ({"dataset": "cifar10"}, "unknown dataset 'cifar10'; accepted: mnist1d, fashion-mnist"),
        ({"model": "vgg"}, "unknown model 'vgg'; accepted: mlp, cnn1d, cnn, resnet20"),
        ({"model": "cnn"}, "model 'cnn' takes images"),
        ({"label_noise": 1.0}, r"label noise must be a fraction in \[0, 1\)"),
        ({"label_noise": -0.2}, r"label noise must be a fraction in \[0, 1\)"),
        ({"train_size": 0}, "train size must be between 1 and 4000"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"optimizer": "lbfgs"}, "accepted: sgd, adamw"),
        ({"schedule": "step"}, "accepted: cosine, constant"),
        ({"hyperparameters": {"radius": 1.0}}, "does not take hyperparameter"),
        ({"hyperparameters": {"rho": "big"}}, "takes a float"),
        ({"hyperparameters": {"rho": -1.0}}, "rho"),
    ],
)
def test_bad_configurations_raise_one_line_errors(
    overrides: dict, message: str, tiny: dict
) -> None:
    arguments = {**tiny, "method": "sam", **overrides}
    with pytest.raises(ConfigError, match=message) as caught:
        make_run_config(**arguments)
    assert "\n" not in str(caught.value)


def test_integer_hyperparameters_reject_fractions(tiny: dict) -> None:
    with pytest.raises(ConfigError, match="num_samples"):
        make_run_config(method="tilted-sam", hyperparameters={"num_samples": "2.5"}, **tiny)
    config = make_run_config(method="tilted-sam", hyperparameters={"num_samples": "2"}, **tiny)
    assert config.hyperparameters["num_samples"] == 2
