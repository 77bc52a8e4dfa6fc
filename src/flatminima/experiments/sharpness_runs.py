"""Sharpness of the runs in the experiment database, measured from their saved weights.

For every selected finished run, :func:`measure_runs`

1. rebuilds the run's model from its configuration and loads its final weights;
2. rebuilds its training set exactly as the run saw it: same dataset, same seeded training
   subset, same label-noise draw, **noisy labels included** (the loss the optimizer actually
   minimised, so the landscape measured is the one it descended);
3. keeps a fixed subset of ``examples`` of those training examples (all of them when the
   training set is smaller): the positions
   ``sorted(numpy.random.default_rng(seed).choice(n_train, size=examples, replace=False))``
   in the run's own training set, cut into consecutive batches of ``batch_size``;
4. calls :func:`flatminima.sharpness.measure_sharpness` on the mean cross-entropy over those
   batches (eval mode; the batches are also the sub-batches of the m-sharpness measures, so
   m = ``batch_size``; a smaller last batch counts as much as the others) and, when asked,
   :func:`flatminima.sharpness.landscape_1d` along a random filter-normalised direction drawn
   from the same seed (α from −1 to 1, 21 points);
5. stores one row per run and settings in the database's ``sharpness`` table: every scalar, the
   settings, the number of examples and which ones, the time it took and when.

Measuring is read-only on the runs: their rows, epochs and weights are never written. A run
that already has a sharpness row with the same settings is skipped unless ``force=True`` (then
its row is replaced, not duplicated); asking for a landscape adds one to measured runs that lack
it. A measurement with other settings is a row of its own: rows of different settings are never
averaged together. A run is measured only on the data it trained on (the fingerprint recorded
with it), and a run that diverged (:func:`flatminima.experiments.store.has_diverged`, the
runner's verdict) is not measured. Each measurement
runs on one PyTorch thread, in the calling process or in ``jobs`` worker processes: the same
settings and seed give the same numbers either way (:mod:`~flatminima.experiments.workers`).

Example (a tiny run: two epochs on 256 MNIST-1D examples, measured on 128 of them)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from flatminima.experiments.config import make_run_config
    >>> from flatminima.experiments.runner import run_grid
    >>> from flatminima.experiments.store import Store
    >>> db = Path(tempfile.mkdtemp()) / "runs.db"
    >>> config = make_run_config(dataset="mnist1d", model="cnn1d", method="sam", epochs=2,
    ...                          train_size=256, label_noise=0.4)
    >>> _ = run_grid([config], db, progress=False)
    >>> summary = measure_runs(db, SharpnessSettings(examples=128, num_probes=2), progress=False)
    >>> summary.measured == [config.config_hash]
    True
    >>> with Store(db) as store:
    ...     row = store.sharpness(asdict(SharpnessSettings(examples=128, num_probes=2)))[
    ...         config.config_hash]
    >>> row.examples, row.metrics["hessian_top_eigenvalue"] > 0
    (128, True)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatminima.experiments.config import ConfigError, RunConfig
from flatminima.experiments.data import (
    DatasetUnavailableError,
    fingerprint,
    load_dataset,
)
from flatminima.experiments.progress import CountProgress
from flatminima.experiments.runner import WeightsFileError, environment, model_from_weights
from flatminima.experiments.store import DataMismatchError, RunRecord, Store
from flatminima.experiments.workers import Emit, Event, WorkersExited, run_tasks
from flatminima.registry import canonical_method_name
from flatminima.sharpness import landscape_1d, measure_sharpness

logger = logging.getLogger(__name__)

LANDSCAPE_ALPHAS = tuple(float(a) for a in np.linspace(-1.0, 1.0, 21))
"""Coordinates of the 1-D landscape along the filter-normalised direction (Li et al.'s range:
α = ±1 moves every filter by its own norm)."""


@dataclass(frozen=True)
class SharpnessSettings:
    """What a measurement looks at and its budget; stored with every row.

    The radii and budgets are the arguments of :func:`flatminima.sharpness.measure_sharpness`
    (which documents them); ``examples`` and ``batch_size`` choose the data.
    """

    examples: int = 1024
    """Training examples measured on (a seeded subset; the whole set when smaller)."""
    batch_size: int = 128
    """Examples per batch, and the m of the m-sharpness measures."""
    rho: float = 0.05
    adaptive_rho: float = 0.5
    average_rho: float = 1.0
    adaptive_average_rho: float = 5.0
    top_k: int = 1
    num_probes: int = 10
    steps: int = 5
    num_samples: int = 4
    max_iter: int = 30
    tol: float = 1e-3
    seed: int = 0
    """Seeds the example subset, every random draw of the measurement and the landscape's
    direction."""

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of range."""
        for name in ("examples", "batch_size", "top_k", "num_probes", "num_samples", "max_iter"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("steps", self.steps, minimum=0)
        _require_int("seed", self.seed, minimum=0)
        for name in ("rho", "adaptive_rho", "average_rho", "adaptive_average_rho", "tol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ConfigError(f"{_option(name)} must be a number >= 0, got {value!r}")
        if self.top_k > self.max_iter:
            raise ConfigError(
                f"{_option('top_k')} must be at most max_iter={self.max_iter} (Lanczos needs "
                f"at least k products), got {self.top_k}"
            )

    def measure_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~flatminima.sharpness.measure_sharpness`."""
        arguments = asdict(self)
        del arguments["examples"], arguments["batch_size"]
        return arguments


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_option(name)} must be an integer >= {minimum}, got {value!r}")


# --- one run ---------------------------------------------------------------------------------


def training_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``(inputs, labels)``: the runner's training loss."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


def measurement_indices(num_train: int, examples: int, seed: int) -> torch.Tensor:
    """Positions in a training set of ``num_train`` examples measured on: ``examples`` of them
    drawn without replacement from ``seed``, in increasing order (all when fewer)."""
    size = min(examples, num_train)
    chosen = np.random.default_rng(seed).choice(num_train, size=size, replace=False)
    return torch.from_numpy(np.sort(chosen))


def measurement_batches(
    config: RunConfig, settings: SharpnessSettings, data_dir: Path | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """The batches a run is measured on, and a sentence saying which examples they hold."""
    # The dataset's arrays are read once per process (load_dataset keeps them).
    data = load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        label_noise=config.label_noise,
        data_dir=data_dir,
    )
    num_train = len(data.y_train)
    chosen = measurement_indices(num_train, settings.examples, settings.seed)
    inputs, labels = data.x_train[chosen], data.y_train[chosen]
    batches = list(
        zip(inputs.split(settings.batch_size), labels.split(settings.batch_size), strict=True)
    )
    subset = (
        f"all {num_train}"
        if len(chosen) == num_train
        else f"{len(chosen)} of the {num_train} (drawn with seed {settings.seed})"
    )
    noise = f", labels as trained ({config.label_noise:.0%} noisy)" if config.label_noise else ""
    description = f"{subset} training examples of the run{noise}, batches of {settings.batch_size}"
    return batches, description


@dataclass(frozen=True)
class RunMeasurement:
    """What measuring one run produced."""

    config_hash: str
    examples: int
    data: str
    metrics: dict[str, float] | None
    """The scalars of :func:`~flatminima.sharpness.measure_sharpness`, or ``None`` when only the
    landscape was asked for."""
    landscape: dict[str, Any] | None
    seconds: float


def measure_run(
    config: RunConfig,
    weights_path: str | Path,
    settings: SharpnessSettings,
    *,
    data_dir: Path | None = None,
    scalars: bool = True,
    landscape: bool = False,
    data_fingerprint: str | None = None,
) -> RunMeasurement:
    """Measure one trained run: its model with the weights at ``weights_path``, on its own
    training examples (see the module's description). ``data_fingerprint``, when given, is the
    fingerprint of the data the run trained on: :class:`DataMismatchError` when the data here
    differs."""
    started = time.perf_counter()
    if data_fingerprint is not None:
        here = fingerprint(config.dataset, data_dir)
        if here != data_fingerprint:
            raise DataMismatchError(
                f"the run trained on other {config.dataset} data (fingerprint "
                f"{data_fingerprint}, the data here {here}): give --data-dir the data it "
                "trained on"
            )
    model = model_from_weights(config, weights_path)
    batches, description = measurement_batches(config, settings, data_dir)
    metrics = (
        measure_sharpness(model, training_loss, batches, **settings.measure_arguments())
        if scalars
        else None
    )
    line = None
    if landscape:
        slice_ = landscape_1d(
            model, training_loss, batches, alphas=LANDSCAPE_ALPHAS, seed=settings.seed
        )
        line = {
            "alphas": slice_.alphas.tolist(),
            "losses": slice_.losses.tolist(),
            "axis_label": slice_.axis_label,
            "seed": settings.seed,
            "examples": sum(len(labels) for _, labels in batches),
        }
    return RunMeasurement(
        config_hash=config.config_hash,
        examples=sum(len(labels) for _, labels in batches),
        data=description,
        metrics=metrics,
        landscape=line,
        seconds=time.perf_counter() - started,
    )


# --- many runs -------------------------------------------------------------------------------


@dataclass
class SharpnessSummary:
    """What :func:`measure_runs` did."""

    selected: int
    """Finished runs selected (by hash and method)."""
    measured: list[str] = field(default_factory=list)
    """Configuration hashes of the runs measured now, in the order they finished."""
    landscapes_added: int = 0
    """Runs measured before that got only their missing landscape now."""
    already_measured: int = 0
    without_weights: list[str] = field(default_factory=list)
    """Labels of selected runs whose weights file is missing (nothing to measure)."""
    diverged: list[str] = field(default_factory=list)
    """Labels of selected runs that diverged: their weights are not finite, and neither would
    any measurement of them be."""
    failed: list[str] = field(default_factory=list)
    """``label: error`` of each measurement that failed."""


@dataclass(frozen=True)
class _Task:
    label: str
    run_id: int
    config: RunConfig
    weights_path: Path
    scalars: bool
    landscape: bool
    data_fingerprint: str | None


def select_runs(
    store: Store, runs: Sequence[str] | None = None, methods: Sequence[str] | None = None
) -> list[RunRecord]:
    """The finished runs named by ``runs`` (configuration hashes or unique prefixes of them;
    ``None`` or ``["all"]`` for every finished run) and of one of ``methods`` (all when
    ``None``), oldest first. A name that matches no run, several runs or an unfinished run, and
    a method no finished run used, raise :class:`ConfigError`."""
    everything = store.runs()
    finished = [run for run in everything if run.status == "finished"]
    if runs is None or list(runs) == ["all"]:
        chosen = finished
    else:
        picked: dict[str, RunRecord] = {}
        for name in runs:
            matches = [run for run in everything if run.config_hash.startswith(name.strip())]
            if not name.strip() or not matches:
                raise ConfigError(
                    f"no run with configuration hash {name!r} in {store.path}; "
                    + _some_hashes(finished)
                )
            if len(matches) > 1:
                raise ConfigError(f"{name!r} is the start of {len(matches)} run hashes; give more")
            [run] = matches
            if run.status != "finished":
                raise ConfigError(
                    f"run {run.config_hash} is {run.status}, not finished: only finished runs "
                    "have weights to measure"
                )
            picked[run.config_hash] = run
        chosen = sorted(picked.values(), key=lambda run: run.id)
    if methods:
        # Today's names on both sides: a database of an older version says `sgd` for `base`.
        available = sorted({canonical_method_name(run.config["method"]) for run in finished})
        unknown = [method for method in methods if canonical_method_name(method) not in available]
        if unknown:
            raise ConfigError(
                f"no finished run of method {unknown[0]!r} in {store.path}; methods with "
                f"finished runs: {', '.join(available) or 'none'}"
            )
        wanted = {canonical_method_name(method) for method in methods}
        chosen = [run for run in chosen if canonical_method_name(run.config["method"]) in wanted]
    return chosen


def _some_hashes(finished: list[RunRecord], shown: int = 3) -> str:
    """A few finished runs' hashes, for an error message that must stay on one line."""
    if not finished:
        return "it has no finished run"
    examples = ", ".join(
        f"{run.config_hash[:8]} ({RunConfig(**run.config).label})" for run in finished[:shown]
    )
    more = ", …" if len(finished) > shown else ""
    return (
        f"finished runs: {examples}{more} ({len(finished)} in all; `--runs all` measures every "
        "one and prints their hashes)"
    )


def _label(config: RunConfig) -> str:
    return f"{config.label} [{config.config_hash[:8]}]"


def _plan(
    store: Store,
    selected: list[RunRecord],
    settings: SharpnessSettings,
    *,
    landscape: bool,
    force: bool,
    summary: SharpnessSummary,
) -> list[_Task]:
    """What each selected run needs: everything, its landscape only, or nothing."""
    existing = store.sharpness(asdict(settings))
    tasks = []
    for run in selected:
        config = RunConfig(**run.config)
        if run.diverged:
            summary.diverged.append(_label(config))
            continue
        weights = store.path.parent / run.weights_path if run.weights_path else None
        if weights is None or not weights.exists():
            summary.without_weights.append(_label(config))
            continue
        row = existing.get(run.config_hash)
        task = functools.partial(
            _Task, _label(config), run.id, config, weights, data_fingerprint=run.data_fingerprint
        )
        if row is None or force:
            tasks.append(task(scalars=True, landscape=landscape))
        elif landscape and row.landscape is None:
            tasks.append(task(scalars=False, landscape=True))
        else:
            summary.already_measured += 1
    return tasks


def measure_runs(
    db_path: str | Path,
    settings: SharpnessSettings | None = None,
    *,
    runs: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    landscape: bool = False,
    force: bool = False,
    jobs: int = 1,
    data_dir: Path | None = None,
    progress: bool = True,
) -> SharpnessSummary:
    """Measure the sharpness of the selected finished runs of ``db_path`` (see
    :func:`select_runs`) that have no sharpness row yet, or all of them with ``force``, and
    store the results. With ``landscape``, a 1-D landscape is measured too (and added to runs
    measured before without one).

    ``jobs`` worker processes measure at once, one PyTorch thread each. A measurement that fails
    is listed in the summary and the others go on. Bad settings or selections raise
    :class:`ConfigError` before anything is measured; a missing database,
    ``FileNotFoundError``.
    """
    settings = settings or SharpnessSettings()
    settings.check()
    _require_int("jobs", jobs, minimum=1)
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"no database at {db_path}")
    with Store(db_path) as store:
        selected = select_runs(store, runs, methods)
        summary = SharpnessSummary(selected=len(selected))
        tasks = _plan(store, selected, settings, landscape=landscape, force=force, summary=summary)
        if tasks:
            store.check_writable(weights=False)  # before measuring, not after
        bar = CountProgress(len(tasks), "sharpness", enabled=progress)

        def record(event: Event) -> None:
            # The parent alone writes the database: the workers only measure.
            if event.kind != "end":
                return
            task, outcome = tasks[event.index], event.payload
            bar.advance(task.label, "failed" if isinstance(outcome, str) else "measured")
            if isinstance(outcome, str):
                summary.failed.append(f"{task.label}: {outcome}")
            else:
                _record(store, task, outcome, settings, summary)

        try:
            run_tasks(
                _measure_task,
                tasks,
                jobs=jobs,
                setup=_measuring_process,
                setup_args=(settings, data_dir),
                on_event=record,
            )
        except WorkersExited as error:
            summary.failed.append(
                f"{error.remaining} run(s): worker processes exited before measuring them"
            )
        finally:
            bar.close()
    return summary


def _record(
    store: Store,
    task: _Task,
    outcome: RunMeasurement,
    settings: SharpnessSettings,
    summary: SharpnessSummary,
) -> None:
    if outcome.metrics is None:
        assert outcome.landscape is not None
        store.record_landscape(task.run_id, asdict(settings), outcome.landscape)
        summary.landscapes_added += 1
        return
    store.record_sharpness(
        task.run_id,
        metrics=outcome.metrics,
        examples=outcome.examples,
        data=outcome.data,
        settings=asdict(settings),
        measure_time_s=outcome.seconds,
        # Measured on one thread, here or in a worker, whatever this process is set to.
        environment={**environment(), "torch_threads": 1},
        landscape=outcome.landscape,
    )
    summary.measured.append(task.config.config_hash)


@contextmanager
def _measuring_process(
    settings: SharpnessSettings, data_dir: Path | None
) -> Iterator[tuple[SharpnessSettings, Path | None]]:
    """A measuring process: one PyTorch thread, whatever the caller's count (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield settings, data_dir
    finally:
        torch.set_num_threads(previous)


def _measure_task(
    context: tuple[SharpnessSettings, Path | None], task: _Task, emit: Emit
) -> RunMeasurement | str:
    """Measure one task: the measurement, or the error as text (it must not stop the others)."""
    settings, data_dir = context
    try:
        return measure_run(
            task.config,
            task.weights_path,
            settings,
            data_dir=data_dir,
            scalars=task.scalars,
            landscape=task.landscape,
            data_fingerprint=task.data_fingerprint,
        )
    except (WeightsFileError, DatasetUnavailableError, DataMismatchError) as error:
        # Damage or missing data, said in one line: no traceback to read.
        logger.error("measuring %s failed: %s", task.label, error)
        return str(error)
    except Exception as error:
        logger.exception("measuring %s failed", task.label)
        return f"{type(error).__name__}: {error}"
