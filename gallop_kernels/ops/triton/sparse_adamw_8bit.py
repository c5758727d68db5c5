"""Fused multi-tensor sparse AdamW step with 8-bit blockwise m and v (`docs/design.md#state-layout`).

The same launch layout as `sparse_adamw.py` (a table row per tensor, programs found by binary
search), with one difference: a program owns exactly one quantization block of QUANT_BLOCK
selected entries, so it can dequantize m and v with the block's absmax, update, take the new
absmax over the block in registers and requantize, with no second pass and no atomics.
Quantization picks the nearest value of bitsandbytes' dynamic map (signed for m, unsigned for v)
by an 8-step binary search over the sorted 256-entry map.
"""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.adamw_math import adamw_update, load_selected, store_weight
from gallop_kernels.ops.triton.multi_tensor import as_pointer, find_slot

F_PARAM = 0
F_GRAD = 1
F_INDEX = 2
F_EXP_AVG = 3
F_EXP_AVG_ABSMAX = 4
F_EXP_AVG_SQ = 5
F_EXP_AVG_SQ_ABSMAX = 6
F_MASTER = 7
F_COUNT = 8
F_START = 9
NF = 10


@triton.jit
def _quantize(x, absmax, code_ptr, mask):
    """Codes of the map entries nearest to x / absmax (ties to the lower code)."""
    scaled = tl.where(absmax > 0.0, tl.math.div_rn(x, absmax), 0.0)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    lo = tl.zeros_like(scaled).to(tl.int32)
    hi = lo + 255
    for _ in tl.static_range(8):  # invariant: code[lo] <= scaled, or lo == 0
        mid = (lo + hi + 1) // 2
        go = tl.load(code_ptr + mid, mask=mask, other=0.0) <= scaled
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    up = tl.minimum(lo + 1, 255)
    below = tl.load(code_ptr + lo, mask=mask, other=0.0)
    above = tl.load(code_ptr + up, mask=mask, other=0.0)
    nearer_up = tl.abs(above - scaled) < tl.abs(scaled - below)
    return tl.where(nearer_up, up, lo).to(tl.uint8)


@triton.jit
def sparse_adamw_8bit_kernel(
    table_ptr, n_slots, signed_code_ptr, unsigned_code_ptr,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
    step_size, eps,
    LOG_SLOTS: tl.constexpr, P_T: tl.constexpr, G_T: tl.constexpr, IDX_T: tl.constexpr,
    HAS_MASTER: tl.constexpr, COMPACT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = find_slot(table_ptr, pid, n_slots, NF, F_START, LOG_SLOTS)
    row = table_ptr + slot.to(tl.int64) * NF
    p_ptr = as_pointer(tl.load(row + F_PARAM), P_T)
    g_ptr = as_pointer(tl.load(row + F_GRAD), G_T)
    idx_ptr = tl.load(row + F_INDEX).to(tl.pointer_type(IDX_T))
    m_ptr = tl.load(row + F_EXP_AVG).to(tl.pointer_type(tl.uint8))
    v_ptr = tl.load(row + F_EXP_AVG_SQ).to(tl.pointer_type(tl.uint8))
    m_absmax_ptr = tl.load(row + F_EXP_AVG_ABSMAX).to(tl.pointer_type(tl.float32))
    v_absmax_ptr = tl.load(row + F_EXP_AVG_SQ_ABSMAX).to(tl.pointer_type(tl.float32))
    count = tl.load(row + F_COUNT)
    block = pid - tl.load(row + F_START)  # this tensor's quantization block
    offs = block * BLOCK + tl.arange(0, BLOCK)  # int64
    mask = offs < count

    master_address = tl.load(row + F_MASTER)
    idx, g, w = load_selected(idx_ptr, g_ptr, p_ptr, master_address, offs, mask,
                              G_T, P_T, HAS_MASTER, COMPACT_GRAD)
    m_code = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(signed_code_ptr + m_code, mask=mask, other=0.0) * tl.load(m_absmax_ptr + block)
    v = tl.load(unsigned_code_ptr + v_code, mask=mask, other=0.0) * tl.load(v_absmax_ptr + block)

    w, m, v = adamw_update(w, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           bias_correction2_sqrt, step_size, eps)

    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    m_absmax = tl.max(tl.abs(m), axis=0)
    v_absmax = tl.max(v, axis=0)
    tl.store(m_ptr + offs, _quantize(m, m_absmax, signed_code_ptr, mask), mask=mask)
    tl.store(v_ptr + offs, _quantize(v, v_absmax, unsigned_code_ptr, mask), mask=mask)
    tl.store(m_absmax_ptr + block, m_absmax)
    tl.store(v_absmax_ptr + block, v_absmax)
    store_weight(p_ptr, master_address, idx, offs, w, mask, P_T, HAS_MASTER)
