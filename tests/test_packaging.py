"""The package as users install it: requirements, what importing needs, the wheel and the sdist.

The fast tests read the project's files and run small subprocesses. The slow ones (run by
``.ci/run``) build the wheel and the sdist, install them into fresh virtual environments and run
the optimizer tests there, with nothing but torch and pytest installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip(
    "tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib"
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXPERIMENT_MODULES = ["numpy", "matplotlib", "scipy", "sklearn", "mnist1d", "tqdm"]
OPTIMIZER_TESTS = ["tests/conformance", "tests/methods", "tests/reference", "tests/sharpness"]
NEEDS_THE_EXPERIMENTS_EXTRA = [
    "--ignore=tests/methods/test_examples.py",  # trains on scikit-learn's digits
    "--ignore=tests/conformance/test_optimizer_robustness.py",  # numpy scalars, imported at the top
    "--ignore=tests/sharpness/test_sharpness_plots.py",  # matplotlib
    "--deselect=tests/sharpness/test_sharpness_examples.py::test_docstring_examples"
    "[flatminima.sharpness.plots]",
]


def _run_python(code: str, python: str = sys.executable, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


# Makes the experiment runner's packages unimportable: ``import numpy`` raises
# ModuleNotFoundError, which is exactly what torch checks for when numpy is optional.
_BLOCK = f"import sys\nfor name in {EXPERIMENT_MODULES!r}:\n    sys.modules[name] = None\n"


def test_core_requirement_is_a_torch_range_and_nothing_else():
    (requirement,) = PYPROJECT["project"]["dependencies"]
    assert re.fullmatch(r"torch>=\d+\.\d+(\.\d+)?", requirement), requirement


def test_extras_hold_the_runner_and_the_integrations():
    extras = PYPROJECT["project"]["optional-dependencies"]
    experiments = {re.split(r"[<>=!~\[ ]", r)[0] for r in extras["experiments"]}
    assert experiments == {
        "numpy", "tqdm", "matplotlib", "scikit-learn", "scipy", "mnist1d", "tomli"
    }  # fmt: skip
    # tomli only where tomllib is missing (Python 3.10): study files are TOML.
    assert "tomli>=1.1; python_version < '3.11'" in extras["experiments"]
    for extra in ("lightning", "transformers", "accelerate", "ray", "docs", "test"):
        assert extras[extra], extra
    # No extra may pin torch: the exact pin lives in scripts/constraints.txt only.
    assert not any(r.startswith("torch") for reqs in extras.values() for r in reqs)


def test_install_script_pins_torch_through_the_constraints_file():
    script = (ROOT / "scripts" / "install.sh").read_text()
    constraints = (ROOT / "scripts" / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", constraints, re.MULTILINE)
    assert "-c scripts/constraints.txt torch" in script
    assert '-c scripts/constraints.txt -e ".[experiments,test,lightning,transformers' in script


def test_license_file_is_the_declared_apache_2():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_readme_links_work_from_a_package_page():
    """The README is the package page's text: a link relative to the repository breaks there."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r'href="([^"]+)"', readme)
    relative = [t for t in targets if not re.match(r"(https?://|#)", t)]
    assert not relative, f"README links that only work inside the repository: {relative}"


def test_import_needs_torch_alone():
    """The optimizers and the sharpness tools import and step with every runner package
    unimportable (torch itself treats numpy as optional)."""
    code = _BLOCK + (
        "import torch, flatminima, flatminima.sharpness, flatminima.registry\n"
        "import flatminima.amp, flatminima.accumulation, flatminima.integrations\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(3, 1)\n"
        "optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)\n"
        "def closure():\n"
        "    loss = model(torch.randn(4, 3)).pow(2).mean()\n"
        "    loss.backward()\n"
        "    return loss\n"
        "optimizer.step(closure)\n"
        f"loaded = [n for n in {EXPERIMENT_MODULES!r} if sys.modules.get(n) is not None]\n"
        "print('loaded:', loaded)\n"
    )
    result = _run_python(code, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


def test_command_line_without_the_runner_packages_names_the_extra():
    code = _BLOCK + "from flatminima.__main__ import main\nraise SystemExit(main(['methods']))\n"
    result = _run_python(code, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'flatminima[experiments]'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "package", "extra"),
    [
        ("lightning", "pytorch_lightning", "lightning"),
        ("transformers", "transformers", "transformers"),
        ("accelerate", "accelerate", "accelerate"),
    ],
)
def test_an_integration_without_its_framework_names_the_extra(module, package, extra):
    code = f"import sys\nsys.modules[{package!r}] = None\nimport flatminima.integrations.{module}\n"
    result = _run_python(code)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"pip install 'flatminima[{extra}]'" in last


