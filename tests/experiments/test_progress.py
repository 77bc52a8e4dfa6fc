"""Progress on a terminal is bars; anywhere else plain lines, one per finished item."""

from __future__ import annotations

import io

from flatminima.experiments.progress import CountProgress, GridProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_grid_progress_is_one_plain_line_per_run_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = GridProgress(total=3, done=1, workers=2, enabled=True, stream=stream)
    progress.start(0, "sam ρ=0.1 seed=0", epochs=2)
    progress.start(1, "base seed=0", epochs=2)
    for accuracy in (0.25, 0.5):
        progress.epoch(0, accuracy)
    progress.epoch(1, 0.125)
    progress.end(0, "finished")
    progress.end(1, "failed")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "[2/3] sam ρ=0.1 seed=0: finished after 2 epoch(s), test accuracy 0.500",
        "[3/3] base seed=0: failed after 1 epoch(s), test accuracy 0.125",
    ]


def test_progress_draws_bars_on_a_terminal_and_nothing_when_disabled() -> None:
    terminal = Terminal()
    progress = GridProgress(total=1, done=0, workers=1, enabled=True, stream=terminal)
    progress.start(0, "sam seed=0", epochs=1)
    progress.epoch(0, 0.5)
    progress.end(0, "finished")
    progress.close()
    assert "\r" in terminal.getvalue() and "[1/1]" not in terminal.getvalue()

    quiet = io.StringIO()
    for disabled in (
        GridProgress(total=1, done=0, workers=1, enabled=False, stream=quiet),
        CountProgress(1, "sharpness", enabled=False, stream=quiet),
    ):
        if isinstance(disabled, GridProgress):
            disabled.start(0, "x", 1)
            disabled.end(0, "finished")
        else:
            disabled.advance("x", "measured")
        disabled.close()
    assert quiet.getvalue() == ""


def test_count_progress_is_one_plain_line_per_item_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = CountProgress(2, "sharpness", enabled=True, stream=stream)
    progress.advance("sam ρ=0.1 seed=0 [0123abcd]", "measured")
    progress.advance("base seed=0 [4567ef01]", "failed")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "[1/2] sharpness sam ρ=0.1 seed=0 [0123abcd]: measured",
        "[2/2] sharpness base seed=0 [4567ef01]: failed",
    ]
    terminal = Terminal()
    bar = CountProgress(1, "sharpness", enabled=True, stream=terminal)
    bar.advance("x", "measured")
    bar.close()
    assert "\r" in terminal.getvalue() and "[1/1]" not in terminal.getvalue()
