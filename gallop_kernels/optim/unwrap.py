"""Find the SparseAdamW inside the wrappers that training frameworks put around optimizers."""

from __future__ import annotations

from typing import Any

from gallop_kernels.optim.sparse_adamw import SparseAdamW

MAX_WRAPPERS = 8


def unwrap_optimizer(optimizer: Any) -> SparseAdamW:
    """The SparseAdamW inside an accelerate/DeepSpeed wrapper (or the optimizer itself).

    Raises ``TypeError`` naming the fix when there is none (the Trainer was given another
    optimizer).
    """
    seen = 0
    while not isinstance(optimizer, SparseAdamW) and hasattr(optimizer, "optimizer") and seen < MAX_WRAPPERS:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, SparseAdamW):
        raise TypeError(
            f"GaLLoP needs a SparseAdamW optimizer, got {type(optimizer).__name__}: pass "
            "optimizer_cls_and_kwargs=gallop_optimizer_cls_and_kwargs(args, ...) to the Trainer"
        )
    return optimizer
