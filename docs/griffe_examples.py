"""A griffe extension for the API reference: flatminima's docstrings title their doctests
``Example:`` (singular), which the Google-style parser reads as an admonition of Markdown
prose; renamed ``Examples:`` they render as code blocks."""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example(?: \([^)]*\))?:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
