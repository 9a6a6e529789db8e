"""python -m fastalex: the `fastalex` command."""

import sys

from fastalex.cli import main

sys.exit(main())
