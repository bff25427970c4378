"""`python -m cispo ...` runs the `cispo` command line."""

import sys

from cispo.cli import main

sys.exit(main())
