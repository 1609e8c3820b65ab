import sys

from blockfs.cli import main

sys.exit(main())
