"""Training runs and grids of them, recorded in the experiment database.

The runner knows nothing about any particular method: it asks the registry for the method's
spec, builds it around the base optimizer and calls ``step(closure)``. Forward/backward passes
are counted by the closure itself, so the cost column of the report is measured, not declared.

A grid runs its configurations one after another, or on ``jobs`` worker processes
(:mod:`~flatminima.experiments.workers`; one thread each: on a small machine one
single-threaded process per core is both fastest and reproducible). Every worker writes its own
run's rows in short transactions; the parent process only draws the progress. A grid may also run
on a Ray cluster (:mod:`~flatminima.experiments.ray_executor`), with the same checks and the same
training code (:func:`grid_to_run`, :func:`load_and_train`).

Before training, a grid checks once that it can write the database and the weights folder, and
that the data each dataset loads here is the data the database's runs trained on (its
fingerprint). A failing run is recorded and the grid goes on; a full disk (or another fault of
the storage that every later run would meet too) stops the grid at once.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import sqlite3
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatminima.engine import Evaluation, SharpnessAwareOptimizer
from flatminima.experiments.config import RunConfig
from flatminima.experiments.data import (
    DATASETS,
    Dataset,
    DatasetUnavailableError,
    fingerprint,
    load_dataset,
)
from flatminima.experiments.models import build_model
from flatminima.experiments.progress import GridProgress
from flatminima.experiments.store import (
    DEFAULT_STALE_AFTER_S,
    RunLostError,
    Store,
    StoreError,
    has_diverged,
    out_of_space,
)
from flatminima.experiments.tracking import (
    is_tracked_epoch,
    measure_tracked_sharpness,
    tracked_batches,
)
from flatminima.experiments.workers import Emit, Event, WorkersExited, run_tasks
from flatminima.registry import get_method, start_epoch

logger = logging.getLogger(__name__)

EVALUATION_BATCH_SIZE = 1000
TRAINING_EVALUATION_BATCH_SIZE = 256
"""Batches of the per-epoch pass over the training set: on one CPU thread a convolutional
network's forward runs about twice as fast in batches of 256 as of 1000 (the activations stay
in cache), and the outputs are the same (bit for bit, measured on the four models)."""
MEMORISATION_EXAMPLES = 2000
"""The per-epoch accuracy on the noisy training labels is taken on at most this many training
examples (fixed positions, the same at every epoch and for every method): its standard error
stays near one point, and on a 10,000-example Fashion-MNIST subset it costs a fifth of a pass
over the whole training set (which cost 60% of an SGD epoch there). The final number uses the
whole training set."""
MEMORISATION_SEED = 0


def memorisation_positions(num_train: int) -> torch.Tensor | None:
    """The sorted training positions the per-epoch noisy-label accuracy is measured on, or
    ``None`` for all of them (training sets of at most ``MEMORISATION_EXAMPLES``)."""
    if num_train <= MEMORISATION_EXAMPLES:
        return None
    generator = torch.Generator().manual_seed(MEMORISATION_SEED)
    chosen = torch.randperm(num_train, generator=generator)[:MEMORISATION_EXAMPLES]
    return chosen.sort().values


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced; the keys match the database's ``epochs`` table."""

    epoch: int
    train_loss: float
    """Mean over the epoch's steps of the loss ``step`` returned, on the (noisy) training labels:
    the loss at the unperturbed weights for most methods, the method's own objective for
    methods that never evaluate there (see each method's ``step``)."""
    test_loss: float
    test_accuracy: float
    learning_rate: float
    """The learning rate of the epoch's last step."""
    train_time_s: float
    """Training time so far (evaluation excluded)."""
    passes: float
    """Forward/backward passes so far (a pass on part of the batch, or a forward without a
    backward, counts its share: the optimizer's ``cost.passes`` where it keeps one)."""
    train_accuracy_noisy: float
    """Accuracy on the training labels as trained on (noisy ones included), in eval mode after
    the epoch: under label noise, how much of the noise the network has memorised."""
    validation_loss: float | None = None
    validation_accuracy: float | None = None
    """On the validation split (labels as noisy as the training labels); ``None`` without."""
    top_eigenvalue: float | None = None
    gradient_norm: float | None = None
    sharpness_time_s: float | None = None
    """λ_max, mean mini-batch gradient norm and the seconds they took, at the epochs sharpness
    is tracked (:mod:`~flatminima.experiments.tracking`); ``None`` at the others."""


