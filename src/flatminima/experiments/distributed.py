"""One training run on several processes: PyTorch's DistributedDataParallel, one shard of every
batch per process.

:func:`train_distributed` starts ``config.processes`` processes with ``torch.multiprocessing``
(spawn), which meet through a file in a fresh temporary directory (two runs at once never
share a rendezvous) and talk over gloo on CPU, or NCCL when there is a GPU for every process.
It returns what :func:`~flatminima.experiments.runner.train` returns, so the caller records the
run exactly as a one-process run: the process that claimed the run in the database is the only
one that writes it, from what rank 0 sends it (epochs as they end, then the final metrics and
weights). The training processes never open the database: the claim on the run names the
caller's process, the one other processes check for liveness before taking a run over.

What a process trains on: every process draws the same shuffled order (same seed), cuts each
global batch of ``batch_size`` examples into ``processes`` contiguous parts of near-equal size
(those of ``torch.tensor_split``, the same as
:class:`~flatminima.step.MicroBatch`: the first ``B mod N`` parts one example longer) and
trains on part ``rank``. Uneven parts are handled exactly: each process weighs its mean loss by
``N·n_k/B`` so that the average DistributedDataParallel takes is the gradient of the global
batch's mean loss. An epoch's last batch must still give every process an example
(:func:`~flatminima.experiments.config.make_run_config` refuses the configuration otherwise).

What changes against one process: plain gradient methods (the base optimizer, ρ = 0) compute
the same thing up to the order of float additions. SAM-type methods do not: the engine runs
the ascent pass under ``no_sync``, so every process perturbs with its own shard's gradient
(SAM's m-sharpness, m = B/N) and only the descent gradient is averaged. That is exactly
micro-batch SAM (``msam``) with ``micro_batches = N`` on one process, for a model without
BatchNorm (with BatchNorm each process normalises with its own shard, and rank 0's running
statistics are the ones kept).

Costs, counted over every process: ``passes`` is the forward/backward work of all processes in
full global batches (N processes each running a pass on 1/N of the batch count one pass, so an
N-process run of SGD does the same passes as one process); ``train_time_s`` is process-seconds,
the sum over processes of each one's training time (evaluation excluded), so a perfectly
parallel run reports the time one process would have taken and communication shows up as extra
time. Wall time is about ``train_time_s / N``; the run's ``started_at``/``finished_at`` give it.

Evaluation runs once, on rank 0, on the unwrapped model (the others wait at the next
collective). Failures: a rank that raises sends its error and the run fails with it
(:class:`RankFailedError`); a rank that dies (killed, out of memory) fails it too; the other
processes are terminated at once, and every collective has a timeout
(:data:`COLLECTIVE_TIMEOUT_S`) as a last resort. The training processes ignore Ctrl-C (a
terminal sends it to them too): the caller handles it and terminates them. A training process
whose caller is gone (killed) stops at its next step.
"""

from __future__ import annotations

import io
import logging
import math
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_multiprocessing
from torch import nn

from flatminima.engine import Evaluation, SharpnessAwareOptimizer
from flatminima.experiments.config import ConfigError, RunConfig
from flatminima.experiments.data import Dataset
from flatminima.experiments.models import build_model
from flatminima.experiments.runner import (
    EpochMetrics,
    TrainingOutcome,
    _passes_run,
    _weights_are_finite,
    build_base_optimizer,
    evaluate,
    forward_only_measurements,
)
from flatminima.experiments.store import has_diverged
from flatminima.registry import get_method, start_epoch

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 600.0
"""How long a process waits in a collective for the others before it fails the run: a
backstop only (a rank that dies is noticed at once by the caller, which ends the others).
Long enough for rank 0 to evaluate a large test set while the others wait."""

POLL_S = 0.2
"""How often the caller checks that every training process is still alive."""

KILLED_GRACE_S = 1.0
"""How long, after a process reports an error, the caller looks for another one killed by a
signal (the likelier cause: the error may only say that a peer went away)."""

EXIT_GRACE_S = 10.0
"""How long the caller waits for a process that has ended its work to exit (or for the last
message of one that ended) before it terminates it (or fails the run)."""

Fault = Callable[[int, int], None]
"""``fault(rank, epoch)``, called by every process before each epoch: tests inject a failure."""


