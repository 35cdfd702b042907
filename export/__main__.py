"""``python -m export``: see :mod:`export.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
