"""Every Example in the public docstrings runs."""

from __future__ import annotations

import doctest

import pytest

import flatminima.methods.asam
import flatminima.methods.bilateral_sam
import flatminima.methods.fisher_sam
import flatminima.methods.friendly_sam
import flatminima.methods.looksam
import flatminima.methods.momentum_sam
import flatminima.methods.monge_sam
import flatminima.methods.sam
import flatminima.methods.tilted_sam

MODULES = [
    flatminima.methods.sam,
    flatminima.methods.asam,
    flatminima.methods.fisher_sam,
    flatminima.methods.monge_sam,
    flatminima.methods.tilted_sam,
    flatminima.methods.friendly_sam,
    flatminima.methods.looksam,
    flatminima.methods.momentum_sam,
    flatminima.methods.bilateral_sam,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
