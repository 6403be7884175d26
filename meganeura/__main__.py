"""`python -m meganeura` runs the command-line interface."""

import sys

from meganeura.cli import main

sys.exit(main())
