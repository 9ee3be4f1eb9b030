"""``python -m lowbitsr.cli``: the ``lowbitsr`` command."""

import sys

from . import main

sys.exit(main())
