"""``python -m gallop_kernels.memory --config llama3-8b``: the memory report (see report.py)."""

import sys

from gallop_kernels.memory.report import main

sys.exit(main())
