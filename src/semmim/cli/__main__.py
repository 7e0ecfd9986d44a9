"""``python -m semmim.cli``: the ``semmim`` command line."""

import sys

from semmim.cli import main

sys.exit(main())
