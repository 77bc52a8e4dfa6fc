"""The scripts in examples/ run and show what they claim."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_manual_forms_example_reaches_the_same_weights_three_ways(capsys):
    runpy.run_path(str(EXAMPLES / "manual_forms.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert all(line.endswith(": True") for line in lines), lines
