"""`python -m tetrispec <command>`, the same as the `tetrispec` script."""

import sys

from tetrispec.cli import main

sys.exit(main())
