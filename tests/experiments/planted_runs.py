"""Databases of finished runs written straight through the Store API (no training), with
planted final validation and test accuracies: what a selection must choose is known."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flatminima.experiments.config import make_run_config
from flatminima.experiments.store import Store

SETTING: dict[str, Any] = {
    "dataset": "mnist1d",
    "model": "cnn1d",
    "epochs": 2,
    "batch_size": 64,
    "train_size": 256,
    "label_noise": 0.4,
    "validation_size": 100,
}
SEEDS = (0, 1, 2)


def write_run(
    store: Store,
    method: str,
    hyperparameters: Mapping[str, Any],
    seed: int,
    *,
    test: float,
    validation: float | None,
    setting: Mapping[str, Any] = SETTING,
) -> None:
    """A finished run of two epochs whose final accuracies are ``test`` and ``validation``."""
    config = make_run_config(
        method=method, hyperparameters=dict(hyperparameters), seed=seed, **setting
    )
    passes = 2 if method != "base" else 1
    run_id = store.claim(config.config_hash, config.to_dict(), {}, passes)
    assert run_id is not None
    for epoch in (1, 2):
        store.record_epoch(
            run_id,
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "test_loss": 1.5,
                "test_accuracy": test,
                "learning_rate": 0.05,
                "train_time_s": 0.1,
                "passes": 10 * passes * epoch,
                "validation_accuracy": validation,
            },
        )
    final = {
        "train_time_s": 0.2,
        "passes": 20 * passes,
        "passes_per_step": passes,
        "final_test_accuracy": test,
        "final_test_loss": 1.5,
        "final_train_accuracy_noisy": 0.5,
        "final_train_accuracy_clean": 0.6,
        "final_validation_accuracy": validation,
    }
    store.finish(run_id, final, f"weights/{config.config_hash}.pt")


# Planted disagreement: on validation data ρ = 0.05 is best for SAM, on the test set ρ = 0.2
# (by far). Friendly SAM: validation prefers ρ = 0.2, the test set ρ = 0.05.
VALIDATION = {
    ("base", None): [0.60, 0.62, 0.61],
    ("sam", 0.05): [0.70, 0.71, 0.72],
    ("sam", 0.2): [0.65, 0.66, 0.64],
    ("friendly-sam", 0.05): [0.66, 0.67, 0.65],
    ("friendly-sam", 0.2): [0.69, 0.70, 0.71],
}
TEST = {
    ("base", None): [0.50, 0.52, 0.51],
    ("sam", 0.05): [0.55, 0.56, 0.54],
    ("sam", 0.2): [0.80, 0.81, 0.82],
    ("friendly-sam", 0.05): [0.90, 0.91, 0.92],
    ("friendly-sam", 0.2): [0.58, 0.60, 0.59],
}


def plant(db_path: Path, test: Mapping[tuple[str, float | None], list[float]] = TEST) -> None:
    with Store(db_path) as store:
        for (method, rho), validation in VALIDATION.items():
            hyperparameters = {} if rho is None else {"rho": rho}
            for index, seed in enumerate(SEEDS):
                write_run(
                    store,
                    method,
                    hyperparameters,
                    seed,
                    test=test[(method, rho)][index],
                    validation=validation[index],
                )
