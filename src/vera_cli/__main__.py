"""``python -m vera_cli``."""

import sys

from vera_cli.main import main

sys.exit(main())
