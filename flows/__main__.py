"""`python -m flows ...` is `agelens ...`."""

import sys

from flows.cli import main

sys.exit(main())
