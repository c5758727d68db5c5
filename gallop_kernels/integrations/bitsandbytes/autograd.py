"""The autograd function of a sparse delta on a frozen (4-bit) base: only sparse state is saved.

``y = x @ (W + Δ)ᵀ + b``, Δ = ``values`` scattered at the layer's ``delta_indices``.
backward: ``grad_x = grad_out @ (W + Δ)`` (W dequantized again), ``grad_values = (grad_outᵀ
x).flatten()[indices]`` and, while a gradient tap is set (phase one), the dense ``grad_outᵀ x``
goes to the tap's host buffer. That dense weight gradient is the only one of the layer and is
freed before ``grad_x`` is computed, so at most one exists on the device at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weight_grad(grad_out_2d: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
    """The dense weight gradient ``grad_outᵀ x`` in float32 (out × in)."""
    if grad_out_2d.dtype == torch.float32 and x_2d.dtype == torch.float32:
        return grad_out_2d.t().mm(x_2d)
    if grad_out_2d.is_cuda:
        try:  # bf16/fp16 inputs with an fp32 result, without fp32 copies of the activations
            return torch.mm(grad_out_2d.t(), x_2d, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return grad_out_2d.float().t().mm(x_2d.float())


class SparseDeltaLinearFn(torch.autograd.Function):
    """``forward(x, values, bias, module)``; ``module`` is the `SparseDeltaLinear` (its indices,
    its base weight and its tap)."""

    @staticmethod
    def forward(ctx, x, values, bias, module):  # type: ignore[override]
        ctx.module = module
        ctx.tap = module.tap_buffer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        weight = module.effective_weight(x.dtype, values)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, values = ctx.saved_tensors
        module = ctx.module
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_values = grad_bias = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_values or ctx.tap is not None:
            dense = weight_grad(grad_2d, x.reshape(-1, x.shape[-1]))
            if ctx.tap is not None:
                ctx.tap.add(dense)
            if need_values:
                grad_values = dense.view(-1).index_select(0, module.delta_indices.to(torch.int64))
            del dense  # the only dense weight gradient of this layer; freed here
        if need_x:
            weight = module.effective_weight(grad_out.dtype, values)
            grad_x = grad_out.matmul(weight)
            del weight
        if need_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, grad_bias, None
