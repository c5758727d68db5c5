"""The sparse AdamW step written to be obviously right: the oracle every backend is tested against.

`docs/design.md#sparse-update`: for each selected entry, PyTorch AdamW's order of operations in
float32; bf16/fp16 params keep an fp32 master copy of the selected entries, which yields to the
param where that was changed from outside (`resync_master`). `sparse_adamw_step`
is torch's own arithmetic (fp32 state); `sparse_adamw_step_8bit` defines every rounding itself
(`adamw_update_exact`) so that the Triton kernel reproduces it bit for bit.
"""

from __future__ import annotations

import math

import torch

from gallop_kernels.ops.adamw.hyper import AdamWHyper
from gallop_kernels.ops.adamw.quantization import dequantize_blockwise, quantize_blockwise


def resync_master(current: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """The float32 weight of selected entries whose param values are ``current``: the master,
    except where the param no longer holds the master's rounding (it was changed from outside:
    ``load_state_dict``, ``merge_delta``, an in-place edit), where the param's value is taken
    (`docs/design.md#sparse-update`). Every backend computes exactly this."""
    changed = current != master.to(current.dtype)
    return torch.where(changed, current.to(torch.float32), master)


def _selected_entries(
    param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, master: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both steps read: the flat param, int64 indices, the selected gradient in float32
    (``grad`` dense or already gathered) and the float32 weight (``master`` itself, resynced
    from the param where it changed from outside (`resync_master`), or a copy of the param)."""
    flat = param.data.view(-1)
    idx = indices.to(torch.int64)
    g = grad.reshape(-1)
    if g.numel() != idx.numel():
        g = g[idx]
    if master is None:
        return flat, idx, g.to(torch.float32), flat[idx].to(torch.float32)
    master.copy_(resync_master(flat[idx], master))
    return flat, idx, g.to(torch.float32), master


def sparse_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    hyper: AdamWHyper,
) -> None:
    """One AdamW step on the selected entries of ``param``, in place.

    ``grad`` is either the dense gradient (same shape as ``param``) or the already-gathered
    gradient of the selected entries (``indices.numel()`` values). ``step`` counts from the
    selection, starting at 1. ``exp_avg``/``exp_avg_sq``/``master`` are float32, one value per
    selected entry; without ``master`` the parameter itself holds the weight.
    """
    if indices.numel() == 0:
        return
    flat, idx, g, w = _selected_entries(param, grad, indices, master)
    step, lr, beta1, beta2 = hyper.step, hyper.lr, hyper.beta1, hyper.beta2

    w.mul_(1.0 - lr * hyper.weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
    w.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    flat[idx] = w.to(param.dtype)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``a * b + c`` rounded once (an exact fused multiply-add), on any device.

    The float64 product of two float32 values is exact; the float64 sum is corrected with its
    rounding error (TwoSum) when it falls exactly halfway between two float32 values, the one
    case where rounding it again could differ from rounding the exact sum."""
    a, b, c = (t.to(torch.float64) for t in torch.broadcast_tensors(a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly
    r = s.to(torch.float32)
    r64 = r.to(torch.float64)
    toward = torch.where(s > r64, torch.full_like(r, math.inf), torch.full_like(r, -math.inf))
    other = torch.nextafter(r, toward)
    halfway = (s != r64) & ((other.to(torch.float64) - s) == (s - r64))
    # halfway: the exact value lies on err's side of s
    fix = halfway & (err != 0) & ((err > 0) == (other > r))
    return torch.where(fix, other, r)


def _div_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IEEE float32 ``x / y`` with ``y`` broadcast to a tensor, on every device."""
    return x / y.expand_as(x)


def adamw_update_exact(w, g, m, v, hyper: AdamWHyper):
    """One AdamW step in float32 with every rounding defined; returns new (w, m, v).

    The same operations as the Triton kernel (`kernel.adamw_update`), in order:
    scalars rounded to float32 from Python doubles; ``w·decay``; ``m = fma(g, 1-β1, m·β1)``;
    ``v = fma((1-β2)·g, g, v·β2)``; ``denom = sqrt_rn(v) / sqrt(1-β2^t) + eps`` (correctly
    rounded square root: float64 sqrt of a float32 then rounded, which is exact for float32);
    ``w + (-lr/(1-β1^t))·m / denom``. IEEE division throughout.
    """
    dev = w.device

    def f32(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=dev)

    decay, b1, c1, b2, c2, bc2_sqrt, step_size, eps = (f32(x) for x in hyper.scalars())
    w = w * decay
    m = fma_f32(g, c1, m * b1)
    v = fma_f32(c2 * g, g, v * b2)
    root = v.to(torch.float64).sqrt().to(torch.float32)
    denom = _div_f32(root, bc2_sqrt) + eps
    w = w + (step_size * m) / denom  # tensor / tensor: IEEE division on every device
    return w, m, v


def sparse_adamw_step_8bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    master: torch.Tensor | None,
    hyper: AdamWHyper,
) -> None:
    """`sparse_adamw_step` with m, v held as 8-bit blockwise codes, in place: dequantize,
    `adamw_update_exact`, requantize with `quantize_blockwise`. Every backend reproduces this
    bit for bit (codes, absmaxes, master and param)."""
    if indices.numel() == 0:
        return
    flat, idx, g, w = _selected_entries(param, grad, indices, master)
    m = dequantize_blockwise(exp_avg, exp_avg_absmax, signed=True)
    v = dequantize_blockwise(exp_avg_sq, exp_avg_sq_absmax, signed=False)
    w_new, m, v = adamw_update_exact(w, g, m, v, hyper)
    if master is not None:
        master.copy_(w_new)
    flat[idx] = w_new.to(param.dtype)
    for codes, absmax, value, signed in (
        (exp_avg, exp_avg_absmax, m, True), (exp_avg_sq, exp_avg_sq_absmax, v, False)
    ):
        new_codes, new_absmax = quantize_blockwise(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
