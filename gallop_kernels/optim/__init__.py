"""The optimizer: SparseAdamW, its validation, selection orchestration and checkpoint handling."""

from gallop_kernels.optim.sparse_adamw import SparseAdamW
from gallop_kernels.optim.unwrap import unwrap_optimizer

__all__ = ["SparseAdamW", "unwrap_optimizer"]
