"""Runs a flatminima method beside its authors' code and prints how far the weights drift apart.

    python scripts/compare_with_authors.py --method NAME --authors-dir FOLDER

The authors' code is not part of this repository: fetch it yourself and point ``--authors-dir``
at the folder that holds it (it is imported from there at run time). Each family's module in
``scripts/authors/`` says which repository, commit and files it expects, and which known
problems of the authors' code each case runs with and without.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = ("gsam_wsam", "momentum_family", "esam", "sparse_sam")
"""The modules of ``scripts/authors/``."""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = [importlib.import_module(f"authors.{name}") for name in FAMILIES]
    known = {method: module for module in modules for method in module.METHODS}
    method = argv[argv.index("--method") + 1] if "--method" in argv[:-1] else None
    if method not in known:
        sys.exit(f"--method must be one of {', '.join(sorted(known))}, got {method!r}")
    known[method].main(argv)


if __name__ == "__main__":
    main()
