"""The integration recipes in examples/ (shown on the documentation site) run and show what
they claim: every line they print ends in ': True'."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RECIPES = {
    "mixed_precision.py": None,
    "gradient_accumulation.py": None,
    "compile_recipe.py": None,
    "lightning_recipe.py": "pytorch_lightning",
    "accelerate_recipe.py": "accelerate",
    "hf_trainer_recipe.py": "transformers",
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_and_shows_what_it_claims(recipe, capsys):
    needs = RECIPES[recipe]
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    if needs in ("accelerate", "transformers"):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    runpy.run_path(str(EXAMPLES / recipe), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "the recipe printed nothing"
    assert all(line.endswith(": True") for line in lines), lines
