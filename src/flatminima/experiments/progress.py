"""Progress of a grid or of a batch of measurements, on stderr: live bars on a terminal, plain
lines (one per finished item, no escape codes) when stderr is a file or a pipe, nothing when
disabled. The runner and the sharpness measurements report through these two classes and never
draw anything themselves.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class GridProgress:
    """One bar for the grid's runs and one per worker for the current run's epochs; as plain
    lines, one line when each run ends."""

    def __init__(
        self, total: int, done: int, workers: int, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bars = enabled and _interactive(self.stream)
        self.total, self.done = total, done
        self.labels = [""] * workers
        self.accuracy: list[float | None] = [None] * workers
        self.epochs = [0] * workers
        if not self.bars:
            return
        self.overall = tqdm(
            total=total, initial=done, desc="runs", unit="run", position=0, file=self.stream
        )
        self.slots = [
            tqdm(
                total=0, desc="idle", unit="epoch", position=1 + slot, leave=False, file=self.stream
            )
            for slot in range(workers)
        ]

    def start(self, slot: int, label: str, epochs: int) -> None:
        self.labels[slot], self.accuracy[slot], self.epochs[slot] = label, None, 0
        if self.bars:
            bar = self.slots[slot]
            bar.reset(total=epochs)
            bar.set_description(label)

    def epoch(self, slot: int, test_accuracy: float) -> None:
        self.accuracy[slot] = test_accuracy
        self.epochs[slot] += 1
        if self.bars:
            self.slots[slot].set_postfix(test_acc=f"{test_accuracy:.3f}", refresh=False)
            self.slots[slot].update(1)

    def end(self, slot: int, status: str) -> None:
        self.done += 1
        if self.bars:
            # The slot's bar keeps the finished run's label at 100% until its next run starts.
            self.overall.update(1)
        elif self.enabled:
            accuracy = self.accuracy[slot]
            detail = f", test accuracy {accuracy:.3f}" if accuracy is not None else ""
            print(
                f"[{self.done}/{self.total}] {self.labels[slot]}: {status} after "
                f"{self.epochs[slot]} epoch(s){detail}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bars:
            for bar in self.slots:
                bar.close()
            self.overall.close()


class CountProgress:
    """A count of items done (``sharpness 3/12``): a bar, or a line per item."""

    def __init__(self, total: int, what: str, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total, self.done, self.what = total, 0, what
        self.bar = (
            tqdm(total=total, desc=what, unit="run", file=self.stream)
            if enabled and _interactive(self.stream)
            else None
        )

    def advance(self, label: str, status: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(
                f"[{self.done}/{self.total}] {self.what} {label}: {status}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
