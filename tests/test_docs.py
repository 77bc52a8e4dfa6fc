"""The documentation's generated pages say what the code says (docs/gen_pages.py)."""

from __future__ import annotations

import importlib.util
import io
import sys
import types
from pathlib import Path

import pytest

from flatminima import methods

GENERATOR = Path(__file__).resolve().parents[1] / "docs" / "gen_pages.py"


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """The generator module, with mkdocs-gen-files replaced by an in-memory file system and
    its ``main()`` not run on import."""
    pages: dict[str, str] = {}

    class Page(io.StringIO):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def __exit__(self, *exc_info: object) -> None:
            pages[self.name] = self.getvalue()

    fake = types.ModuleType("mkdocs_gen_files")
    fake.open = lambda name, mode="w": Page(name)
    source = GENERATOR.read_text().replace("\nmain()\n", "\n")
    module = types.ModuleType("gen_pages")
    saved = sys.modules.get("mkdocs_gen_files")
    sys.modules["mkdocs_gen_files"] = fake
    sys.modules["gen_pages"] = module  # dataclasses look their module up there
    try:
        exec(compile(source, str(GENERATOR), "exec"), module.__dict__)
    finally:
        if saved is None:
            del sys.modules["mkdocs_gen_files"]
        else:
            sys.modules["mkdocs_gen_files"] = saved
    module.pages = pages
    return module


@pytest.mark.parametrize("name", list(methods.BY_NAME))
def test_method_page_lists_every_declared_hyperparameter_with_its_default(generator, name):
    cls = methods.BY_NAME[name]
    page = generator.method_page(generator.method_facts(name, cls))
    for row in cls.declaration:
        assert f"| `{row.name}` | `{row.default!r}` |" in page, row.name
    assert f"passes per step with the defaults: {cls.passes_per_step(None)}" in page
    assert f"flatminima.{cls.__name__}(base_optimizer, *, " in page


def test_manual_form_is_reported_as_the_engine_decides(generator):
    facts = {n: generator.method_facts(n, c) for n, c in methods.BY_NAME.items()}
    assert facts["sam"].manual_two_pass
    assert not facts["tilted-sam"].manual_two_pass


def test_generator_writes_a_page_per_method_and_an_index(generator, monkeypatch):
    monkeypatch.setattr(generator, "sharpness_plots", lambda: None)
    generator.main()
    assert set(generator.pages) == {
        "methods/index.md",
        *(f"methods/{name}.md" for name in methods.BY_NAME),
    }


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (docs extra)"
)
@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    import subprocess

    root = GENERATOR.parents[1]
    env = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, **env},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "methods" / "tilted-sam" / "index.html").exists()
