"""``python -m slimgpt.cli``."""

import sys

from slimgpt.cli import main

sys.exit(main())
