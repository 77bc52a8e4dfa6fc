"""Each method's hyperparameters are declared once; everything else is derived from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import flatminima
from flatminima import methods, registry
from records import RECORDS

by_record = pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
README = Path(__file__).resolve().parents[2] / "README.md"


@by_record
def test_constructor_defaults_equal_the_declaration(record):
    signature = inspect.signature(record.cls.__init__)
    declared = {row.name: row.default for row in record.cls.declaration}
    from_signature = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name in declared
    }
    assert from_signature == declared
    assert record.cls.hyperparameter_defaults == declared


@by_record
def test_docstring_carries_the_generated_symbol_table(record):
    doc = record.cls.__doc__
    assert "{hyperparameters}" not in doc
    for row in record.cls.declaration:
        assert f"``{row.name}``" in doc
        assert row.symbol in doc


@by_record
def test_registry_entry_is_the_declaration(record):
    name = next(key for key, cls in methods.BY_NAME.items() if cls is record.cls)
    spec = registry.get_method(name)
    assert dict(spec.hyperparameters) == record.cls.hyperparameter_defaults
    assert "\n" not in spec.summary and spec.summary.endswith(".")


def test_every_exported_method_has_a_record():
    assert {record.cls for record in RECORDS} == set(methods.BY_NAME.values())
    assert all(cls.__name__ in flatminima.__all__ for cls in methods.BY_NAME.values())


def test_readme_method_table_is_the_generated_one():
    assert registry.readme_method_table() in README.read_text(encoding="utf-8"), (
        "regenerate the README's table with `python -m flatminima.registry`"
    )


@by_record
def test_each_declared_check_refuses_a_bad_value_with_the_argument_named(record):
    """Every declared hyperparameter refuses a string, naming itself (numpy scalars are
    accepted: tested in test_engine_program.py)."""
    for row in record.cls.declaration:
        with pytest.raises(ValueError, match=rf"^{row.name} must be"):
            row.check(row.name, "bad")


@by_record
def test_declared_memory_is_the_records(record):
    assert record.cls.memory_copies == record.memory_copies
