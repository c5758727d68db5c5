"""The AdamW arithmetic shared by the fp32-state and 8-bit-state sparse step kernels."""

import triton
import triton.language as tl


@triton.jit
def adamw_update(w, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 bias_correction2_sqrt, step_size, eps):
    """One AdamW step in float32 in torch's order of operations; returns (w, m, v).

    torch's CPU kernels fuse ``exp_avg.mul_(β1).add_(g, alpha=1-β1)`` and
    ``exp_avg_sq.mul_(β2).addcmul_(g, g, value=1-β2)`` into multiply-adds, and divide with IEEE
    division (``div_rn``), so on the CPU this is bit-identical to `reference.sparse_adamw_step`.
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
