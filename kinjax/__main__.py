"""``python -m kinjax`` runs the ``kinjax`` command."""

import sys

from kinjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
