"""A training run's configuration: validated in full before anything is written, and hashed.

The hash identifies a run in the database: the same configuration (hyperparameters resolved to
their defaults, numbers in canonical types) always gives the same hash, so a grid that is
started again skips what already finished.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from flatminima.experiments.data import DATASETS
from flatminima.experiments.labels import run_label
from flatminima.experiments.models import check_model
from flatminima.registry import canonical_method_name, get_method

BASE_OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LEARNING_RATE = {"sgd": 0.05, "adamw": 1e-3}
SCHEDULES = ("cosine", "constant")
LARGEST_INTEGER = 2**63 - 1
"""The largest integer the database stores (SQLite's 64-bit signed integers): seeds and
integer hyperparameters beyond it are refused rather than overflowing on the way in."""


ADDED_LATER: dict[str, Any] = {"validation_size": 0, "track_sharpness": 0, "processes": 1}
"""Fields added to :class:`RunConfig` later, with the value that means "not used"."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the argument and what it accepts."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a training run's numbers (and nothing that does not)."""

    dataset: str
    model: str
    method: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """The method's hyperparameters, every one present (defaults filled in)."""
    optimizer: str = "sgd"
    """The base optimizer: ``sgd`` (with momentum) or ``adamw``."""
    lr: float = 0.05
    momentum: float | None = 0.9
    """SGD's momentum; ``None`` for AdamW, which does not take one."""
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    epochs: int = 100
    batch_size: int = 128
    label_noise: float = 0.0
    train_size: int = 4000
    seed: int = 0
    validation_size: int = 0
    """Training examples held out (seeded, disjoint from the training subset, labels as noisy
    as the training labels) and evaluated every epoch; 0 for none."""
    track_sharpness: int = 0
    """Measure λ_max every this many epochs during training; 0 for never."""
    processes: int = 1
    """Processes training the run together (DistributedDataParallel, each a shard of every
    batch); more than one changes SAM-type methods' numbers (each process its own ε)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields, without those added after the first release when they hold their
        "absent" value: the hash of every configuration that existed before stays the same,
        so older databases resume instead of training everything again."""
        fields = asdict(self)
        for name, absent in ADDED_LATER.items():
            if fields[name] == absent:
                del fields[name]
        return fields

    @property
    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """A short name for progress bars and errors, as the report names the run:
        ``sam ρ=0.1 seed=0`` (see :func:`~flatminima.experiments.labels.arm_labels`)."""
        return run_label(self.method, self.hyperparameters, self.seed)


def coerce_hyperparameter(method: str, name: str, default: Any, value: Any) -> Any:
    """``value`` (from the command line, a string, or a number) in the type of ``default``, so
    that ``tilt=1`` and ``tilt=1.0`` are the same configuration."""
    expected = type(default)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0"):
                    raise ValueError
                return lowered in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            number = float(value)
            if not number.is_integer() or abs(number) > LARGEST_INTEGER:
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return float(value)
        if default is None and isinstance(value, str):
            return json.loads(value)
    except (TypeError, ValueError):
        limit = " of magnitude at most 2**63 - 1" if expected is int else ""
        raise ConfigError(
            f"hyperparameter {name} of method {method!r} takes a {expected.__name__}{limit} "
            f"(default {default!r}), got {value!r}"
        ) from None
    return value


def resolve_hyperparameters(
    method: str,
    overrides: Mapping[str, Any],
    *,
    optimizer: str = "sgd",
    momentum: float | None = 0.9,
) -> dict[str, Any]:
    """The method's full hyperparameters: defaults, then ``overrides`` coerced to their types.

    Unknown methods and names the method does not take raise :class:`ConfigError`; so do values
    the method itself rejects, and a base optimizer it refuses (it is built once around a dummy
    parameter, with the run's kind of base optimizer, to find out: Momentum-SAM needs SGD's
    momentum).
    """
    try:
        spec = get_method(method)
        resolved = spec.resolved(overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    typed = {
        name: coerce_hyperparameter(method, name, spec.hyperparameters[name], value)
        for name, value in resolved.items()
    }
    probe = torch.nn.Linear(1, 1)
    try:
        probe_base: torch.optim.Optimizer
        if optimizer == "adamw":
            probe_base = torch.optim.AdamW(probe.parameters(), lr=1e-3)
        else:
            probe_base = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=momentum or 0.0)
        spec.build(probe_base, model=probe, **typed)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method {method!r}: {error}") from None
    return typed


def make_run_config(
    *,
    dataset: str,
    model: str,
    method: str,
    hyperparameters: Mapping[str, Any] | None = None,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    epochs: int = 100,
    batch_size: int = 128,
    label_noise: float = 0.0,
    train_size: int | None = None,
    seed: int = 0,
    validation_size: int = 0,
    track_sharpness: int = 0,
    processes: int = 1,
) -> RunConfig:
    """A validated :class:`RunConfig`; :class:`ConfigError` names the first bad argument.

    ``lr=None`` takes the base optimizer's default (0.05 for SGD, 1e-3 for AdamW),
    ``momentum=None`` SGD's 0.9 (AdamW takes no momentum: giving one is an error rather than
    silently ignored) and ``train_size=None`` the dataset's whole training set.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    source = DATASETS[dataset]
    try:
        check_model(model, source.input_shape)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if optimizer not in BASE_OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}; accepted: {', '.join(BASE_OPTIMIZERS)}"
        )
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if not (isinstance(label_noise, (int, float)) and 0.0 <= label_noise < 1.0):
        raise ConfigError(f"label noise must be a fraction in [0, 1), got {label_noise}")
    lr = DEFAULT_LEARNING_RATE[optimizer] if lr is None else lr
    _require(math.isfinite(lr) and lr > 0, f"learning rate must be positive, got {lr}")
    _require(
        math.isfinite(weight_decay) and weight_decay >= 0,
        f"weight decay must be a finite number >= 0, got {weight_decay}",
    )
    if optimizer == "adamw":
        _require(
            momentum is None,
            f"momentum is SGD's; adamw takes none (its betas are PyTorch's defaults), "
            f"got {momentum}",
        )
    else:
        momentum = 0.9 if momentum is None else momentum
        _require(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
    _require(epochs >= 1, f"epochs must be >= 1, got {epochs}")
    _require(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
    _require(0 <= seed <= LARGEST_INTEGER, f"seed must be between 0 and 2**63 - 1, got {seed}")
    _require(
        isinstance(validation_size, int) and 0 <= validation_size < source.num_train,
        f"validation size must be between 0 and {source.num_train - 1} for {dataset}, "
        f"got {validation_size}",
    )
    available = source.num_train - validation_size
    train_size = available if train_size is None else train_size
    _require(
        1 <= train_size <= available,
        f"train size must be between 1 and {available} for {dataset}"
        + (f" with {validation_size} validation examples" if validation_size else "")
        + f", got {train_size}",
    )
    _require(
        isinstance(track_sharpness, int) and 0 <= track_sharpness <= epochs,
        f"track sharpness takes a number of epochs between 0 (never) and {epochs}, "
        f"got {track_sharpness}",
    )
    _require(
        isinstance(processes, int) and 1 <= processes <= batch_size,
        f"processes must be between 1 and the batch size {batch_size}, got {processes}",
    )
    if processes > 1:
        _check_processes(processes, batch_size, train_size, validation_size, track_sharpness)
    return RunConfig(
        dataset=dataset,
        model=model,
        # Today's name: `sgd`, the baseline's old name, gives a `base` run.
        method=canonical_method_name(method),
        hyperparameters=resolve_hyperparameters(
            method, hyperparameters or {}, optimizer=optimizer, momentum=momentum
        ),
        optimizer=optimizer,
        lr=float(lr),
        momentum=None if momentum is None else float(momentum),
        weight_decay=float(weight_decay),
        schedule=schedule,
        epochs=int(epochs),
        batch_size=int(batch_size),
        label_noise=float(label_noise),
        train_size=int(train_size),
        seed=int(seed),
        validation_size=int(validation_size),
        track_sharpness=int(track_sharpness),
        processes=int(processes),
    )


def _check_processes(
    processes: int, batch_size: int, train_size: int, validation_size: int, track_sharpness: int
) -> None:
    """What a multi-process run cannot do (see :mod:`flatminima.experiments.distributed`)."""
    last_batch = train_size % batch_size
    _require(
        last_batch == 0 or last_batch >= processes,
        f"processes must be at most the epoch's last batch, {last_batch} examples (train size "
        f"{train_size} mod batch size {batch_size}), so that every process trains on each "
        f"batch; got {processes}: change the train size or the batch size",
    )
    # Measuring λ_max runs Hessian-vector products through the model DDP wraps, on one
    # process: not done in a multi-process run yet.
    _require(
        track_sharpness == 0,
        "track sharpness is not supported with processes > 1 yet",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
