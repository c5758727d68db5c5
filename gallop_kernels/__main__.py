"""``python -m gallop_kernels ...`` runs the ``gallop`` command."""

import sys

from gallop_kernels.cli import main

sys.exit(main())
