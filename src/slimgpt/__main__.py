"""``python -m slimgpt`` (and ``torchrun -m slimgpt``): the command line."""

import sys

from slimgpt.cli import main

sys.exit(main())
