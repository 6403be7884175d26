"""`python -m meganeura` is the `meganeura` command."""

import sys

from meganeura.cli import main

sys.exit(main())
