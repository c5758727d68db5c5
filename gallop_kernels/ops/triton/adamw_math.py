"""What the fp32-state and 8-bit-state sparse step kernels share: loads, the AdamW arithmetic, stores."""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.multi_tensor import load_f32, store_from_f32


@triton.jit
def load_selected(idx_ptr, g_ptr, p_ptr, master_address, offs, mask,
                  G_T: tl.constexpr, P_T: tl.constexpr, HAS_MASTER: tl.constexpr,
                  COMPACT_GRAD: tl.constexpr):
    """Indices, fp32 gradient and fp32 weight of a block of selected entries.

    The gradient is read at ``offs`` when it is compact (gathered) and at the indices when dense;
    the weight comes from the fp32 master copy when there is one, else from the param.
    """
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    if COMPACT_GRAD:
        g = load_f32(g_ptr, offs, mask, G_T)
    else:
        g = load_f32(g_ptr, idx, mask, G_T)
    if HAS_MASTER:
        w = tl.load(master_address.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    else:
        w = load_f32(p_ptr, idx, mask, P_T)
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
    every other operation rounded on its own. The compiled SASS has no other FFMA than those two
    and the ones inside the IEEE division/square-root sequences (checked by the compile gate).
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