def test_the_script_entry_point_is_the_guarded_main():
    assert PYPROJECT["project"]["scripts"]["flatminima"] == "flatminima.__main__:main"


# -- the built artefacts (slow: a build and fresh virtual environments) ----------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def _fresh_venv(path: Path) -> str:
    venv.EnvBuilder(with_pip=True).create(path)
    return str(path / "bin" / "python")


# The venvs must see their own packages only: no PYTHONPATH pointing at src/.
_VENV_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _venv_run(python: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, *args], capture_output=True, text=True, timeout=900, env=_VENV_ENV, **kwargs
    )


def _pip_install(python: str, *args: str) -> subprocess.CompletedProcess:
    return _venv_run(
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args, check=True
    )


def _planned_installs(python: str, *requirements: str) -> list[str]:
    """The distributions pip would install for ``requirements`` (a dry run)."""
    plan = _venv_run(
        python,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--report",
        "-",
        *requirements,
        check=True,
    )
    return sorted(item["metadata"]["name"] for item in json.loads(plan.stdout)["install"])


@pytest.mark.slow
def test_wheel_requires_torch_as_a_range_and_ships_the_license(dist):
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert unconditional == ["torch>=2.13"], requires
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # The demo's study files, which `flatminima demo` reads.
    assert {"flatminima/studies/demo.toml", "flatminima/studies/demo-quick.toml"} <= set(names)


@pytest.mark.slow
@pytest.mark.parametrize("artefact", ["*.whl", "*.tar.gz"])
def test_artefact_installs_into_a_fresh_venv_where_the_optimizer_tests_pass(
    dist, tmp_path, artefact
):
    """torch first (as a user who has one), then the package: pip leaves that torch alone, and
    the optimizer tests pass on the installed copy with nothing but torch and pytest."""
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-c", str(ROOT / "scripts" / "constraints.txt"), "torch", "pytest")
    torch_before = _venv_run(python, "-c", "import torch; print(torch.__version__)").stdout
    (package,) = dist.glob(artefact)
    assert _planned_installs(python, str(package)) == ["flatminima"]
    _pip_install(python, str(package))
    assert _venv_run(python, "-c", "import torch; print(torch.__version__)").stdout == torch_before

    probe = (
        "import importlib.util, flatminima; print(flatminima.__file__); "
        f"print([n for n in {EXPERIMENT_MODULES!r} if importlib.util.find_spec(n)])"
    )
    where, installed_extras = _venv_run(python, "-c", probe, check=True).stdout.splitlines()
    assert where.startswith(str(tmp_path / "venv")), where
    assert installed_extras == "[]"
    result = _venv_run(
        python,
        "-m",
        "pytest",
        "-q",
        "-x",
        *OPTIMIZER_TESTS,
        *NEEDS_THE_EXPERIMENTS_EXTRA,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.slow
def test_installing_the_wheel_keeps_a_different_torch_version(dist, tmp_path):
    """A venv holding another torch release than the one CI tests (a stand-in distribution
    record, torch 2.14.0): pip would install flatminima alone, keeping that torch."""
    python = _fresh_venv(tmp_path / "venv")
    site = Path(
        _venv_run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).stdout.strip()
    )
    record = site / "torch-2.14.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.0\n")
    (record / "INSTALLER").write_text("pip\n")
    (record / "RECORD").write_text("")
    (wheel,) = dist.glob("*.whl")
    assert _planned_installs(python, str(wheel)) == ["flatminima"]