@dataclass
class TrainingOutcome:
    epochs: list[EpochMetrics]
    final: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def build_base_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum or 0.0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = EVALUATION_BATCH_SIZE,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``inputs``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start : start + batch_size])
        batch_labels = labels[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, batch_labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == batch_labels).sum())
    model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


def forward_only_measurements(model: nn.Module, data: Dataset) -> dict[str, float]:
    """The epoch's measurements besides the test set, forward passes in eval mode only: the
    accuracy on the noisy training labels (on ``memorisation_positions``) and, with a
    validation split, its loss and accuracy. Keyed as the ``epochs`` table."""
    positions = memorisation_positions(len(data.y_train))
    inputs, labels = (
        (data.x_train, data.y_train)
        if positions is None
        else (data.x_train[positions], data.y_train[positions])
    )
    device = next(model.parameters()).device
    _, accuracy = evaluate(
        model, inputs.to(device), labels.to(device), TRAINING_EVALUATION_BATCH_SIZE
    )
    measured = {"train_accuracy_noisy": accuracy}
    if data.x_validation is not None and data.y_validation is not None:
        loss, accuracy = evaluate(model, data.x_validation.to(device), data.y_validation.to(device))
        measured.update(validation_loss=loss, validation_accuracy=accuracy)
    return measured


def train(
    config: RunConfig,
    data: Dataset,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> TrainingOutcome:
    """Train ``config`` on ``data`` from scratch; the same configuration and thread count give
    bit-identical numbers. With ``config.processes`` > 1, on that many processes (see
    :mod:`~flatminima.experiments.distributed`)."""
    if config.processes > 1:
        from flatminima.experiments.distributed import train_distributed  # imports this module

        return train_distributed(config, data, on_epoch)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    spec = get_method(config.method)
    optimizer = spec.build(
        build_base_optimizer(config, model), model=model, **config.hyperparameters
    )
    steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    # The scheduler is built on the method's optimizer: its param_groups are the base
    # optimizer's, so the learning rate it sets is the one the descent uses.
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
        if config.schedule == "cosine"
        else None
    )
    criterion = nn.CrossEntropyLoss(reduction="none")  # per example: ESAM selects by them
    tracked = tracked_batches(data.x_train, data.y_train) if config.track_sharpness else []
    shuffle = torch.Generator().manual_seed(config.seed)
    passes = 0
    train_time = 0.0
    history: list[EpochMetrics] = []
    diverged_at_epoch = None
    model.train()
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loss_sum = 0.0
        order = torch.randperm(len(data.y_train), generator=shuffle)
        # A method that learns from data outside the step (Sparse SAM's mask) does it here.
        start_epoch(
            optimizer,
            epoch - 1,
            model=model,
            loss_fn=criterion,
            batches=lambda order=order: (
                (data.x_train[b], data.y_train[b]) for b in order.split(config.batch_size)
            ),
        )
        for batch in order.split(config.batch_size):
            inputs, labels = data.x_train[batch], data.y_train[batch]

            # Default arguments bind this batch now (a closure must not see the next batch).
            # A method's evaluation says which rows to run and whether a backward is needed
            # (None: the plain base optimizer, every row with a backward); the per-example
            # losses are returned, their mean is what the backward and the step report.
            def closure(
                evaluation: Evaluation | None,
                inputs: torch.Tensor = inputs,
                labels: torch.Tensor = labels,
            ) -> torch.Tensor:
                nonlocal passes
                optimizer.zero_grad(set_to_none=True)
                rows = None if evaluation is None else evaluation.examples_for(len(labels))
                if rows is not None:
                    inputs, labels = inputs[rows], labels[rows]
                losses = criterion(model(inputs), labels)
                if evaluation is None or evaluation.needs_gradient:
                    losses.mean().backward()
                passes += 1
                return losses

            if isinstance(optimizer, SharpnessAwareOptimizer):
                loss = optimizer.step(closure)
            else:
                loss = optimizer.step(lambda: closure(None).mean())
            loss_sum += float(loss.detach()) * len(batch)
            learning_rate = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
        train_time += time.perf_counter() - started
        test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
        held_out = forward_only_measurements(model, data)
        finite = _weights_are_finite(model)
        sharpness = (
            asdict(measure_tracked_sharpness(model, tracked))
            if finite and is_tracked_epoch(epoch, config.track_sharpness, config.epochs)
            else {}
        )
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum / len(data.y_train),
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            learning_rate=learning_rate,
            train_time_s=train_time,
            passes=_passes_run(optimizer, passes),
            **held_out,
            **sharpness,
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        if has_diverged(metrics.train_loss, metrics.test_loss, finite):
            # Every later step would be NaN too: stop, and keep the run as the outcome of its
            # configuration (a reader must see that it diverged, not a retried failure).
            diverged_at_epoch = epoch
            logger.warning("%s diverged at epoch %d: training stopped", config.label, epoch)
            break
    # As before the per-epoch accuracy existed (batches of EVALUATION_BATCH_SIZE): the stored
    # final numbers are computed the same way in every version.
    _, accuracy_noisy = evaluate(model, data.x_train, data.y_train)
    _, accuracy_clean = evaluate(model, data.x_train, data.y_train_clean)
    last = history[-1]
    final = {
        "train_time_s": train_time,
        "passes": _passes_run(optimizer, passes),
        "passes_per_step": spec.passes_per_step(config.hyperparameters),
        "final_test_accuracy": last.test_accuracy,
        "final_test_loss": last.test_loss,
        "final_train_accuracy_noisy": accuracy_noisy,
        "final_train_accuracy_clean": accuracy_clean,
        "diverged_at_epoch": diverged_at_epoch,
        "final_validation_accuracy": last.validation_accuracy,
    }
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return TrainingOutcome(history, final, state)


