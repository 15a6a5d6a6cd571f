"""``python -m markovmem``: the same as the ``markovmem`` command."""

import sys

from .cli import main

sys.exit(main())