class RankFailedError(RuntimeError):
    """A training process of a multi-process run raised or died; the message says which."""


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_process_budget(jobs: int, processes: int, cores: int | None = None) -> None:
    """Refuse, with one line, a grid whose training processes would outnumber the cores (each
    training process is single-threaded by default; more than one per core is many times
    slower on a busy machine) or that asks for both ``jobs`` and ``processes`` above 1 (a grid's
    worker processes cannot start processes of their own)."""
    if processes <= 1:
        return
    if jobs > 1:
        raise ConfigError(
            f"--jobs {jobs} with --processes {processes}: a grid of multi-process runs trains "
            "one run at a time (--jobs 1); give each run the cores with --processes"
        )
    cores = available_cores() if cores is None else cores
    if processes > cores:
        raise ConfigError(
            f"--processes must be at most the {cores} CPU core(s) available here, got {processes}"
        )


def shard(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that process ``rank`` of ``world_size``
    trains on: contiguous, sizes as ``torch.tensor_split`` (and micro-batch SAM) cut them."""
    small, extra = divmod(batch_size, world_size)
    start = rank * small + min(rank, extra)
    return slice(start, start + small + (1 if rank < extra else 0))


def train_distributed(
    config: RunConfig,
    data: Dataset,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    *,
    fault: Fault | None = None,
) -> TrainingOutcome:
    """Train ``config`` on ``data`` with ``config.processes`` processes; the same configuration
    gives the same numbers run after run. ``on_epoch`` is called here, in the caller's process,
    as rank 0 reports each epoch. :class:`RankFailedError` when a process fails."""
    world_size = config.processes
    if world_size < 2:
        raise ValueError(f"train_distributed needs processes >= 2, got {world_size}")
    # The data goes to every process as bytes through its pipe, not as tensors: those would
    # travel through /dev/shm, which containers often keep small (64 MB by default in Docker).
    packed = _pack(asdict(data))
    context = torch_multiprocessing.get_context("spawn")
    events = context.Queue()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="flatminima-ddp-") as rendezvous:
        init_method = f"file://{os.path.join(rendezvous, 'rendezvous')}"
        processes = [
            context.Process(
                target=_train_rank,
                args=(rank, config, packed, init_method, events, threads, fault),
                daemon=True,
                name=f"flatminima-rank-{rank}",
            )
            for rank in range(world_size)
        ]
        succeeded = False
        try:
            for process in processes:
                process.start()
            outcome = _follow(processes, events, on_epoch)
            succeeded = True
            return outcome
        finally:
            # After the outcome the others are only leaving the process group: let them;
            # after a failure (or Ctrl-C) end every one at once.
            for rank, process in enumerate(processes):
                process.join(timeout=EXIT_GRACE_S if succeeded else 0)
                if process.is_alive():
                    process.terminate()
                    process.join()
                elif succeeded and process.exitcode != 0:
                    # The outcome is complete (rank 0 sent it whole); say so all the same.
                    logger.warning(
                        "process %d of %d exited with status %s after the run ended",
                        rank,
                        world_size,
                        process.exitcode,
                    )
            events.close()


def _follow(
    processes: list[Any],
    events: Any,
    on_epoch: Callable[[EpochMetrics], None] | None,
) -> TrainingOutcome:
    """Pass rank 0's epochs to ``on_epoch`` until its outcome arrives; fail on the first
    process that reports an error or dies."""
    history: list[EpochMetrics] = []
    ended: str | None = None
    while True:
        try:
            # Once a process has ended, one last wait: what it sent before ending may still be
            # on its way, and its own error says more than its exit status.
            event = events.get(timeout=EXIT_GRACE_S if ended else POLL_S)
        except queue.Empty:
            if ended:
                raise RankFailedError(ended) from None
            ended = _ended_early(processes)
            continue
        kind = event[0]
        if kind == "epoch":
            metrics = EpochMetrics(**event[1])
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
        elif kind == "failed":
            _, rank, message = event
            # A process that was killed makes its peers fail in their next collective ("connection
            # reset by peer"); their error may arrive before its death is seen: name the cause.
            killed = _killed_within(processes, KILLED_GRACE_S)
            raise RankFailedError(killed or f"process {rank} of {len(processes)} failed: {message}")
        else:  # "done"
            _, final, weights = event
            state = torch.load(io.BytesIO(weights), weights_only=True)
            return TrainingOutcome(history, final, state)


def _killed_within(processes: list[Any], seconds: float) -> str | None:
    """Which process was killed by a signal, if one is or becomes so within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        for rank, process in enumerate(processes):
            if process.exitcode is not None and process.exitcode < 0:
                name = signal.Signals(-process.exitcode).name
                return (
                    f"process {rank} of {len(processes)} was killed by {name} before the run ended"
                )
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S / 4)