def _passes_run(optimizer: torch.optim.Optimizer, closure_calls: int) -> float:
    """The compute run so far in full forward/backward passes: the optimizer's own count when
    it keeps one (``cost``), else the closure's calls (each a full pass)."""
    cost = getattr(optimizer, "cost", None)
    return float(closure_calls) if cost is None else cost.passes


def _weights_are_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in model.state_dict().values())


def load_trained_model(db_path: str | Path, config_hash: str) -> tuple[nn.Module, RunConfig]:
    """The final model of a finished run (in eval mode) and its configuration, e.g. to measure
    its sharpness with :mod:`flatminima.sharpness`."""
    with Store(db_path) as store:
        run = store.find(config_hash)
    if run is None or run.status != "finished" or run.weights_path is None:
        raise ValueError(f"no finished run with configuration hash {config_hash} in {db_path}")
    config = RunConfig(**run.config)
    return model_from_weights(config, Path(db_path).parent / run.weights_path), config


class WeightsFileError(ValueError):
    """A saved weights file that cannot be read back (truncated, overwritten, another model's)."""


def model_from_weights(config: RunConfig, weights_path: str | Path) -> nn.Module:
    """The model of ``config`` with the weights saved at ``weights_path``, in eval mode;
    :class:`WeightsFileError` (one line) when the file is damaged or holds other weights."""
    source = DATASETS[config.dataset]
    model = build_model(config.model, source.input_shape, source.num_classes)
    try:
        state = torch.load(weights_path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        # torch's own message runs to many lines (the weights_only explanation): say what is
        # wrong in one.
        what = (
            "not a PyTorch archive: truncated or overwritten"
            if not zipfile.is_zipfile(weights_path)
            else f"unreadable: {type(error).__name__}"
        )
        raise WeightsFileError(
            f"the weights file {weights_path} is damaged ({what}): `flatminima forget` the run "
            "and train it again"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise WeightsFileError(
            f"the weights file {weights_path} is damaged: it does not hold the weights of a "
            f"{config.model} ({type(error).__name__}); `flatminima forget` the run and train it "
            "again"
        ) from None
    return model.eval()


@functools.cache
def _source_commit() -> str:
    """The git commit flatminima runs from (``+dirty`` with uncommitted changes), or
    ``unknown`` outside a checkout: a version number alone does not pin a development tree.
    Asked of git once per process: the code a process runs was read when it started."""
    source = Path(__file__).resolve().parent

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        # Installed inside some other project's checkout, the package is not tracked there:
        # that checkout's commit would say nothing about this code.
        git("ls-files", "--error-unmatch", str(Path(__file__).resolve()))
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(source))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions and settings that can change a run's numbers without changing its config."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "flatminima": version("flatminima"),
        "flatminima_commit": _source_commit(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "mnist1d": version("mnist1d"),
        "scikit-learn": version("scikit-learn"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def load_and_train(
    config: RunConfig,
    data_dir: Path | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> TrainingOutcome:
    """Load the data ``config`` trains on and train it: what every executor runs for a run,
    here or on a Ray worker, so that both give the same numbers."""
    data = load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        label_noise=config.label_noise,
        validation_size=config.validation_size,
        data_dir=data_dir,
    )
    return train(config, data, on_epoch=on_epoch)


class GridStoppedError(RuntimeError):
    """A fault every later run of the grid would meet too (a full disk, a database that cannot
    be written): the grid stops; what finished is kept, and the same command resumes."""


def execute_run(
    config: RunConfig,
    store: Store,
    data_dir: Path | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> str:
    """Train ``config`` unless the database already holds it; returns ``"finished"`` or
    ``"skipped"`` (another process trains it, or took it over from this one). A failure is
    recorded as such and raised again; a full disk raises :class:`GridStoppedError`. Data that
    cannot be read raises before anything is recorded. ``stale_after_s``: see
    :meth:`Store.claim`."""
    spec = get_method(config.method)
    # The data is read (and fingerprinted) before the run is claimed: data that cannot be read
    # is not a failure of this configuration.
    data_fingerprint = fingerprint(config.dataset, data_dir)
    try:
        run_id = store.claim(
            config.config_hash,
            config.to_dict(),
            environment(),
            spec.passes_per_step(config.hyperparameters),
            stale_after_s=stale_after_s,
            data_fingerprint=data_fingerprint,
        )
    except sqlite3.Error as error:
        stop = storage_fault_stop(error)
        if stop is None:
            raise
        raise stop from error
    if run_id is None:
        return "skipped"
    try:

        def record(metrics: EpochMetrics) -> None:
            store.record_epoch(run_id, asdict(metrics))
            if on_epoch is not None:
                on_epoch(metrics)

        outcome = load_and_train(config, data_dir, on_epoch=record)
        weights_path = store.save_weights(run_id, config.config_hash, outcome.state_dict)
        store.finish(run_id, outcome.final, weights_path)
    except RunLostError:
        # Another process took the run over (this one looked dead to it): its outcome stands.
        logger.warning("%s was taken over by another process: stopped", config.label)
        return "skipped"
    except Exception as error:
        stop = storage_fault_stop(error)
        try:
            store.fail(run_id, f"{type(error).__name__}: {error}")
        except sqlite3.Error:
            # The disk is full or the database unwritable: the run stays `running` under this
            # dead process's name, and the next `compare` redoes it.
            if stop is None:
                raise
        if stop is not None:
            raise stop from error
        raise
    return "finished"


def storage_fault_stop(error: BaseException) -> GridStoppedError | None:
    """The error that stops the grid when ``error`` is a storage fault every later run would
    meet too, else ``None`` (``error`` is this run's own failure)."""
    if out_of_space(error):
        return GridStoppedError(
            f"no space left on the device ({type(error).__name__}: {error}): free some and run "
            "the same command again; finished runs are kept"
        )
    if isinstance(error, sqlite3.OperationalError) and "readonly" in str(error):
        return GridStoppedError(f"the database became read-only ({error})")
    return None


# --- grids -----------------------------------------------------------------------------------


@dataclass
class GridSummary:
    total: int
    """Distinct configurations in the grid."""
    already_finished: int = 0
    finished: int = 0
    skipped: int = 0
    """Configurations another live process was training: the grid is incomplete until it ends."""
    failed: list[str] = field(default_factory=list)
    """``label: error`` of each run that failed."""
    stopped: str | None = None
    """Why the grid stopped before trying every run (a full disk...), or ``None``."""

    @property
    def complete(self) -> bool:
        """Whether every configuration of the grid is finished in the database now."""
        return self.already_finished + self.finished == self.total

    def record(self, label: str, status: str, error: str | None) -> None:
        """Count one run's outcome (``finished``, ``skipped``, ``stopped`` or a failure)."""
        if status == "finished":
            self.finished += 1
        elif status == "skipped":
            self.skipped += 1
        elif status == "stopped":
            self.stopped = self.stopped or error
        else:
            self.failed.append(f"{label}: {error}")


def unique_configs(configs: Sequence[RunConfig]) -> list[RunConfig]:
    """``configs`` without repeats (a ρ sweep repeats the base optimizer's run), order kept."""
    seen: dict[str, RunConfig] = {}
    for config in configs:
        seen.setdefault(config.config_hash, config)
    return list(seen.values())


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def grid_to_run(
    configs: Sequence[RunConfig], db_path: str | Path, data_dir: Path | None
) -> tuple[GridSummary, list[RunConfig]]:
    """The grid's summary before training (its distinct configurations, those already
    finished) and the configurations left to train, after the checks every executor makes
    first (see :func:`run_grid`)."""
    todo = unique_configs(configs)
    with Store(db_path) as store:
        pending = [config for config in todo if not _finished(store, config.config_hash)]
        if pending:
            store.check_writable()
            for dataset in sorted({config.dataset for config in pending}):
                store.check_data(dataset, fingerprint(dataset, data_dir))
    return GridSummary(total=len(todo), already_finished=len(todo) - len(pending)), pending


def run_grid(
    configs: Sequence[RunConfig],
    db_path: str | Path,
    *,
    data_dir: Path | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> GridSummary:
    """Run every configuration not yet finished in ``db_path``.

    Finished runs are skipped; a run that was interrupted (or failed) is redone from scratch.
    A failing run is recorded and the grid goes on with the others; a full disk stops it
    (``summary.stopped``). A run another process is training is left to it unless silent for
    ``stale_after_s`` (see :meth:`Store.claim`).

    Before any training: :class:`~flatminima.experiments.config.ConfigError` when ``jobs`` and
    the runs' ``processes`` would oversubscribe the cores (see
    :func:`~flatminima.experiments.distributed.check_process_budget`),
    :class:`~flatminima.experiments.store.StoreError` when the database or
    the weights folder cannot be written or the data differs from what the database's runs
    trained on, :class:`~flatminima.experiments.data.DatasetUnavailableError` when it cannot be
    read.
    """
    todo = unique_configs(configs)
    from flatminima.experiments.distributed import check_process_budget  # imports this module

    check_process_budget(jobs, max((config.processes for config in todo), default=1))
    summary, pending = grid_to_run(configs, db_path, data_dir)
    workers = max(1, min(jobs, len(pending)))
    bars = GridProgress(summary.total, summary.already_finished, workers, progress)

    def follow(event: Event) -> None:
        config = pending[event.index]
        if event.kind == "start":
            bars.start(event.slot, config.label, config.epochs)
        elif event.kind == "progress":
            bars.epoch(event.slot, event.payload)
        else:
            summary.record(config.label, *event.payload)
            bars.end(event.slot, event.payload[0])

    try:
        run_tasks(
            _train_task,
            pending,
            jobs=workers,
            setup=_training_process,
            setup_args=(Path(db_path), data_dir, threads, stale_after_s),
            on_event=follow,
            # A full disk (or another storage fault every later run would meet too) stops the
            # grid: the other workers' runs stay `running` under dead processes, redone next time.
            should_stop=lambda: bool(summary.stopped),
        )
    except WorkersExited as error:
        summary.failed.append(
            f"{error.remaining} run(s): worker processes exited before finishing them"
        )
    finally:
        bars.close()
    return summary


@contextmanager
def _training_process(
    db_path: Path, data_dir: Path | None, threads: int, stale_after_s: float
) -> Iterator[tuple[Store, Path | None, float]]:
    """What a training process holds for its runs: its database connection and settings."""
    with torch_threads(threads), Store(db_path) as store:
        yield store, data_dir, stale_after_s


def _train_task(
    context: tuple[Store, Path | None, float], config: RunConfig, emit: Emit
) -> tuple[str, str | None]:
    store, data_dir, stale_after_s = context
    return _attempt(config, store, data_dir, lambda m: emit(m.test_accuracy), stale_after_s)


def _attempt(
    config: RunConfig,
    store: Store,
    data_dir: Path | None,
    on_epoch: Callable[[EpochMetrics], None],
    stale_after_s: float,
) -> tuple[str, str | None]:
    """Run one configuration of a grid: ``(status, error)``, where a failure does not stop the
    grid (it is in the database, and the next ``compare`` retries it) and ``"stopped"`` does."""
    try:
        return execute_run(config, store, data_dir, on_epoch, stale_after_s), None
    except (GridStoppedError, StoreError, DatasetUnavailableError) as error:
        return "stopped", str(error)
    except Exception as error:
        logger.exception("run %s failed", config.label)
        return "failed", f"{type(error).__name__}: {error}"


def _finished(store: Store, config_hash: str) -> bool:
    run = store.find(config_hash)
    return run is not None and run.status == "finished"
