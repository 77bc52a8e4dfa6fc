"""``python -m flatminima``: the same command line as the ``flatminima`` script."""

from flatminima.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
