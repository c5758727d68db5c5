"""Launcher for the fused multi-tensor sparse AdamW step with 8-bit blockwise m and v."""

from __future__ import annotations

from typing import Sequence

import torch

from gallop_kernels import reference
from gallop_kernels.ops.sparse_adamw import (
    _TL_DTYPE, _check_state, _log_slots, adamw_scalars, check_device, check_param_grad_indices,
    check_step, launch_table,
)
from gallop_kernels.ops.triton.sparse_adamw_8bit import (
    F_COUNT, F_EXP_AVG, F_EXP_AVG_ABSMAX, F_EXP_AVG_SQ, F_EXP_AVG_SQ_ABSMAX, F_GRAD, F_INDEX,
    F_MASTER, F_PARAM, F_START, NF, sparse_adamw_8bit_kernel,
)

__all__ = ["triton_sparse_adamw_8bit_step"]

NUM_WARPS = 4


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
    check_step(step)
    device = params[0].device
    check_device(device)
    block = reference.QUANT_BLOCK  # one program per quantization block
    launches: dict[tuple, list[tuple[list[int], int]]] = {}
    for i, (p, g, idx, m, m_max, v, v_max, w) in enumerate(rows):
        compact = check_param_grad_indices(i, p, g, idx, device)
        count = idx.numel()
        blocks = -(-count // block)
        _check_state(m, "exp_avg", i, count, device, torch.uint8)
        _check_state(v, "exp_avg_sq", i, count, device, torch.uint8)
        _check_state(m_max, "exp_avg_absmax", i, blocks, device)
        _check_state(v_max, "exp_avg_sq_absmax", i, blocks, device)
        if w is not None:
            _check_state(w, "master", i, count, device)
        if count == 0:
            continue
        row = [0] * NF
        row[F_PARAM], row[F_GRAD], row[F_INDEX] = p.data_ptr(), g.data_ptr(), idx.data_ptr()
        row[F_EXP_AVG], row[F_EXP_AVG_ABSMAX] = m.data_ptr(), m_max.data_ptr()
        row[F_EXP_AVG_SQ], row[F_EXP_AVG_SQ_ABSMAX] = v.data_ptr(), v_max.data_ptr()
        row[F_MASTER] = w.data_ptr() if w is not None else 0
        row[F_COUNT] = count
        key = (p.dtype, g.dtype, w is not None, idx.dtype, compact)
        launches.setdefault(key, []).append((row, count))
    if not launches:
        return
    scalars = adamw_scalars(step, lr, beta1, beta2, eps, weight_decay)
    signed = reference.quantization_map(True, device)
    unsigned = reference.quantization_map(False, device)
    table, specs = launch_table(launches, NF, F_START, block, device)
    for (p_dtype, g_dtype, has_master, idx_dtype, compact), row0, n_slots, n_progs in specs:
        sparse_adamw_8bit_kernel[(n_progs,)](
            table[row0 * NF: (row0 + n_slots) * NF], n_slots, signed, unsigned, *scalars,
            LOG_SLOTS=_log_slots(n_slots), P_T=_TL_DTYPE[p_dtype], G_T=_TL_DTYPE[g_dtype],
            IDX_T=_TL_DTYPE[idx_dtype], HAS_MASTER=has_master, COMPACT_GRAD=compact,
            BLOCK=block, num_warps=NUM_WARPS,
        )
