"""``python -m gali ...`` = ``gali ...``; torchrun starts each rank this way: ``torchrun -m gali train ...``."""

import sys

from gali.engine.cli import main

sys.exit(main())
