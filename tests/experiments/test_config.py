"""Run configurations: validated in full, hashed canonically."""

from __future__ import annotations

import hashlib
import json

import pytest

from flatminima.experiments.config import ConfigError, RunConfig, make_run_config
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


def test_fields_added_later_leave_older_configurations_hashes_unchanged() -> None:
    # The hash of a configuration that could be written before validation splits, sharpness
    # tracking and multi-process runs existed: those fields are absent from its dictionary.
    config = make_run_config(dataset="digits", model="mlp", method="sam", epochs=3)
    assert not {"validation_size", "track_sharpness", "processes"} & set(config.to_dict())
    older = dict(config.to_dict())
    canonical = json.dumps(older, sort_keys=True, separators=(",", ":"))
    assert config.config_hash == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # Used, each one is part of the configuration and changes the hash.
    used = [
        make_run_config(dataset="digits", model="mlp", method="sam", epochs=3, **change)
        for change in ({"validation_size": 100}, {"track_sharpness": 1}, {"processes": 2})
    ]
    assert len({config.config_hash} | {variant.config_hash for variant in used}) == 4
    assert RunConfig(**used[0].to_dict()) == used[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"validation_size": -1}, "validation size must be between 0 and"),
        ({"validation_size": 100, "train_size": 1700}, "train size must be between 1 and"),
        ({"track_sharpness": 4}, "track sharpness takes a number of epochs between 0"),
        ({"processes": 0}, "processes must be between 1 and the batch size"),
    ],
)
def test_added_fields_are_validated(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_run_config(dataset="digits", model="mlp", method="sam", epochs=3, **change)
