"""``python -m tools.chaos``: see :mod:`tools.chaos`."""

import sys

from tools.chaos import main

sys.exit(main())
