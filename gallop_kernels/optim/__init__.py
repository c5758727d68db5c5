"""The optimizer: SparseAdamW, its validation, selection orchestration and checkpoint handling."""

from gallop_kernels.optim.calibration import calibrate
from gallop_kernels.optim.sparse_adamw import SparseAdamW

__all__ = ["SparseAdamW", "calibrate"]
