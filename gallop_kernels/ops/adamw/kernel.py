"""Fused multi-tensor sparse AdamW step, fp32 or 8-bit blockwise state (kernel 4 of
`docs/design.md#kernels`; 8-bit: `docs/design.md#state-layout`).

One launch covers every tensor of a group that shares (param dtype, grad dtype, has master, index
dtype, dense/compact grad, state layout): a table row per tensor (named fields below) holds its
pointers, its number of selected entries and its first program. Each program updates BLOCK
selected entries: it reads the indices and the m, v (and master) contiguously, gathers θ and g at
the indices, and applies `adamw_update` (torch's AdamW order of operations, float32).

State layouts (constexpr STATE):

* ``STATE_FP32``: float32 m and v, one value per selected entry.
* ``STATE_BLOCKWISE8``: uint8 codes of bitsandbytes' dynamic maps (signed for m, unsigned for v)
  with a float32 absmax per block of QUANT_BLOCK entries. A program owns exactly one quantization
  block (BLOCK == QUANT_BLOCK), so it dequantizes, updates, takes the new absmax over the block in
  registers and requantizes with `quantize_nearest`, with no second pass and no atomics. The
  rounding rule is `quantization.quantize_blockwise`'s, bit for bit.

Floating point, and where bit-identity holds (`docs/design.md#compiled-kernels`):

* Compiled = interpreted. Every launch has ``enable_fp_fusion=False`` (Triton emits ``.rn`` on
  each float multiply and add and runs ptxas with ``--fmad=false``); the two fused multiply-adds
  are explicit ``tl.fma`` (a true single-rounding fma in the interpreter too); division and
  square root are the correctly rounded ``div_rn``/``sqrt_rn``; bf16 is rounded to nearest even
  from the raw bits. So the compiled step computes the interpreter's bits (the compile gate
  checks the PTX of every variant; running it on a GPU is still owed).
* fp32 state vs `naive.sparse_adamw_step` on the CPU: m and v bit-identical where torch's
  vectorised CPU kernels fuse ``add_(alpha=)`` and ``addcmul_`` into fmadd (AVX2/AVX512 builds;
  checked for every length up to 4097 on this machine). The weight can differ in the last bit:
  torch's CPU ``sqrt`` is not always correctly rounded (6489 of 2^20 random values were off by
  one ulp here). A torch built without FMA rounds m and v twice and differs in the last bit too.
* vs torch on CUDA (``backend="torch"``, fp32 state): torch multiplies by the reciprocal of a
  host scalar divisor (``sqrt(1-β2^t)``) and nvcc may contract its multiply-adds, so the last
  bit can differ; ``torch.optim.AdamW`` matches to float32 rounding, not bit for bit.
* 8-bit state: `naive.sparse_adamw_step_8bit` defines every rounding itself (an exact fma,
  a correctly rounded sqrt, IEEE division by tensors), so the torch backend and this kernel give
  the same codes, absmaxes, master and param bit for bit (tested over many steps in the
  interpreter; on a GPU it is owed a check).
"""

import triton
import triton.language as tl

from gallop_kernels.ops._triton.tables import (
    HEAD_LOG_SLOTS,
    HEAD_SLOTS,
    as_pointer,
    find_slot,
    load_f32,
    rounded_f32,
    store_from_f32,
)

STATE_FP32 = tl.constexpr(0)
STATE_BLOCKWISE8 = tl.constexpr(1)

# One int64 row per tensor of a launch (the launcher fills rows by these names).
ROW_PARAM = tl.constexpr(0)  # data_ptr of the param
ROW_GRAD = tl.constexpr(1)  # data_ptr of the dense or the gathered (compact) gradient
ROW_INDEX = tl.constexpr(2)  # data_ptr of the selected flat indices (int32 or int64)
ROW_EXP_AVG = tl.constexpr(3)  # data_ptr of m (float32, or uint8 codes)
ROW_EXP_AVG_SQ = tl.constexpr(4)  # data_ptr of v (float32, or uint8 codes)
ROW_EXP_AVG_ABSMAX = tl.constexpr(5)  # data_ptr of m's absmax per block (8-bit only)
ROW_EXP_AVG_SQ_ABSMAX = tl.constexpr(6)  # data_ptr of v's absmax per block (8-bit only)
ROW_MASTER = tl.constexpr(7)  # data_ptr of the float32 master copy, 0 without one
ROW_COUNT = tl.constexpr(8)  # number of selected entries
ROW_START = tl.constexpr(9)  # the tensor's first program in the launch
ROW_FIELDS = tl.constexpr(10)  # (an even number: every row starts 16-byte aligned)


# -- what the fp32-state and 8-bit-state layouts share: loads, the AdamW arithmetic, stores --


