"""`python -m batch_runner.run.warm`: start the warm server."""

import sys

from batch_runner.run.warm.server import main

sys.exit(main())
