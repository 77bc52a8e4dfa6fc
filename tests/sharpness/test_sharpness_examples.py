"""Every docstring Example of flatminima.sharpness runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "flatminima.sharpness.hessian",
    "flatminima.sharpness.msharpness",
    "flatminima.sharpness.landscape",
    "flatminima.sharpness.plots",
    "flatminima.sharpness.measure",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