def _ended_early(processes: list[Any]) -> str | None:
    """Why the run cannot end well (a process died, or all ended without rank 0's outcome),
    or ``None`` while every process is alive or ended cleanly with others still running."""
    for rank, process in enumerate(processes):
        code = process.exitcode
        if code is None or code == 0:
            continue
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with status {code}"
        )
        return f"process {rank} of {len(processes)} {how} before the run ended"
    if all(process.exitcode == 0 for process in processes):
        return "every process exited before rank 0 sent the run's outcome"
    return None


def _train_rank(
    rank: int,
    config: RunConfig,
    packed_data: bytes,
    init_method: str,
    events: Any,
    threads: int,
    fault: Fault | None,
) -> None:
    """A training process: trains its shards, rank 0 sends what the caller records."""
    # Ctrl-C reaches the whole process group: the caller handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= config.processes
        device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=config.processes,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        data = Dataset(**torch.load(io.BytesIO(packed_data), weights_only=True))
        _RankTraining(rank, config, data, device, events, fault).run()
        dist.destroy_process_group()
    except BaseException as error:
        # One line: PyTorch's messages often run on with advice and stack traces.
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")
        events.put(("failed", rank, f"{type(error).__name__}: {first_line}".rstrip(": ")))
        # Flush before exiting: the caller must read this error before the others' (which
        # only say that this process went away).
        events.close()
        events.join_thread()
        os._exit(1)


