"""``python -m gallop_kernels.finetune ...``: the same as ``gallop finetune ...``."""

import sys

from gallop_kernels.cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
