"""What the runner measures every epoch besides test accuracy: the accuracy on the noisy
training labels, the validation split, and λ_max when sharpness is tracked. Each stored number
equals an independent evaluation, and measuring never changes training."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.experiments.config import make_run_config
from flatminima.experiments.data import load_dataset
from flatminima.experiments.runner import load_trained_model, run_grid, train
from flatminima.experiments.store import Store
from flatminima.experiments.tracking import (
    TRACKED_EXAMPLES,
    is_tracked_epoch,
    measure_tracked_sharpness,
    sam_edge_of_stability,
    stability_threshold,
    tracked_batches,
)
from flatminima.sharpness import hessian_eigenvalues

TRAINING_COLUMNS = ("train_loss", "test_loss", "test_accuracy", "learning_rate", "passes")
"""Columns that depend on the training trajectory only (not on timing or measurements)."""


def _accuracy_and_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """Written out here, one example at a time, rather than through the runner's evaluate."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(inputs[i : i + 1]) for i in range(len(labels))])
    correct = sum(
        int(row.argmax()) == int(label) for row, label in zip(logits, labels, strict=True)
    )
    losses = [
        float(-torch.log_softmax(row.double(), dim=0)[label])
        for row, label in zip(logits, labels, strict=True)
    ]
    return correct / len(labels), sum(losses) / len(losses)


def _run(config, db_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = run_grid([config], db_path, progress=False)
    assert summary.finished == 1, summary.failed
    with Store(db_path) as store:
        run = store.find(config.config_hash)
        return run.final, store.epochs(run.id)


def _data(config):
    return load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        label_noise=config.label_noise,
        validation_size=config.validation_size,
    )


def test_every_epoch_stores_the_accuracy_on_the_noisy_training_labels(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    # A constant schedule: the one-epoch run's final weights are the two-epoch run's weights
    # after its first epoch, so every stored epoch can be checked against saved weights.
    tiny.update(schedule="constant", validation_size=64)
    two = make_run_config(method="sam", seed=1, **tiny)
    one = replace(two, epochs=1)
    final, epochs = _run(two, tmp_path / "runs.db")
    _, first = _run(one, tmp_path / "runs.db")
    assert [row["train_loss"] for row in first] == [epochs[0]["train_loss"]]
    data = _data(two)
    for config, row in ((one, epochs[0]), (two, epochs[1])):
        model, _ = load_trained_model(tmp_path / "runs.db", config.config_hash)
        accuracy, _ = _accuracy_and_loss(model, data.x_train, data.y_train)
        assert row["train_accuracy_noisy"] == accuracy
        accuracy, loss = _accuracy_and_loss(model, data.x_validation, data.y_validation)
        assert row["validation_accuracy"] == accuracy
        assert row["validation_loss"] == pytest.approx(loss, rel=1e-5)
    # Computed apart (other batch sizes), the same model: the same accuracy.
    assert final["final_train_accuracy_noisy"] == epochs[-1]["train_accuracy_noisy"]
    assert final["final_validation_accuracy"] == epochs[-1]["validation_accuracy"]
    # Under 40% noise the noisy labels disagree with the clean ones: they are the ones scored.
    assert not data.noisy_mask.sum() == 0


def test_a_validation_split_changes_nothing_in_training_and_none_stores_nothing(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    plain = make_run_config(method="sam", seed=2, **tiny)
    split = make_run_config(method="sam", seed=2, validation_size=200, **tiny)
    assert plain.config_hash != split.config_hash
    plain_final, plain_epochs = _run(plain, tmp_path / "runs.db")
    split_final, split_epochs = _run(split, tmp_path / "runs.db")
    for without, with_split in zip(plain_epochs, split_epochs, strict=True):
        for column in (*TRAINING_COLUMNS, "train_accuracy_noisy"):
            assert without[column] == with_split[column], column
        assert without["validation_accuracy"] is None and without["validation_loss"] is None
        assert 0 <= with_split["validation_accuracy"] <= 1 and with_split["validation_loss"] > 0
    assert plain_final["final_validation_accuracy"] is None
    assert split_final["final_validation_accuracy"] == split_epochs[-1]["validation_accuracy"]
    assert plain_final["final_test_accuracy"] == split_final["final_test_accuracy"]


def test_tracking_sharpness_leaves_the_training_trajectory_and_batchnorm_untouched() -> None:
    # ResNet-20 has BatchNorm: its running statistics would move under a train-mode forward.
    settings = {
        "dataset": "digits", "model": "resnet20", "epochs": 2, "batch_size": 64,
        "train_size": 128, "label_noise": 0.2, "method": "sam", "seed": 3,
    }  # fmt: skip
    untracked = make_run_config(**settings)
    tracked = make_run_config(track_sharpness=1, **settings)
    data = _data(untracked)
    plain, measured = train(untracked, data), train(tracked, data)
    for a, b in zip(plain.epochs, measured.epochs, strict=True):
        for column in (*TRAINING_COLUMNS, "train_accuracy_noisy"):
            assert getattr(a, column) == getattr(b, column), column
        assert a.top_eigenvalue is None and b.top_eigenvalue is not None
    assert plain.final["final_train_accuracy_clean"] == measured.final["final_train_accuracy_clean"]
    assert plain.state_dict.keys() == measured.state_dict.keys()
    for name, tensor in plain.state_dict.items():
        assert torch.equal(tensor, measured.state_dict[name]), name


def test_tracked_sharpness_is_stored_at_the_chosen_epochs_and_equals_an_independent_lanczos(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    tiny.update(epochs=3, train_size=700)
    config = make_run_config(method="sam", seed=0, track_sharpness=2, **tiny)
    _, epochs = _run(config, tmp_path / "runs.db")
    measured = [row["epoch"] for row in epochs if row["top_eigenvalue"] is not None]
    assert measured == [2, 3]  # every second epoch, and the last
    for row in epochs:
        present = row["epoch"] in measured
        for column in ("top_eigenvalue", "gradient_norm", "sharpness_time_s"):
            assert (row[column] is not None) == present, column
    last = epochs[-1]
    assert last["sharpness_time_s"] > 0

    # Independently: the subset drawn as documented, λ_max by a long, tight Lanczos run.
    data = _data(config)
    chosen = np.sort(np.random.default_rng(0).choice(700, size=TRACKED_EXAMPLES, replace=False))
    inputs, labels = data.x_train[chosen], data.y_train[chosen]
    model, _ = load_trained_model(tmp_path / "runs.db", config.config_hash)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    batches = list(zip(inputs.split(128), labels.split(128), strict=True))
    [reference] = hessian_eigenvalues(model, loss_fn, batches, max_iter=200, tol=1e-8).tolist()
    assert last["top_eigenvalue"] == pytest.approx(reference, rel=1e-3)
    norms = []
    for batch in batches:
        gradient = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gradient)))
    assert last["gradient_norm"] == pytest.approx(np.mean(norms), rel=1e-5)


