"""``python -m shared.cli`` is ``mnistctl``."""

import sys

from shared.cli import main

sys.exit(main())
