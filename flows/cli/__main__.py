"""`python -m flows.cli COMMAND ...`: the same as the `ctcompare` console script."""

import sys

from flows.cli import main

sys.exit(main())