def test_the_tracked_subset_is_fixed_and_measuring_is_deterministic() -> None:
    inputs = torch.arange(2000, dtype=torch.float32)[:, None]
    labels = torch.arange(2000) % 3
    first, again = tracked_batches(inputs, labels), tracked_batches(inputs, labels)
    assert sum(len(y) for _, y in first) == TRACKED_EXAMPLES
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = torch.get_rng_state()
    one, two = measure_tracked_sharpness(model, first), measure_tracked_sharpness(model, first)
    assert (one.top_eigenvalue, one.gradient_norm) == (two.top_eigenvalue, two.gradient_norm)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not drawn from
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(asdict(one)) == {"top_eigenvalue", "gradient_norm", "sharpness_time_s"}


@pytest.mark.parametrize(
    ("epoch", "every", "expected"),
    [(1, 0, False), (5, 0, False), (1, 2, False), (2, 2, True), (5, 2, True), (3, 1, True)],
)
def test_the_tracked_epochs_are_every_nth_and_the_last(epoch: int, every: int, expected: bool):
    assert is_tracked_epoch(epoch, every, epochs=5) == expected


# --- the stability thresholds, checked on a quadratic ----------------------------------------


def _iterate(curvature: float, lr: float, momentum: float, rho: float, steps: int = 4000) -> float:
    """|w| after unnormalised SAM (ε = ρ·g; ρ = 0 is the base optimizer) with PyTorch's
    heavy-ball momentum on L(w) = curvature·w²/2, from w = 1."""
    w, velocity = 1.0, 0.0
    for _ in range(steps):
        gradient = curvature * (w + rho * curvature * w)  # ∇L at w + ρ∇L(w)
        velocity = momentum * velocity + gradient
        w -= lr * velocity
        if abs(w) > 1e6:  # diverging: stop before it overflows
            break
    return abs(w)


@pytest.mark.parametrize(
    ("lr", "momentum", "rho"),
    [(0.1, 0.0, 0.0), (0.05, 0.9, 0.0), (0.1, 0.0, 0.05), (0.05, 0.9, 0.2)],
)
def test_the_predicted_edge_separates_convergence_from_divergence_on_a_quadratic(
    lr: float, momentum: float, rho: float
) -> None:
    edge = sam_edge_of_stability(lr, rho, momentum)
    if rho == 0:
        assert edge == pytest.approx(stability_threshold(lr, momentum), rel=1e-12)
    assert lr * edge * (1 + rho * edge) == pytest.approx(2 * (1 + momentum), rel=1e-12)
    assert _iterate(0.99 * edge, lr, momentum, rho) < 1e-3
    assert _iterate(1.01 * edge, lr, momentum, rho) > 1e3


def test_normalised_sams_edge_is_the_unnormalised_one_at_radius_rho_over_the_gradient_norm():
    assert sam_edge_of_stability(0.05, 0.1, 0.9, gradient_norm=4.0) == pytest.approx(
        sam_edge_of_stability(0.05, 0.025, 0.9), rel=1e-12
    )
    assert stability_threshold(0.05, 0.9) == pytest.approx(76.0)
    assert math.isnan(sam_edge_of_stability(0.05, 0.1, gradient_norm=0.0))


def test_the_memorisation_curve_is_measured_on_a_fixed_subset_of_large_training_sets(
    tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flatminima.experiments import runner

    assert runner.memorisation_positions(runner.MEMORISATION_EXAMPLES) is None
    positions = runner.memorisation_positions(5 * runner.MEMORISATION_EXAMPLES)
    assert positions is not None and len(positions) == runner.MEMORISATION_EXAMPLES
    assert torch.equal(positions, runner.memorisation_positions(5 * runner.MEMORISATION_EXAMPLES))
    assert bool((positions[1:] > positions[:-1]).all())  # sorted, no repeats
    # With a cap below the training set's size, each epoch's number is the subset's accuracy.
    monkeypatch.setattr(runner, "MEMORISATION_EXAMPLES", 100)
    config = make_run_config(method="sgd", seed=3, **{**tiny, "epochs": 1})
    data = _data(config)
    outcome = train(config, data)
    subset = runner.memorisation_positions(len(data.y_train))
    assert subset is not None and len(subset) == 100
    model = runner.build_model(config.model, data.input_shape, data.num_classes)
    model.load_state_dict(outcome.state_dict)
    accuracy, _ = _accuracy_and_loss(model, data.x_train[subset], data.y_train[subset])
    assert outcome.epochs[0].train_accuracy_noisy == accuracy
