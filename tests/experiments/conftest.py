"""Shared fixtures: one PyTorch thread, a private data cache, and tiny training settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# A few hundred examples and two epochs: enough to exercise every path, about a second a run.
TINY: dict[str, Any] = {
    "dataset": "mnist1d",
    "model": "cnn1d",
    "epochs": 2,
    "batch_size": 64,
    "train_size": 256,
    "label_noise": 0.4,
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread_and_private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Single-threaded (reproducible, polite to a shared machine); MNIST-1D generated once per
    session into a temporary cache instead of the user's home (worker processes inherit it)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setenv("FLATMINIMA_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()
    torch.set_num_threads(previous_threads)


@pytest.fixture
def tiny() -> dict[str, Any]:
    """Training settings for end-to-end tests (a fresh copy per test)."""
    return dict(TINY)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"