def _pack(values: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(values, buffer)
    return buffer.getvalue()


class _RankTraining:
    """The training loop of one process: :func:`~flatminima.experiments.runner.train` on a
    shard of every batch, with the epoch's sums reduced over the processes."""

    def __init__(
        self,
        rank: int,
        config: RunConfig,
        data: Dataset,
        device: torch.device,
        events: Any,
        fault: Fault | None,
    ) -> None:
        self.rank = rank
        self.config = config
        self.device = device
        self.events = events
        self.fault = fault
        self.world_size = config.processes
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.data = data
        self.parent = torch_multiprocessing.parent_process()

    def run(self) -> None:
        config, data, world_size = self.config, self.data, self.world_size
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.input_shape, data.num_classes).to(self.device)
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        spec = get_method(config.method)
        optimizer = spec.build(
            build_base_optimizer(config, ddp), model=ddp, **config.hyperparameters
        )
        steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=config.epochs * steps_per_epoch
            )
            if config.schedule == "cosine"
            else None
        )
        criterion = nn.CrossEntropyLoss(reduction="none")
        # The same seed in every process: the same order, each taking its part of every batch.
        shuffle = torch.Generator().manual_seed(config.seed)
        closure_calls = 0
        # Over every process, so far: training seconds, and passes in global batches.
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        diverged_at_epoch = None
        model.train()
        for epoch in range(1, config.epochs + 1):
            if self.fault is not None:
                self.fault(self.rank, epoch)
            started = time.perf_counter()
            loss_sum, work = 0.0, 0.0
            order = torch.randperm(len(data.y_train), generator=shuffle)
            global_batches = order.split(config.batch_size)
            # A method that learns from data outside the step (Sparse SAM's mask) reads the
            # whole batches in every process: each computes the one-process scores, whose sum
            # over the processes picks the same mask as one process does.
            start_epoch(
                optimizer,
                epoch - 1,
                model=ddp,
                loss_fn=criterion,
                batches=lambda global_batches=global_batches: (
                    (self.x_train[b], self.y_train[b]) for b in global_batches
                ),
            )
            shards = [b[shard(len(b), self.rank, world_size)] for b in global_batches]
            for batch, mine in zip(global_batches, shards, strict=True):
                self._stop_if_orphaned()
                inputs, labels = self.x_train[mine], self.y_train[mine]
                # DDP averages the processes' gradients: weighing each process's mean loss by
                # its share makes that average the global batch's mean gradient.
                weight = world_size * len(mine) / len(batch)

                def closure(
                    evaluation: Evaluation | None,
                    inputs: torch.Tensor = inputs,
                    labels: torch.Tensor = labels,
                    weight: float = weight,
                ) -> torch.Tensor:
                    nonlocal closure_calls
                    optimizer.zero_grad(set_to_none=True)
                    rows = None if evaluation is None else evaluation.examples_for(len(labels))
                    if rows is not None:
                        inputs, labels = inputs[rows], labels[rows]
                    losses = criterion(ddp(inputs), labels)
                    if evaluation is None or evaluation.needs_gradient:
                        objective = losses.mean()
                        (objective if weight == 1.0 else objective * weight).backward()
                    closure_calls += 1
                    return losses

                before = _passes_run(optimizer, closure_calls)
                if isinstance(optimizer, SharpnessAwareOptimizer):
                    loss = optimizer.step(closure)
                else:
                    loss = optimizer.step(lambda closure=closure: closure(None).mean())
                # This process's passes ran on its share of the global batch.
                work += (_passes_run(optimizer, closure_calls) - before) * len(mine) / len(batch)
                loss_sum += float(loss.detach()) * len(mine)
                learning_rate = optimizer.param_groups[0]["lr"]
                if scheduler is not None:
                    scheduler.step()
            # This epoch over every process: seconds, passes, and the examples' losses.
            epoch_sums = torch.tensor(
                [time.perf_counter() - started, work, loss_sum],
                dtype=torch.float64,
                device=self.device,
            )
            dist.all_reduce(epoch_sums)
            totals[:2] += epoch_sums[:2]
            stop = torch.zeros(1, device=self.device)
            if self.rank == 0:
                test_loss, test_accuracy = evaluate(
                    model, data.x_test.to(self.device), data.y_test.to(self.device)
                )
                metrics = EpochMetrics(
                    epoch=epoch,
                    train_loss=float(epoch_sums[2]) / len(data.y_train),
                    test_loss=test_loss,
                    test_accuracy=test_accuracy,
                    learning_rate=learning_rate,
                    train_time_s=float(totals[0]),
                    passes=float(totals[1]),
                    **forward_only_measurements(model, data),
                )
                self.events.put(("epoch", asdict(metrics)))
                if has_diverged(metrics.train_loss, metrics.test_loss, _weights_are_finite(model)):
                    stop += 1
            # Rank 0 decides for everyone; this also starts every process's clock together.
            dist.broadcast(stop, src=0)
            if stop.item():
                diverged_at_epoch = epoch
                break
        if self.rank == 0:
            self._send_outcome(
                model,
                spec.passes_per_step(config.hyperparameters),
                totals,
                metrics,
                diverged_at_epoch,
            )

    def _send_outcome(
        self,
        model: nn.Module,
        passes_per_step: int,
        totals: torch.Tensor,
        last: EpochMetrics,
        diverged_at_epoch: int | None,
    ) -> None:
        data = self.data
        x_train = data.x_train.to(self.device)
        _, accuracy_noisy = evaluate(model, x_train, data.y_train.to(self.device))
        _, accuracy_clean = evaluate(model, x_train, data.y_train_clean.to(self.device))
        final = {
            "train_time_s": float(totals[0]),
            "passes": float(totals[1]),
            "passes_per_step": passes_per_step,
            "final_test_accuracy": last.test_accuracy,
            "final_test_loss": last.test_loss,
            "final_train_accuracy_noisy": accuracy_noisy,
            "final_train_accuracy_clean": accuracy_clean,
            "diverged_at_epoch": diverged_at_epoch,
            "final_validation_accuracy": last.validation_accuracy,
        }
        # As bytes, not tensors: a tensor sent through a queue lives in this process's shared
        # memory, which must not depend on this process outliving the caller's read.
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.events.put(("done", final, _pack(state)))

    def _stop_if_orphaned(self) -> None:
        if self.parent is not None and not self.parent.is_alive():
            raise RuntimeError("the process that started the run is gone")
