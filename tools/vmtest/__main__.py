"""``python -m tools.vmtest``: the same as ``tools/vm-test``."""

import sys

from tools.vmtest._run import main

sys.exit(main())
