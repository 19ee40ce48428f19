"""``python -m slimta``: the ``slimta`` command."""

import sys

from slimta.cli import main

if __name__ == "__main__":
    sys.exit(main())