@triton.jit
def load_selected(idx_ptr, g_ptr, p_ptr, master_address, offs, mask,
                  G_T: tl.constexpr, P_T: tl.constexpr, HAS_MASTER: tl.constexpr,
                  COMPACT_GRAD: tl.constexpr):
    """Indices, fp32 gradient and fp32 weight of a block of selected entries.

    The gradient is read at ``offs`` when it is compact (gathered) and at the indices when dense;
    the weight comes from the fp32 master copy when there is one, except where the param no
    longer holds the master's rounding (changed from outside: `naive.resync_master`), else from
    the param.
    """
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    if COMPACT_GRAD:
        g = load_f32(g_ptr, offs, mask, G_T)
    else:
        g = load_f32(g_ptr, idx, mask, G_T)
    current = load_f32(p_ptr, idx, mask, P_T)
    if HAS_MASTER:
        w = tl.load(master_address.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        w = tl.where(current != rounded_f32(w, P_T), current, w)
    else:
        w = current
    return idx, g, w


@triton.jit
def store_weight(p_ptr, master_address, idx, offs, w, mask, P_T: tl.constexpr,
                 HAS_MASTER: tl.constexpr):
    """The new weight to the master copy (if any) and, rounded, to the param."""
    if HAS_MASTER:
        tl.store(master_address.to(tl.pointer_type(tl.float32)) + offs, w, mask=mask)
    store_from_f32(p_ptr, idx, w, mask, P_T)


@triton.jit
def adamw_update(w, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 bias_correction2_sqrt, step_size, eps):
    """One AdamW step in float32 in torch's order of operations; returns (w, m, v).

    Floating point (every launch has ``enable_fp_fusion=False``, so nothing is contracted
    implicitly): a fused multiply-add exactly where torch's CPU kernels use one
    (``exp_avg.mul_(β1).add_(g, alpha=1-β1)`` and ``exp_avg_sq.mul_(β2).addcmul_(g, g,
    value=1-β2)`` vectorise to fmadd), IEEE division (``div_rn``) and square root (``sqrt_rn``),
    every other operation rounded on its own. The compile gate checks the PTX of every variant:
    exactly these two ``fma.rn.f32`` per element and no contractable ``mul``/``add`` pair.
    """
    w = w * decay
    # torch: exp_avg.mul_(β1).add_(g, alpha=1-β1) -> fmadd(g, 1-β1, m·β1)
    m = tl.fma(g, one_minus_beta1, m * beta1)
    # torch: exp_avg_sq.mul_(β2).addcmul_(g, g, value=1-β2) -> fmadd((1-β2)·g, g, v·β2)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    # torch: w.addcdiv_(m, denom, value=-lr/bc1) -> w + (value·m)/denom
    w = w + tl.math.div_rn(step_size * m, denom)
    return w, m, v


@triton.jit
def quantize_nearest(x, absmax, code_ptr, mask):
    """`quantization.quantize_blockwise`'s rule: the code whose map value is nearest to
    ``x / absmax`` (IEEE division, clamped to [-1, 1]; 0 when absmax is 0), ties to the lower
    code. An 8-step binary search finds the last map value <= the scaled value (the maps are
    sorted), then the nearer of it and the next one wins."""
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
def sparse_adamw_kernel(
    table_ptr, signed_code_ptr, unsigned_code_ptr,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
    step_size, eps,
    P_T: tl.constexpr, G_T: tl.constexpr, IDX_T: tl.constexpr, HAS_MASTER: tl.constexpr,
    COMPACT_GRAD: tl.constexpr, STATE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = table_ptr + ROW_FIELDS  # the header row first
    slot = find_slot(rows, pid, tl.load(table_ptr + HEAD_SLOTS), tl.load(table_ptr + HEAD_LOG_SLOTS),
                     ROW_FIELDS, ROW_START)
    row = rows + slot.to(tl.int64) * ROW_FIELDS
    p_ptr = as_pointer(tl.load(row + ROW_PARAM), P_T)
    g_ptr = as_pointer(tl.load(row + ROW_GRAD), G_T)
    idx_ptr = tl.load(row + ROW_INDEX).to(tl.pointer_type(IDX_T))
    count = tl.load(row + ROW_COUNT)
    block = pid - tl.load(row + ROW_START)  # int64: this tensor's block (quantization block)
    offs = block * BLOCK + tl.arange(0, BLOCK)  # int64
    mask = offs < count
    master_address = tl.load(row + ROW_MASTER)
    idx, g, w = load_selected(idx_ptr, g_ptr, p_ptr, master_address, offs, mask,
                              G_T, P_T, HAS_MASTER, COMPACT_GRAD)
    if STATE == STATE_FP32:
        m_ptr = tl.load(row + ROW_EXP_AVG).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + ROW_EXP_AVG_SQ).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        m_ptr = tl.load(row + ROW_EXP_AVG).to(tl.pointer_type(tl.uint8))
        v_ptr = tl.load(row + ROW_EXP_AVG_SQ).to(tl.pointer_type(tl.uint8))
        m_absmax_ptr = tl.load(row + ROW_EXP_AVG_ABSMAX).to(tl.pointer_type(tl.float32))
        v_absmax_ptr = tl.load(row + ROW_EXP_AVG_SQ_ABSMAX).to(tl.pointer_type(tl.float32))
        m_code = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(signed_code_ptr + m_code, mask=mask, other=0.0) * tl.load(m_absmax_ptr + block)
        v = tl.load(unsigned_code_ptr + v_code, mask=mask, other=0.0) * tl.load(v_absmax_ptr + block)

    w, m, v = adamw_update(w, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           bias_correction2_sqrt, step_size, eps)

    if STATE == STATE_FP32:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        m_absmax = tl.max(tl.abs(m), axis=0)
        v_absmax = tl.max(v, axis=0)
        tl.store(m_ptr + offs, quantize_nearest(m, m_absmax, signed_code_ptr, mask), mask=mask)
        tl.store(v_ptr + offs, quantize_nearest(v, v_absmax, unsigned_code_ptr, mask), mask=mask)
        tl.store(m_absmax_ptr + block, m_absmax)
        tl.store(v_absmax_ptr + block, v_absmax)
    store_weight(p_ptr, master_address, idx, offs, w, mask, P_T, HAS_MASTER)
