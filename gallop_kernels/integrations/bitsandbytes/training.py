"""The optimizer of the sparse-delta representation: plain AdamW over the delta values."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gallop_kernels.integrations.bitsandbytes.layer import delta_parameters


def delta_optimizer(model: nn.Module, lr: float = 1e-4, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the delta values (fused where the device supports it).

    The delta values *are* the selected entries, so plain AdamW is the right optimizer: its state
    is fp32 ``exp_avg`` and ``exp_avg_sq``, 8 bytes per selected entry (+ the 4-byte value and
    4-byte index the module holds). `SparseAdamW(density=1.0)` works too and gives the same
    update (`docs/design.md#sparse-update`), but would keep a redundant int32 index per entry.

    Note that weight decay here shrinks Δ towards the pre-trained base (as LoRA/SpIEL do), not
    the full weight W + Δ towards zero as `SparseAdamW` on a dense model would.
    """
    params = [p for _, p in delta_parameters(model)]
    if not params:
        raise ValueError("the model has no non-empty sparse delta; run select_sparse_delta first")
    if "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = params[0].device.type in ("cuda", "cpu", "xpu", "mps")
    return torch.optim.AdamW(params, lr=lr, **kwargs)
