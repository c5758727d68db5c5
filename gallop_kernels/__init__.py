"""gallop_kernels: exact GaLLoP sparse selection and a sparse AdamW that keeps state only for it."""

from gallop_kernels.optim import SparseAdamW

__all__ = ["SparseAdamW", "__version__"]
__version__ = "0.1.0"
