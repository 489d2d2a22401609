"""`python -m agelens ...` is `agelens ...` (this file is the `agelens` package's __main__)."""

import sys

from agelens.flows.cli.main import main

sys.exit(main())
