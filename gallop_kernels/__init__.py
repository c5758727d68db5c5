"""gallop_kernels: exact GaLLoP sparse selection and a sparse AdamW that keeps state only for it."""

from gallop_kernels.optim import SparseAdamW
from gallop_kernels.phase_one import calibrate

__all__ = ["SparseAdamW", "calibrate", "__version__"]
__version__ = "0.1.0"
