"""`python -m qwenkit` runs the `qwenkit` command."""

import sys

from qwenkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
