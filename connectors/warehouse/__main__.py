"""``python -m connectors.warehouse``: run the embedded warehouse (see ``cli.py``)."""

import sys

from connectors.warehouse.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
