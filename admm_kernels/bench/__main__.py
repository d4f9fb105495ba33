"""`python -m admm_kernels.bench ...` = `admm-prune bench ...`."""

import sys

from . import main

sys.exit(main())
