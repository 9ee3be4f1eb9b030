"""``python -m lowbitsr`` is the ``lowbitsr`` command."""

import sys

from .cli import main

sys.exit(main())
