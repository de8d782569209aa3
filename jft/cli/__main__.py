"""`python -m jft.cli ...`: the `jft` command (host_memory re-executes it this way)."""

import sys

from jft.cli import main

sys.exit(main())
