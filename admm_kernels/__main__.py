"""`python -m admm_kernels ...` = `admm-prune ...`."""

import sys

from .cli import main

sys.exit(main())
