"""The one worker pool of training and measuring: the same events in one process or several,
and a lost worker reported instead of waited for."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from flatminima.experiments.workers import Emit, Event, WorkersExited, run_tasks


@contextmanager
def _offset(value: int) -> Iterator[int]:
    yield value


def _square_plus(offset: int, item: int, emit: Emit) -> int:
    for step in range(item % 3):
        emit(step)
    return item * item + offset


def _die_on_three(offset: int, item: int, emit: Emit) -> int:
    if item == 3:
        os._exit(1)  # a worker killed mid-task (out of memory, kill -9)
    return item


def _collect(jobs: int, task: Any = _square_plus, items: range = range(6)) -> list[Event]:
    events: list[Event] = []
    run_tasks(task, list(items), jobs=jobs, setup=_offset, setup_args=(10,), on_event=events.append)
    return events


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_task_starts_reports_progress_and_ends_with_its_result(jobs: int) -> None:
    events = _collect(jobs)
    ends = {event.index: event.payload for event in events if event.kind == "end"}
    assert ends == {index: index * index + 10 for index in range(6)}
    for index in range(6):
        mine = [event for event in events if event.index == index]
        assert [event.kind for event in mine] == ["start", *["progress"] * (index % 3), "end"]
        assert [event.payload for event in mine if event.kind == "progress"] == list(
            range(index % 3)
        )
        assert len({event.slot for event in mine}) == 1 and mine[0].slot < jobs


def test_a_worker_that_dies_is_reported_not_waited_for() -> None:
    with pytest.raises(WorkersExited, match=r"task\(s\): worker processes exited") as raised:
        _collect(2, task=_die_on_three, items=range(8))
    assert 1 <= raised.value.remaining <= 7
