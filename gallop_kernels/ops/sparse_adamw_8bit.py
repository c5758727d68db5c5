"""Launcher for the fused multi-tensor sparse AdamW step with 8-bit blockwise m and v."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gallop_kernels import reference
from gallop_kernels.ops.sparse_adamw import _FLOAT_DTYPES, _TL_DTYPE, _log_slots, _upload
from gallop_kernels.ops.triton.sparse_adamw_8bit import (
    F_COUNT, F_EXP_AVG, F_EXP_AVG_ABSMAX, F_EXP_AVG_SQ, F_EXP_AVG_SQ_ABSMAX, F_GRAD, F_INDEX,
    F_MASTER, F_PARAM, F_START, NF, sparse_adamw_8bit_kernel,
)

__all__ = ["triton_sparse_adamw_8bit_step"]

NUM_WARPS = 4


def _check(t: torch.Tensor, what: str, i: int, dtype: torch.dtype, count: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise TypeError(f"{what} of tensor #{i} must be a {dtype} tensor")
    if t.device != device or t.numel() != count or not t.is_contiguous():
        raise ValueError(
            f"{what} of tensor #{i} must be a contiguous tensor of {count} entries on {device}"
        )


def triton_sparse_adamw_8bit_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_absmaxes: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    exp_avg_sq_absmaxes: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In place; matches `reference.sparse_adamw_step_8bit` up to the quantization's rounding.

    Each tensor's uint8 ``exp_avg``/``exp_avg_sq`` have one code per selected entry and the
    fp32 absmaxes one value per block of `reference.QUANT_BLOCK` entries. Grads are dense or
    gathered (compact), as in `triton_sparse_adamw_step`. No host synchronisation.
    """
    rows = list(zip(params, grads, indices, exp_avgs, exp_avg_absmaxes, exp_avg_sqs,
                    exp_avg_sq_absmaxes, masters))
    if not rows:
        return
    device = params[0].device
    block = reference.QUANT_BLOCK
    launches: dict[tuple, list[tuple]] = {}
    for i, (p, g, idx, m, m_max, v, v_max, w) in enumerate(rows):
        if p.dtype not in _FLOAT_DTYPES or not p.is_contiguous() or p.device != device:
            raise ValueError(f"param #{i} must be a contiguous float32/bf16/fp16 tensor on {device}")
        if idx.dtype not in (torch.int32, torch.int64) or idx.device != device or idx.dim() != 1:
            raise TypeError(f"indices of tensor #{i} must be a 1-D int32/int64 tensor on {device}")
        count = idx.numel()
        blocks = -(-count // block)
        _check(m, "exp_avg", i, torch.uint8, count, device)
        _check(v, "exp_avg_sq", i, torch.uint8, count, device)
        _check(m_max, "exp_avg_absmax", i, torch.float32, blocks, device)
        _check(v_max, "exp_avg_sq_absmax", i, torch.float32, blocks, device)
        if w is not None:
            _check(w, "master", i, torch.float32, count, device)
        if g.dtype not in _FLOAT_DTYPES or g.device != device or not g.is_contiguous():
            raise ValueError(f"grad of tensor #{i} must be a contiguous float tensor on {device}")
        compact = g.numel() == count and g.numel() != p.numel()
        if g.numel() != p.numel() and not compact:
            raise ValueError(f"grad of tensor #{i} has {g.numel()} entries; expected "
                             f"{p.numel()} (dense) or {count} (gathered)")
        if count:
            key = (p.dtype, g.dtype, w is not None, idx.dtype, compact)
            launches.setdefault(key, []).append((p, g, idx, m, m_max, v, v_max, w))
    if not launches:
        return

    bias_correction1 = 1.0 - beta1**step
    scalars = (
        1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        math.sqrt(1.0 - beta2**step), -lr / bias_correction1, eps,
    )
    signed = reference.quantization_map(True, device)
    unsigned = reference.quantization_map(False, device)
    values, specs = [], []
    for key, members in launches.items():
        row0, start = len(values) // NF, 0
        for p, g, idx, m, m_max, v, v_max, w in members:
            row = [0] * NF
            row[F_PARAM], row[F_GRAD], row[F_INDEX] = p.data_ptr(), g.data_ptr(), idx.data_ptr()
            row[F_EXP_AVG], row[F_EXP_AVG_ABSMAX] = m.data_ptr(), m_max.data_ptr()
            row[F_EXP_AVG_SQ], row[F_EXP_AVG_SQ_ABSMAX] = v.data_ptr(), v_max.data_ptr()
            row[F_MASTER] = w.data_ptr() if w is not None else 0
            row[F_COUNT], row[F_START] = idx.numel(), start
            values.extend(row)
            start += -(-idx.numel() // block)
        specs.append((key, row0, len(members), start))
    table = _upload(values, device)
    for (p_dtype, g_dtype, has_master, idx_dtype, compact), row0, n_slots, n_progs in specs:
        sparse_adamw_8bit_kernel[(n_progs,)](
            table[row0 * NF: (row0 + n_slots) * NF], n_slots, signed, unsigned, *scalars,
            LOG_SLOTS=_log_slots(n_slots), P_T=_TL_DTYPE[p_dtype], G_T=_TL_DTYPE[g_dtype],
            IDX_T=_TL_DTYPE[idx_dtype], HAS_MASTER=has_master, COMPACT_GRAD=compact,
            BLOCK=block, num_warps=NUM_WARPS,
        )
