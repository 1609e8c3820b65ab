"""``python -m tools.bench``: see ``tools.bench._cli``."""

import sys

from tools.bench._cli import main

sys.exit(main())
