"""One way to run tasks on worker processes, for training grids and sharpness measurements alike.

:func:`run_tasks` hands ``items`` to ``jobs`` processes (or runs them here when ``jobs`` is 1)
and reports, in the calling process and in order of occurrence, what each task does: it
starts, it reports progress (an epoch), it ends with a result. The caller draws its progress and
writes its summary from those events; the tasks themselves may write the database.

Workers are started with ``spawn``, not ``fork``: a forked copy of a process that already ran
PyTorch's thread pools can deadlock, and spawn behaves the same on every platform. Each worker
ignores Ctrl-C (it reaches the whole process group: the parent handles it and stops the
workers, which would otherwise each print a traceback) and stops taking tasks once its parent
is gone. A worker that dies does not hang the caller: :class:`WorkersExited` says how many
tasks were left. One dead worker is enough to stop the pool, the others with it: killed at
any moment, it may die holding the shared queues' lock, and every other worker would then
block forever on its next report.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

Emit = Callable[[Any], None]
"""What a task calls to report progress (e.g. an epoch's test accuracy) to the caller."""


@dataclass(frozen=True)
class Event:
    kind: str
    """``start``, ``progress`` or ``end``."""
    slot: int
    """The worker (0 … jobs − 1): progress bars show one line per slot."""
    index: int
    """The task's position in ``items``."""
    payload: Any = None
    """``progress``: what the task emitted; ``end``: what it returned."""


class WorkersExited(RuntimeError):
    """A worker process died with tasks left (killed, or out of memory); the others are
    stopped with it."""

    def __init__(self, remaining: int) -> None:
        super().__init__(f"{remaining} task(s): worker processes exited before finishing them")
        self.remaining = remaining


def run_tasks(
    task: Callable[[Any, Any, Emit], Any],
    items: Sequence[Any],
    *,
    jobs: int,
    setup: Callable[..., AbstractContextManager[Any]],
    setup_args: tuple[Any, ...] = (),
    on_event: Callable[[Event], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Call ``task(context, item, emit)`` for every item, ``context`` being what
    ``setup(*setup_args)`` yields once per process (a database connection, the thread count),
    and pass every :class:`Event` to ``on_event`` here. After each task's end, ``should_stop()``
    true stops everything: no further task starts and the workers are terminated. ``task``,
    ``setup`` and the items must be picklable (module-level functions) when ``jobs > 1``."""
    workers = max(1, min(jobs, len(items)))
    if workers == 1:
        with setup(*setup_args) as context:
            for index, item in enumerate(items):
                on_event(Event("start", 0, index))

                def emit(payload: Any, index: int = index) -> None:
                    on_event(Event("progress", 0, index, payload))

                on_event(Event("end", 0, index, task(context, item, emit)))
                if should_stop():
                    return
        return
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue()
    events = context.Queue()
    for index, item in enumerate(items):
        tasks.put((index, item))
    for _ in range(workers):
        tasks.put(None)
    processes = [
        context.Process(
            target=_serve, args=(slot, task, setup, setup_args, tasks, events), daemon=True
        )
        for slot in range(workers)
    ]
    for process in processes:
        process.start()
    remaining = len(items)
    try:
        while remaining:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                # A second of silence: whatever the workers had sent has been read. A worker
                # that died (not one that finished its share) may hold the events queue's lock.
                died = any(process.exitcode not in (None, 0) for process in processes)
                if died or not any(process.is_alive() for process in processes):
                    raise WorkersExited(remaining) from None
                continue
            on_event(event)
            if event.kind == "end":
                remaining -= 1
                if should_stop():
                    return  # the `finally` below terminates the workers
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()


def _serve(
    slot: int,
    task: Callable[[Any, Any, Emit], Any],
    setup: Callable[..., AbstractContextManager[Any]],
    setup_args: tuple[Any, ...],
    tasks: multiprocessing.Queue,  # type: ignore[type-arg]
    events: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    """A worker process: runs the tasks it takes from ``tasks`` until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    with setup(*setup_args) as context:
        while (next_task := tasks.get()) is not None:
            if parent is not None and not parent.is_alive():
                break  # the caller was killed: leave the rest to the next attempt
            index, item = next_task
            events.put(Event("start", slot, index))

            def emit(payload: Any, index: int = index) -> None:
                events.put(Event("progress", slot, index, payload))

            events.put(Event("end", slot, index, task(context, item, emit)))
