"""Fused multi-tensor sparse AdamW step (kernel 4 of `docs/design.md#kernels`).

One launch covers every tensor of a group that shares (param dtype, grad dtype, has master,
index dtype, dense/compact grad): a table row per tensor holds its pointers, its number of
selected entries and its first program. Each program updates BLOCK selected entries: it reads
the indices and the float32 m, v (and master) contiguously, gathers θ and g at the indices, and
applies ``reference.sparse_adamw_step``'s float32 math in the same order of operations:

    w ← w·(1 − lr·wd);  m ← fma(g, 1−β1, β1·m);  v ← fma((1−β2)·g, g, β2·v)
    w ← w + (−lr/(1−β1^t))·m / (sqrt(v)/sqrt(1−β2^t) + eps)

The scalars are float32 (as torch rounds its Python scalars); division and square root are the
IEEE ones (``div_rn``, ``sqrt_rn``) and the two fused multiply-adds are where torch's CPU
kernels fuse (``add_(alpha=)`` and ``addcmul_``), so on CPU the result is bit-identical to the
reference. (torch's CUDA kernels divide by the scalar ``sqrt(1-β2^t)`` via a reciprocal, so on a
GPU the two can differ in the last bit.) The new weight goes to the master and, rounded
to nearest even, to the param, so a bf16 param equals ``master.to(bfloat16)`` exactly.
"""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.adamw_math import adamw_update, load_selected, store_weight
from gallop_kernels.ops.triton.multi_tensor import as_pointer, find_slot

F_PARAM = 0
F_GRAD = 1
F_INDEX = 2
F_EXP_AVG = 3
F_EXP_AVG_SQ = 4
F_MASTER = 5
F_COUNT = 6
F_START = 7
NF = 8


@triton.jit
def sparse_adamw_kernel(
    table_ptr, n_slots,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
    step_size, eps,
    LOG_SLOTS: tl.constexpr, P_T: tl.constexpr, G_T: tl.constexpr, IDX_T: tl.constexpr,
    HAS_MASTER: tl.constexpr, COMPACT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = find_slot(table_ptr, pid, n_slots, 8, 7, LOG_SLOTS)
    row = table_ptr + slot.to(tl.int64) * 8
    p_ptr = as_pointer(tl.load(row + 0), P_T)
    g_ptr = as_pointer(tl.load(row + 1), G_T)
    idx_ptr = tl.load(row + 2).to(tl.pointer_type(IDX_T))
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    count = tl.load(row + 6)
    offs = (pid - tl.load(row + 7)) * BLOCK + tl.arange(0, BLOCK)  # int64
    mask = offs < count
    master_address = tl.load(row + 5)
    idx, g, w = load_selected(idx_ptr, g_ptr, p_ptr, master_address, offs, mask,
                              G_T, P_T, HAS_MASTER, COMPACT_GRAD)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    w, m, v = adamw_update(w, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           bias_correction2_sqrt, step_size, eps)

    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    store_weight(p_ptr, master_address, idx, offs, w, mask, P_T, HAS_MASTER)
