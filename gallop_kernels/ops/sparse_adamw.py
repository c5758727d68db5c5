"""Launcher for the fused multi-tensor sparse AdamW step.

The update of `docs/design.md#sparse-update`, kernel 4 of `docs/design.md#kernels`.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import triton.language as tl

from gallop_kernels.ops.triton.sparse_adamw import (
    F_COUNT, F_EXP_AVG, F_EXP_AVG_SQ, F_GRAD, F_INDEX, F_MASTER, F_PARAM, F_START, NF,
    sparse_adamw_kernel,
)

__all__ = ["triton_sparse_adamw_step"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256 if _INTERPRET else 1024
NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {
    torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
    torch.int32: tl.int32, torch.int64: tl.int64,
}


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _log_slots(n: int) -> int:
    return max(1, math.ceil(math.log2(n)) + 1) if n > 1 else 0


def _check_state(t, what, i, count, device, dtype=torch.float32):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} of tensor #{i} is not a tensor")
    if t.dtype != dtype:
        raise TypeError(f"{what} of tensor #{i} has dtype {t.dtype}; expected {dtype}")
    if t.device != device:
        raise ValueError(f"{what} of tensor #{i} is on {t.device}, expected {device}")
    if t.numel() != count:
        raise ValueError(f"{what} of tensor #{i} has {t.numel()} entries, expected {count}")
    if not t.is_contiguous():
        raise ValueError(f"{what} of tensor #{i} is not contiguous (it is updated in place)")


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device} (or set TRITON_INTERPRET=1 before "
            f"importing triton to run them on the CPU)"
        )


def check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")


def check_param_grad_indices(i: int, p, g, idx, device: torch.device) -> bool:
    """Validate one tensor's param, gradient and indices; returns whether the grad is compact."""
    if not isinstance(p, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise TypeError(f"param and indices of tensor #{i} must be tensors")
    if p.device != device:
        raise ValueError(f"param #{i} is on {p.device}, expected {device}")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"param #{i} has dtype {p.dtype}; expected float32, bfloat16 or float16")
    if not p.is_contiguous():
        raise ValueError(f"param #{i} is not contiguous (it is updated in place)")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices of tensor #{i} have dtype {idx.dtype}; expected int32 or int64")
    if idx.device != device:
        raise ValueError(f"indices of tensor #{i} are on {idx.device}, expected {device}")
    if idx.dim() != 1 or not idx.is_contiguous():
        raise ValueError(f"indices of tensor #{i} must be a contiguous 1-D tensor")
    count = idx.numel()
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grad of tensor #{i} is not a tensor")
    if g.is_sparse:
        raise TypeError(f"grad of tensor #{i} is sparse; dense gradients only")
    if g.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad of tensor #{i} has dtype {g.dtype}; expected float32, bfloat16 or float16")
    if g.device != device:
        raise ValueError(f"grad of tensor #{i} is on {g.device}, expected {device}")
    if not g.is_contiguous():
        raise ValueError(f"grad of tensor #{i} is not contiguous")
    compact = g.numel() == count and g.numel() != p.numel()
    if g.numel() != p.numel() and not compact:
        raise ValueError(
            f"grad of tensor #{i} has {g.numel()} entries; expected the param's {p.numel()} "
            f"(dense) or the {count} selected ones (gathered)"
        )
    return compact


def adamw_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> tuple[float, ...]:
    """The kernels' scalar arguments, as torch rounds them: Python doubles, then float32."""
    bias_correction1 = 1.0 - beta1**step
    return (
        1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        math.sqrt(1.0 - beta2**step), -lr / bias_correction1, eps,
    )


def launch_table(
    launches: dict[tuple, list[tuple[list[int], int]]], nf: int, f_start: int, block: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[tuple[tuple, int, int, int]]]:
    """One int64 table for every launch: per launch key, rows of ``nf`` fields whose ``f_start``
    field is filled with the row's first program (``block`` entries per program).

    ``launches`` maps a key to (row, count) pairs. Returns the table on ``device`` and, per key,
    (key, first row, number of rows, number of programs).
    """
    values: list[int] = []
    specs = []
    for key, members in launches.items():
        row0, start = len(values) // nf, 0
        for row, count in members:
            row = list(row)
            row[f_start] = start
            values.extend(row)
            start += -(-count // block)
        specs.append((key, row0, len(members), start))
    return _upload(values, device), specs


def triton_sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on the selected entries of every tensor, in place; matches
    ``reference.sparse_adamw_step`` for each. ``grads[i]`` is the dense gradient (param's shape,
    any float dtype) or the gathered gradient of the selected entries (``indices[i].numel()``
    values), as in the reference. No host synchronisation."""
    lists = [list(x) for x in (params, grads, indices, exp_avgs, exp_avg_sqs, masters)]
    params, grads, indices, exp_avgs, exp_avg_sqs, masters = lists
    if len({len(x) for x in lists}) != 1:
        raise ValueError("params, grads, indices, exp_avgs, exp_avg_sqs and masters differ in length")
    if not params:
        return
    check_step(step)
    device = params[0].device
    check_device(device)
    block = int(BLOCK)
    launches: dict[tuple, list[tuple[list[int], int]]] = {}
    for i, (p, g, idx, m, v, w) in enumerate(zip(*lists)):
        compact = check_param_grad_indices(i, p, g, idx, device)
        count = idx.numel()
        _check_state(m, "exp_avg", i, count, device)
        _check_state(v, "exp_avg_sq", i, count, device)
        if w is not None:
            _check_state(w, "master", i, count, device)
        if count == 0:
            continue
        row = [0] * NF
        row[F_PARAM], row[F_GRAD], row[F_INDEX] = p.data_ptr(), g.data_ptr(), idx.data_ptr()
        row[F_EXP_AVG], row[F_EXP_AVG_SQ] = m.data_ptr(), v.data_ptr()
        row[F_MASTER] = w.data_ptr() if w is not None else 0
        row[F_COUNT] = count
        key = (p.dtype, g.dtype, w is not None, idx.dtype, compact)
        launches.setdefault(key, []).append((row, count))
    if not launches:
        return
    scalars = adamw_scalars(step, lr, beta1, beta2, eps, weight_decay)
    table, specs = launch_table(launches, NF, F_START, block, device)
    for (p_dtype, g_dtype, has_master, idx_dtype, compact), row0, n_slots, n_progs in specs:
        sparse_adamw_kernel[(n_progs,)](
            table[row0 * NF: (row0 + n_slots) * NF], n_slots, *scalars,
            LOG_SLOTS=_log_slots(n_slots), P_T=_TL_DTYPE[p_dtype], G_T=_TL_DTYPE[g_dtype],
            IDX_T=_TL_DTYPE[idx_dtype], HAS_MASTER=has_master, COMPACT_GRAD=compact,
            BLOCK=block, num_warps=NUM_WARPS,
        )
