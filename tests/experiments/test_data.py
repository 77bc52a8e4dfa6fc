"""Dataset loaders: documented shapes, offline sources, exact seeded label noise."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.experiments import data
from flatminima.experiments.data import (
    DATASETS,
    DatasetUnavailableError,
    load_dataset,
    symmetric_label_noise,
)

DOCUMENTED_SHAPES = {
    "mnist1d": ((4000, 1, 40), (1000, 1, 40)),
    "fashion-mnist": ((60000, 1, 28, 28), (10000, 1, 28, 28)),
    "digits": ((1297, 1, 8, 8), (500, 1, 8, 8)),
}


@pytest.mark.parametrize("name", list(DOCUMENTED_SHAPES))
def test_loaders_return_the_documented_shapes_and_types(name: str) -> None:
    dataset = load_dataset(name, seed=0)
    train_shape, test_shape = DOCUMENTED_SHAPES[name]
    assert tuple(dataset.x_train.shape) == train_shape
    assert tuple(dataset.x_test.shape) == test_shape
    assert dataset.y_train.shape == (train_shape[0],)
    assert dataset.y_test.shape == (test_shape[0],)
    assert dataset.x_train.dtype == torch.float32 and dataset.y_train.dtype == torch.int64
    assert dataset.input_shape == DATASETS[name].input_shape
    assert len(dataset.y_train) == DATASETS[name].num_train
    assert set(dataset.y_train.unique().tolist()) == set(range(dataset.num_classes))
    assert torch.isfinite(dataset.x_train).all() and torch.isfinite(dataset.x_test).all()
    # Inputs are normalised: no raw 0..255 or 0..16 pixel values reach the model.
    assert dataset.x_train.abs().max() < 10


def test_mnist1d_is_generated_once_then_read_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mnist1d.data

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("get_dataset downloads: it must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    first = load_dataset("mnist1d", seed=0, data_dir=tmp_path)
    assert (tmp_path / "mnist1d.npz").exists()

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached arrays must be reused")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    second = load_dataset("mnist1d", seed=0, data_dir=tmp_path)
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28))
    labels = np.arange(30) % 10
    for key, filename in data.FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / filename, images if key.startswith("x") else labels)
    dataset = load_dataset("fashion-mnist", seed=0, data_dir=tmp_path)
    assert tuple(dataset.x_train.shape) == (30, 1, 28, 28)
    assert dataset.y_test.tolist() == labels.tolist()
    expected = (images[3] / 255.0 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    np.testing.assert_allclose(dataset.x_test[3, 0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist") as caught:
        load_dataset("fashion-mnist", seed=0, data_dir=tmp_path)
    assert "--data-dir" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_dataset_lists_the_accepted_names() -> None:
    with pytest.raises(ValueError, match="accepted: mnist1d, fashion-mnist, digits"):
        load_dataset("cifar10", seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 0.8, 0.999])
@pytest.mark.parametrize("n", [1, 7, 300, 1297])
def test_label_noise_flips_exactly_the_requested_fraction(fraction: float, n: int) -> None:
    labels = np.random.default_rng(1).integers(0, 10, size=n)
    noisy = symmetric_label_noise(labels, fraction, 10, np.random.default_rng(2))
    assert (noisy != labels).sum() == round(fraction * n)
    assert noisy.min() >= 0 and noisy.max() < 10
    assert (labels == np.random.default_rng(1).integers(0, 10, size=n)).all(), "input mutated"


def test_label_noise_is_seeded_and_symmetric() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=20000)
    first = symmetric_label_noise(labels, 0.5, 10, np.random.default_rng(7))
    again = symmetric_label_noise(labels, 0.5, 10, np.random.default_rng(7))
    other = symmetric_label_noise(labels, 0.5, 10, np.random.default_rng(8))
    assert (first == again).all()
    assert (first != other).any()
    # Symmetric: a corrupted label is spread evenly over the nine wrong classes (each 1/9).
    flipped = first != labels
    offsets = (first[flipped] - labels[flipped]) % 10
    shares = np.bincount(offsets, minlength=10)[1:] / flipped.sum()
    assert np.abs(shares - 1 / 9).max() < 0.01


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_label_noise_outside_zero_one_is_rejected(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        symmetric_label_noise(np.zeros(10, dtype=np.int64), fraction, 10, np.random.default_rng())


def test_load_dataset_subsamples_and_corrupts_training_labels_only() -> None:
    full = load_dataset("digits", seed=0)
    noisy = load_dataset("digits", seed=3, train_size=400, label_noise=0.25)
    assert len(noisy.y_train) == 400
    assert int(noisy.noisy_mask.sum()) == 100
    assert torch.equal(noisy.y_test, full.y_test) and torch.equal(noisy.x_test, full.x_test)
    # The kept examples are training examples, with their clean labels remembered.
    rows = {
        tuple(x.flatten().tolist()): int(y) for x, y in zip(full.x_train, full.y_train, strict=True)
    }
    for x, y in zip(noisy.x_train, noisy.y_train_clean, strict=True):
        assert rows[tuple(x.flatten().tolist())] == int(y)
    repeat = load_dataset("digits", seed=3, train_size=400, label_noise=0.25)
    assert torch.equal(repeat.x_train, noisy.x_train) and torch.equal(repeat.y_train, noisy.y_train)


def test_train_size_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="train size must be between 1 and 1297"):
        load_dataset("digits", seed=0, train_size=5000)


# --- the validation split ----------------------------------------------------------------------


def _digest(dataset: data.Dataset) -> str:
    digest = hashlib.sha256()
    for tensor in (dataset.x_train, dataset.y_train, dataset.y_train_clean):
        digest.update(tensor.numpy().tobytes())
    for tensor in (dataset.x_test, dataset.y_test):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"train_size": 400, "label_noise": 0.25}, "ee420f7bff13f97e"),
        ({"label_noise": 0.4}, "42f2062f4411cdd3"),
        ({"train_size": 1297, "label_noise": 0.1}, "b3109931c7c7e580"),
        ({}, "5eb0b726d6041078"),
    ],
)
def test_without_a_validation_split_the_data_is_bit_identical_to_before_splits_existed(
    arguments: dict[str, float], expected: str
) -> None:
    # The digests were computed with load_dataset as it was before validation_size existed
    # (commit 575888d): older databases' runs must train on exactly the same data.
    assert _digest(load_dataset("digits", seed=3, **arguments)) == expected
    assert _digest(load_dataset("digits", seed=3, validation_size=0, **arguments)) == expected


@pytest.fixture
def numbered_pool(monkeypatch: pytest.MonkeyPatch) -> int:
    """A digits-sized training pool whose every input holds its own index (so a subset can be
    read back as the positions it took), labels i mod 10."""
    size = DATASETS["digits"].num_train
    raw = data.RawSplit(
        x_train=np.repeat(np.arange(size, dtype=np.float32), 64).reshape(size, 1, 8, 8),
        y_train=np.arange(size, dtype=np.int64) % 10,
        x_test=np.zeros((5, 1, 8, 8), dtype=np.float32),
        y_test=np.zeros(5, dtype=np.int64),
    )
    monkeypatch.setattr(data, "_raw_split", lambda name, data_dir: raw)
    return size


def _positions(inputs: torch.Tensor) -> set[int]:
    return {int(x) for x in inputs[:, 0, 0, 0].tolist()}


def test_the_validation_split_is_disjoint_seeded_and_as_noisy_as_the_training_labels(
    numbered_pool: int,
) -> None:
    split = load_dataset("digits", seed=5, train_size=600, validation_size=300, label_noise=0.3)
    train, held_out = _positions(split.x_train), _positions(split.x_validation)
    assert len(train) == 600 and len(held_out) == 300 and not train & held_out
    assert split.y_validation is not None and split.y_validation_clean is not None
    # The clean labels are the pool's; exactly round(0.3 · 300) of them are flipped, each to
    # another class.
    assert split.y_validation_clean.tolist() == [i % 10 for i in sorted(held_out)]
    flipped = split.y_validation != split.y_validation_clean
    assert int(flipped.sum()) == 90 and int(split.noisy_mask.sum()) == 180
    repeat = load_dataset("digits", seed=5, train_size=600, validation_size=300, label_noise=0.3)
    assert torch.equal(repeat.x_validation, split.x_validation)
    assert torch.equal(repeat.y_validation, split.y_validation)
    other = load_dataset("digits", seed=6, train_size=600, validation_size=300, label_noise=0.3)
    assert _positions(other.x_validation) != held_out
    # The training subset and its noisy labels do not depend on the split.
    alone = load_dataset("digits", seed=5, train_size=600, label_noise=0.3)
    assert torch.equal(alone.x_train, split.x_train) and torch.equal(alone.y_train, split.y_train)
    assert alone.x_validation is None and alone.y_validation is None


def test_a_validation_split_without_a_train_size_takes_the_rest_of_the_pool(
    numbered_pool: int,
) -> None:
    split = load_dataset("digits", seed=0, validation_size=97)
    assert len(split.y_train) == numbered_pool - 97
    assert _positions(split.x_train) | _positions(split.x_validation) == set(range(numbered_pool))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"validation_size": 1297}, "validation size must be between 0 and 1296 for digits"),
        ({"validation_size": -1}, "validation size must be between 0 and 1296"),
        (
            {"validation_size": 300, "train_size": 1000},
            "train size must be between 1 and 997 for digits with 300 validation examples",
        ),
    ],
)
def test_a_validation_split_that_does_not_fit_is_rejected(
    arguments: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", seed=0, **arguments)
