"""``python -m lpucore``: the command line (see :mod:`lpucore.cli`)."""

import sys

from lpucore.cli import main

if __name__ == "__main__":
    sys.exit(main())
