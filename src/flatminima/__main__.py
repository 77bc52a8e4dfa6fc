"""``python -m flatminima`` and the ``flatminima`` script: :mod:`flatminima.cli`'s command line.

The optimizers need torch alone; the command line runs the experiment runner, whose packages
(numpy, matplotlib, ...) come with the ``experiments`` extra. Without them the command says so
in one line instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXPERIMENT_PACKAGES = frozenset({"numpy", "tqdm", "matplotlib", "sklearn", "scipy", "mnist1d"})
"""Top-level modules of the ``flatminima[experiments]`` extra (import names, not pip names)."""

INSTALL_HINT = "pip install 'flatminima[experiments]'"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from flatminima.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in EXPERIMENT_PACKAGES:
            raise
        print(
            f"flatminima: error: the command line needs the experiment runner's packages "
            f"({missing} is not installed): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
