"""``python -m flatminima.cli``: the ``flatminima`` command."""

import sys

from flatminima.cli import main

sys.exit(main())
