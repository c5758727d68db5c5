"""The Triton backend of the sparse AdamW step: the launcher of `kernel.py` (kernel 4 of
`docs/design.md#kernels`).

One launcher for both state layouts (``state_layout="fp32"`` or ``"8bit"``: blockwise dynamic
quantization, `quantization.QUANT_BLOCK` entries per absmax). The launches are built as `Launch`
descriptions by `sparse_adamw_launches` (what the compile gate enumerates) and run by
`sparse_adamw`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gallop_kernels.ops._triton.launch import Launch, log_slots, run_all, upload
from gallop_kernels.ops._triton.tables import (
    HEAD_LOG_SLOTS,
    HEAD_SLOTS,
    HEAD_WORK,
    TL_DTYPE,
    build_table,
)
from gallop_kernels.ops.adamw.hyper import AdamWHyper
from gallop_kernels.ops.adamw.kernel import (
    ROW_COUNT,
    ROW_EXP_AVG,
    ROW_EXP_AVG_ABSMAX,
    ROW_EXP_AVG_SQ,
    ROW_EXP_AVG_SQ_ABSMAX,
    ROW_FIELDS,
    ROW_GRAD,
    ROW_INDEX,
    ROW_MASTER,
    ROW_PARAM,
    ROW_START,
    STATE_BLOCKWISE8,
    STATE_FP32,
    sparse_adamw_kernel,
)
from gallop_kernels.ops.adamw.quantization import QUANT_BLOCK, quantization_map
from gallop_kernels.ops.backends import check_device, interpreter_enabled
from gallop_kernels.rules import FLOAT_DTYPES, INDEX_DTYPES

__all__ = ["STATE_LAYOUTS", "sparse_adamw_launches", "sparse_adamw"]

BLOCK = 1024
"""Selected entries per program with fp32 state (8-bit: one quantization block)."""
INTERPRETER_BLOCK = 256
"""... in the Triton interpreter, where a program costs far more than its entries (tests shrink it)."""

STATE_LAYOUTS = {"fp32": STATE_FP32, "8bit": STATE_BLOCKWISE8}


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


def check_param_grad_indices(i: int, p, g, idx, device: torch.device) -> bool:
    """Validate one tensor's param, gradient and indices; returns whether the grad is compact."""
    if not isinstance(p, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise TypeError(f"param and indices of tensor #{i} must be tensors")
    if p.device != device:
        raise ValueError(f"param #{i} is on {p.device}, expected {device}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"param #{i} has dtype {p.dtype}; expected float32, bfloat16 or float16")
    if not p.is_contiguous():
        raise ValueError(f"param #{i} is not contiguous (it is updated in place)")
    if idx.dtype not in INDEX_DTYPES:
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
    if g.dtype not in FLOAT_DTYPES:
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


def sparse_adamw_launches(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    hyper: AdamWHyper,
    *,
    state_layout: str = "fp32",
    exp_avg_absmaxes: Sequence[torch.Tensor] | None = None,
    exp_avg_sq_absmaxes: Sequence[torch.Tensor] | None = None,
) -> list[Launch]:
    """Validate every input (before anything changes) and describe the step's launches."""
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"unknown state_layout {state_layout!r}; expected one of {tuple(STATE_LAYOUTS)}")
    eight = state_layout == "8bit"
    lists = [list(x) for x in (params, grads, indices, exp_avgs, exp_avg_sqs, masters)]
    if eight:
        if exp_avg_absmaxes is None or exp_avg_sq_absmaxes is None:
            raise ValueError('state_layout="8bit" needs exp_avg_absmaxes and exp_avg_sq_absmaxes')
        lists += [list(exp_avg_absmaxes), list(exp_avg_sq_absmaxes)]
    else:
        n = len(lists[0])
        lists += [[None] * n, [None] * n]
    if len({len(x) for x in lists}) != 1:
        raise ValueError("params, grads, indices, exp_avgs, exp_avg_sqs, masters (and absmaxes) "
                         "differ in length")
    if not lists[0]:
        return []
    if not isinstance(hyper, AdamWHyper):
        raise TypeError(f"hyper must be an AdamWHyper, got {type(hyper).__name__}")
    device = lists[0][0].device

    # 8-bit: a program per quantization block
    block = QUANT_BLOCK if eight else (INTERPRETER_BLOCK if interpreter_enabled() else BLOCK)
    state_dtype = torch.uint8 if eight else torch.float32
    launches: dict[tuple, list[tuple[list[int], int]]] = {}
    for i, (p, g, idx, m, v, w, m_max, v_max) in enumerate(zip(*lists)):
        compact = check_param_grad_indices(i, p, g, idx, device)
        count = idx.numel()
        _check_state(m, "exp_avg", i, count, device, state_dtype)
        _check_state(v, "exp_avg_sq", i, count, device, state_dtype)
        if eight:
            blocks = -(-count // block)
            _check_state(m_max, "exp_avg_absmax", i, blocks, device)
            _check_state(v_max, "exp_avg_sq_absmax", i, blocks, device)
        if w is not None:
            _check_state(w, "master", i, count, device)
        if count == 0:
            continue
        row = [0] * ROW_FIELDS.value
        row[ROW_PARAM], row[ROW_GRAD], row[ROW_INDEX] = p.data_ptr(), g.data_ptr(), idx.data_ptr()
        row[ROW_EXP_AVG], row[ROW_EXP_AVG_SQ] = m.data_ptr(), v.data_ptr()
        if eight:
            row[ROW_EXP_AVG_ABSMAX], row[ROW_EXP_AVG_SQ_ABSMAX] = m_max.data_ptr(), v_max.data_ptr()
        row[ROW_MASTER] = w.data_ptr() if w is not None else 0
        row[ROW_COUNT] = count
        key = (p.dtype, g.dtype, w is not None, idx.dtype, compact)
        launches.setdefault(key, []).append((row, count))
    if not launches:
        return []

    # One upload: every launch's table (header row + rows), each starting on a row boundary.
    values: list[int] = []
    specs = []
    for key, members in launches.items():
        rows, start = [], 0
        for row, count in members:
            row[ROW_START] = start
            rows.append(row)
            start += -(-count // block)
        header = [0] * 3
        header[HEAD_SLOTS], header[HEAD_LOG_SLOTS], header[HEAD_WORK] = (
            len(rows), log_slots(len(rows)), start)
        specs.append((key, len(values), len(rows) + 1, start))
        values += build_table(header, rows, ROW_FIELDS.value)
    table = upload(values, device)
    if eight:
        signed = quantization_map(True, device)
        unsigned = quantization_map(False, device)
    else:
        signed = unsigned = table  # unused placeholders (the fp32 layout reads no map)
    scalars = hyper.scalars()
    out = []
    for (p_dtype, g_dtype, has_master, idx_dtype, compact), first, n_rows, n_progs in specs:
        out.append(Launch(
            sparse_adamw_kernel, (n_progs,),
            (table[first: first + n_rows * ROW_FIELDS.value], signed, unsigned, *scalars),
            dict(P_T=TL_DTYPE[p_dtype], G_T=TL_DTYPE[g_dtype], IDX_T=TL_DTYPE[idx_dtype],
                 HAS_MASTER=has_master, COMPACT_GRAD=compact, STATE=STATE_LAYOUTS[state_layout],
                 BLOCK=block),
        ))
    return out


def sparse_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    hyper: AdamWHyper,
    *,
    state_layout: str = "fp32",
    exp_avg_absmaxes: Sequence[torch.Tensor] | None = None,
    exp_avg_sq_absmaxes: Sequence[torch.Tensor] | None = None,
) -> None:
    """One AdamW step on the selected entries of every tensor, in place. No host sync.

    ``grads[i]`` is the dense gradient (param's shape, any float dtype) or the gathered gradient
    of the selected entries (``indices[i].numel()`` values). With ``state_layout="fp32"`` it
    matches ``naive.sparse_adamw_step`` (bit for bit on the CPU but for torch's CPU sqrt,
    which is not always correctly rounded); with ``"8bit"`` (uint8 ``exp_avgs``/``exp_avg_sqs``
    and float32 absmaxes per `quantization.QUANT_BLOCK` entries) it produces exactly the codes,
    absmaxes and weights of ``naive.sparse_adamw_step_8bit``.
    """
    params = list(params)
    if params:
        check_device(params[0].device)
    launches = sparse_adamw_launches(
        params, grads, indices, exp_avgs, exp_avg_sqs, masters, hyper, state_layout=state_layout, exp_avg_absmaxes=exp_avg_absmaxes,
        exp_avg_sq_absmaxes=exp_avg_sq_absmaxes,
    )
    run_all(launches)
