"""`python -m infinisim.cli`: the same as the `infinisim` command."""

import sys

from infinisim.cli import main

sys.exit(main())
