"""A grid on a Ray cluster: every run a Ray task, the database written by the driver alone.

:func:`run_grid_on_ray` is :func:`~flatminima.experiments.runner.run_grid` with Ray's workers
in place of the local pool: the same checks first, the same training code
(:func:`~flatminima.experiments.runner.load_and_train`, hence the same numbers for the same
configuration and thread count), the same database rows, weights files and report. What
changes is where the training runs and who writes:

* The process that calls it (the *driver*) submits one task per configuration left to train,
  declaring what it needs (:func:`task_resources`), and alone opens the SQLite database: the
  workers may be other machines, and SQLite must not be shared over a network.
* A task reads its data and sends the driver ``start`` (the worker's environment and data
  fingerprint), then ``epoch`` after every epoch, through a small actor on the driver's node
  (the *inbox*). The driver claims the run when it starts (a run is ``running`` in the database
  only while a worker trains it), records each epoch as it comes (the run's heartbeat; the
  progress bars move), and at the end writes the weights the task returns as bytes through
  :meth:`Store.save_weights` (no shared filesystem needed) and marks the run finished.
* A run that raises is recorded as failed with its error, and the grid goes on. A worker that
  dies (killed, out of memory, its machine lost) is retried by Ray (``max_retries``): the retry
  says ``start`` again, the driver claims the run again (its epochs so far are deleted, its
  attempt count goes up) and it trains from scratch. Past the last retry the run is recorded
  as failed with Ray's reason, and the next ``compare`` trains it again.
* A killed driver takes its tasks with it (Ray stops the tasks of a driver that is gone); its
  runs stay ``running`` under its process, which the next ``compare`` finds dead and redoes,
  exactly as after a killed local grid. Finished runs are kept.

Ray is an optional dependency (``pip install 'flatminima[ray]'``), imported only here and only
when a Ray grid runs.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from flatminima.experiments.config import ConfigError, RunConfig
from flatminima.experiments.data import DatasetUnavailableError, fingerprint
from flatminima.experiments.progress import GridProgress
from flatminima.experiments.runner import (
    EpochMetrics,
    GridStoppedError,
    GridSummary,
    environment,
    grid_to_run,
    load_and_train,
    storage_fault_stop,
    torch_threads,
)
from flatminima.experiments.store import DEFAULT_STALE_AFTER_S, RunLostError, Store, StoreError
from flatminima.registry import get_method

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
"""How often Ray runs a task again after its worker died (Ray's own default for tasks)."""

POLL_S = 0.2
"""How long the driver waits for a task to end before it looks at the inbox again: the delay,
at most, between an epoch and its row in the database."""

INSTALL_HINT = "pip install 'flatminima[ray]'"


class RayUnavailableError(ConfigError):
    """``--executor ray`` without Ray installed, or a cluster that cannot be reached."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def task_resources(config: RunConfig, threads: int) -> dict[str, float]:
    """What one run's task asks of the cluster: a CPU for each PyTorch thread of each of its
    processes, and no GPU (the runner trains on the CPU)."""
    return {"num_cpus": threads * config.processes, "num_gpus": 0}


Report = tuple[str, int, str, dict[str, Any]]
"""What a task tells the driver while it trains: ``(kind, index, attempt, payload)``.

``kind`` is ``start`` (payload: the worker's ``environment`` and ``data_fingerprint``) or
``epoch`` (payload: the epoch's metrics, keyed as the ``epochs`` table); ``index`` the
configuration's position in the driver's list of runs to train; ``attempt`` is unique to one
execution of the task, so that the reports of an execution whose worker died are told apart
from its retry's. Plain values: the inbox's process never needs flatminima to read them."""


def _inbox_class() -> type:
    """The inbox: every task's reports in the order they arrived, until the driver takes them
    (a Ray actor on the driver's node, living and dying with the driver). Built here, not at
    module level, so that Ray ships the class itself rather than an import of this module: the
    actor's process then starts without importing flatminima and PyTorch (seconds on a busy
    machine, every grid)."""

    class Inbox:
        def __init__(self) -> None:
            self.reports: list[Report] = []

        def put(self, report: Report) -> None:
            self.reports.append(report)

        def take(self) -> list[Report]:
            reports, self.reports = self.reports, []
            return reports

    return Inbox


def train_on_worker(
    config: RunConfig, data_dir: Path | None, threads: int, inbox: Any, index: int
) -> dict[str, Any]:
    """The body of a run's task: train ``config`` from scratch, reporting its start and every
    epoch to ``inbox`` as they happen; returns all of it again (the reports are sent without
    waiting, and may still be on their way when the task ends), the final metrics and the
    weights, serialised."""
    attempt = uuid.uuid4().hex
    epochs: list[dict[str, Any]] = []

    def report(kind: str, payload: dict[str, Any]) -> None:
        # Not waited for: a task blocked in Ray gives its CPU back, and Ray starts another
        # worker process on it. Plain values (through JSON): reading torch's version string
        # would make the inbox's process import PyTorch, holding every report up meanwhile.
        inbox.put.remote((kind, index, attempt, json.loads(json.dumps(payload))))

    def on_epoch(metrics: EpochMetrics) -> None:
        epochs.append(asdict(metrics))
        report("epoch", epochs[-1])

    with torch_threads(threads):
        # Before the start is reported, as before a local claim: data that cannot be read is
        # not a failure of this configuration.
        start = {
            "environment": environment(),
            "data_fingerprint": fingerprint(config.dataset, data_dir),
        }
        report("start", start)
        outcome = load_and_train(config, data_dir, on_epoch=on_epoch)
    weights = io.BytesIO()
    torch.save(outcome.state_dict, weights)
    return {
        "attempt": attempt,
        "start": start,
        "epochs": epochs,
        "final": outcome.final,
        "weights": weights.getvalue(),
    }


def run_grid_on_ray(
    configs: Sequence[RunConfig],
    db_path: str | Path,
    *,
    data_dir: Path | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    address: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> GridSummary:
    """Run every configuration not yet finished in ``db_path`` as a Ray task; what
    :func:`~flatminima.experiments.runner.run_grid` promises holds (resumable, a failing run
    recorded and the grid going on, a full disk stopping it, the same numbers).

    ``address``: an existing cluster's (``auto``: the one this machine belongs to); without it
    a local Ray instance with ``jobs`` runs at once is started for the grid and shut down after.
    A Ray session the caller already started is used as it is. ``data_dir`` must hold the data
    on the driver and on every worker machine. ``max_retries``: how often a run whose worker
    died is started again before it is recorded as failed.
    """
    ray = import_ray()
    if not max_retries >= 0:
        raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
    many = [config for config in configs if config.processes > 1]
    if many:
        raise ConfigError(
            f"--executor ray trains each run in one process; {many[0].label} asks for "
            f"{many[0].processes} (use the local executor for multi-process runs)"
        )
    # A cluster that cannot be joined is refused before the database is touched; a local
    # instance is started only when there is something to train.
    started_here = address is not None and _connect(ray, address)
    try:
        summary, pending = grid_to_run(configs, db_path, data_dir)
        if not pending:
            GridProgress(summary.total, summary.already_finished, 1, progress).close()
            return summary
        cpus_per_run = max(task_resources(config, threads)["num_cpus"] for config in pending)
        if address is None:
            started_here = _connect(ray, None, num_cpus=jobs * cpus_per_run)
        capacity = int(ray.cluster_resources().get("CPU", 0) // cpus_per_run)
        bars = GridProgress(
            summary.total,
            summary.already_finished,
            max(1, min(capacity, len(pending))),
            progress,
        )
        with Store(db_path) as store:
            _RayGrid(ray, store, pending, summary, bars, stale_after_s).run(
                data_dir, threads, max_retries
            )
    finally:
        if started_here:
            ray.shutdown()
    return summary


def _connect(ray: ModuleType, address: str | None, num_cpus: float = 0) -> bool:
    """Join the cluster at ``address``, or start a local instance of ``num_cpus`` CPUs; whether
    this call started the session (and so ends it): a session the caller started is used as
    it is."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            # "local": a new instance even where RAY_ADDRESS names a cluster. No GPU: the
            # runner trains on the CPU.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=0,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if address is None:
            raise RayUnavailableError(
                f"cannot start a local Ray instance ({_one_line(error)})"
            ) from None
        raise RayUnavailableError(
            f"cannot join the Ray cluster at --ray-address {address} ({_one_line(error)}); "
            "`ray status` on its head node prints its address"
        ) from None
    return True


class _RayGrid:
    """The driver's side of one Ray grid: submits the tasks, follows their reports and writes
    everything they produce into the database."""

    def __init__(
        self,
        ray: ModuleType,
        store: Store,
        pending: list[RunConfig],
        summary: GridSummary,
        bars: GridProgress,
        stale_after_s: float,
    ) -> None:
        self.ray, self.store, self.pending, self.summary = ray, store, pending, summary
        self.bars, self.stale_after_s = bars, stale_after_s
        self.tasks: dict[int, Any] = {}  # index → the object reference of its task's result
        self.run_ids: dict[int, int] = {}  # claimed runs
        self.attempts: dict[int, str] = {}  # the execution of each task that counts now
        self.seen: set[str] = set()  # every execution that reported its start
        self.recorded: dict[int, int] = {}  # epochs in the database of that execution
        self.ended: set[int] = set()
        self.slots = _Slots(bars, len(bars.labels))

    def run(self, data_dir: Path | None, threads: int, max_retries: int) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, and needing no CPU: it must never wait behind the training.
        inbox = (
            ray.remote(_inbox_class())
            .options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            )
            .remote()
        )
        task = ray.remote(train_on_worker)
        try:
            # Up before the first task: reports sent to an actor still starting wait in the
            # worker (and die with it), and the first epochs would reach the database late.
            ray.get(inbox.take.remote())
            for index, config in enumerate(self.pending):
                self.tasks[index] = task.options(
                    **task_resources(config, threads),
                    max_retries=max_retries,
                    name=f"flatminima {config.label}",
                ).remote(config, data_dir, threads, inbox, index)
            index_of = {ref: index for index, ref in self.tasks.items()}
            while self.tasks and not self.summary.stopped:
                done, _ = ray.wait(list(self.tasks.values()), num_returns=1, timeout=POLL_S)
                for kind, index, attempt, payload in ray.get(inbox.take.remote()):
                    if self.summary.stopped:
                        break
                    self._follow(kind, index, attempt, payload)
                for ref in done:
                    index = index_of[ref]
                    if index in self.tasks and not self.summary.stopped:
                        del self.tasks[index]
                        self._end(index, ref)
        finally:
            # A stop or an interruption: the runs still training stay `running` under this
            # process, and the next `compare` redoes them.
            for ref in self.tasks.values():
                ray.cancel(ref, force=True)
            ray.kill(inbox)
            self.bars.close()

    # --- reports ------------------------------------------------------------------------------

    def _follow(self, kind: str, index: int, attempt: str, payload: dict[str, Any]) -> None:
        if index in self.ended:
            return  # ended already: its result was recorded, or it was cancelled
        if kind == "start":
            self._start(index, attempt, payload)
        elif attempt == self.attempts.get(index):
            self._epoch(index, payload)
        # Else an epoch of an execution whose worker died, overtaken by its retry's start.

    def _start(self, index: int, attempt: str, payload: dict[str, Any]) -> None:
        """Claim the run for this execution of its task (again, for a retry: the claim deletes
        the epochs a dead worker left and counts the attempt)."""
        if attempt in self.seen:
            return  # a dead execution's start, overtaken by its retry's
        self.seen.add(attempt)
        config = self.pending[index]
        self.attempts[index], self.recorded[index] = attempt, 0
        try:
            run_id = self.store.claim(
                config.config_hash,
                config.to_dict(),
                payload["environment"],
                get_method(config.method).passes_per_step(config.hyperparameters),
                stale_after_s=self.stale_after_s,
                data_fingerprint=payload["data_fingerprint"],
            )
        except Exception as error:
            self._give_up(index, error)
            return
        if run_id is None:  # finished or being trained by another process meanwhile
            self._end_early(index, "skipped")
            return
        self.run_ids[index] = run_id
        self.slots.start(index, config)

    def _epoch(self, index: int, metrics: dict[str, Any]) -> None:
        try:
            self.store.record_epoch(self.run_ids[index], metrics)
        except RunLostError:
            label = self.pending[index].label
            logger.warning("%s was taken over by another process: stopped", label)
            self._end_early(index, "skipped")
            return
        except Exception as error:
            self._give_up(index, error)
            return
        self.recorded[index] += 1
        self.slots.epoch(index, metrics["test_accuracy"])

    # --- ends ---------------------------------------------------------------------------------

    def _end(self, index: int, ref: Any) -> None:
        """The task of ``index`` ended: record what it returned, or why it failed."""
        exceptions = self.ray.exceptions
        try:
            result = self.ray.get(ref)
        except exceptions.RayTaskError as error:  # the training itself raised
            logger.error("run %s failed on its Ray worker:\n%s", self.pending[index].label, error)
            self._give_up(index, error.cause if error.cause is not None else error)
            return
        except exceptions.RayError as error:  # its worker died past the retries, its node lost…
            self._give_up(index, error)
            return
        # What the reports still on their way would have said.
        if self.attempts.get(index) != result["attempt"]:
            self._start(index, result["attempt"], result["start"])
        for metrics in result["epochs"][self.recorded.get(index, 0) :]:
            if index in self.ended:
                return
            self._epoch(index, metrics)
        if index in self.ended:
            return
        config, run_id = self.pending[index], self.run_ids[index]
        try:
            state = torch.load(io.BytesIO(result["weights"]), weights_only=True)
            path = self.store.save_weights(run_id, config.config_hash, state)
            self.store.finish(run_id, result["final"], path)
        except RunLostError:
            logger.warning("%s was taken over by another process: stopped", config.label)
            self._finish(index, "skipped", None)
        except Exception as error:
            self._give_up(index, error)
        else:
            self._finish(index, "finished", None)

    def _give_up(self, index: int, error: BaseException) -> None:
        """Record a run's failure as the local executor does: the run failed (and the grid goes
        on), or, for a fault every later run would meet too, the grid stops."""
        stop = storage_fault_stop(error)
        if stop is None and isinstance(
            error, (GridStoppedError, StoreError, DatasetUnavailableError)
        ):
            stop = error
        message = str(stop) if stop is not None else _one_line(error)
        run_id = self.run_ids.get(index)
        if stop is None and run_id is not None:
            try:
                self.store.fail(run_id, message)
            except sqlite3.Error as storage_error:
                # The disk is full or the database unwritable: the run stays `running` under
                # this process, and the next `compare` redoes it.
                stop = storage_fault_stop(storage_error)
                message = str(stop) if stop is not None else _one_line(storage_error)
        self._end_early(index, "stopped" if stop is not None else "failed", message)

    def _end_early(self, index: int, status: str, error: str | None = None) -> None:
        """End a run whose task may still be running: it is cancelled (a skipped run is
        another process's, a failed one has nothing more to give)."""
        ref = self.tasks.pop(index, None)
        if ref is not None:
            self.ray.cancel(ref, force=True)
        self._finish(index, status, error)

    def _finish(self, index: int, status: str, error: str | None) -> None:
        self.ended.add(index)
        self.summary.record(self.pending[index].label, status, error)
        self.slots.end(index, self.pending[index], status)


def _one_line(error: BaseException) -> str:
    """``Type: message``, on one line (Ray's own errors run to several)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class _Slots:
    """The progress bars' worker lines, given to runs as they start: on a cluster that grows,
    more runs may train at once than there are lines, and such a run is shown (its epochs
    so far replayed) once a line is free."""

    def __init__(self, bars: GridProgress, count: int) -> None:
        self.bars = bars
        self.free = list(range(count))
        self.slot_of: dict[int, int] = {}
        self.waiting: dict[int, tuple[RunConfig, list[float], str | None]] = {}

    def start(self, index: int, config: RunConfig) -> None:
        self.waiting.pop(index, None)
        slot = self.slot_of.get(index)
        if slot is None and self.free:
            slot = self.slot_of[index] = self.free.pop(0)
        if slot is None:
            self.waiting[index] = (config, [], None)
        else:
            self.bars.start(slot, config.label, config.epochs)

    def epoch(self, index: int, test_accuracy: float) -> None:
        if index in self.slot_of:
            self.bars.epoch(self.slot_of[index], test_accuracy)
        elif index in self.waiting:
            self.waiting[index][1].append(test_accuracy)

    def end(self, index: int, config: RunConfig, status: str) -> None:
        if index not in self.slot_of:
            # Ended before it was shown (it failed to start, or waited for a line).
            config, accuracies, _ = self.waiting.pop(index, (config, [], None))
            self.waiting[index] = (config, accuracies, status)
            self._show_waiting()
            return
        slot = self.slot_of.pop(index)
        self.bars.end(slot, status)
        self.free.append(slot)
        self._show_waiting()

    def _show_waiting(self) -> None:
        while self.free and self.waiting:
            index, (config, accuracies, status) = next(iter(self.waiting.items()))
            del self.waiting[index]
            slot = self.slot_of[index] = self.free.pop(0)
            self.bars.start(slot, config.label, config.epochs)
            for accuracy in accuracies:
                self.bars.epoch(slot, accuracy)
            if status is not None:
                self.slot_of.pop(index)
                self.bars.end(slot, status)
                self.free.append(slot)
