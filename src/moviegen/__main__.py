"""`python -m moviegen ...` (also what `torchrun -m moviegen` runs)."""

import sys

from moviegen.cli import main

sys.exit(main())
