"""``python -m ktlab`` = the ``ktlab`` command."""

import sys

from ktlab.cli import main

sys.exit(main())
