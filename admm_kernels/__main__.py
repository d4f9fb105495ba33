"""`python -m admm_kernels ...` = `admm-prune ...` (SPEC §2)."""

import sys

from .cli import main

sys.exit(main())
