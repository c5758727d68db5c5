"""The torch backend of the sparse AdamW step: every tensor of a group in one pass of each op.

`naive.sparse_adamw_step` is the definition, one tensor at a time: a dozen small torch calls per
tensor, so for the 70–200 weight matrices of a language model the per-call overhead, not the
bytes, sets its cost (about as slow as a dense fused AdamW over all entries on a CPU). Here each
arithmetic operation runs once for the whole group (``torch._foreach_*``: one dispatch, a loop in
C++), and per tensor only what must be: one gather of the gradient (and of the weight when
there is no master copy) and one scatter of the new weight.

Bit for bit the same as `naive.sparse_adamw_step` (tests/test_adamw_foreach.py): the ``_foreach``
ops of the CPU and CUDA backends apply the same elementwise kernels, with the same scalars, in
the same order. 8-bit state keeps the naive step (its exact rounding is per quantization block).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from gallop_kernels.ops.adamw import naive
from gallop_kernels.ops.adamw.hyper import AdamWHyper


def sparse_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    hyper: AdamWHyper,
) -> None:
    """One AdamW step on the selected entries of every tensor, in place (see `ops.adamw`)."""
    full = [i for i, st in enumerate(states) if st["exp_avg"].dtype != torch.uint8
            and st["indices"].numel()]
    for i, st in enumerate(states):
        if st["exp_avg"].dtype == torch.uint8:
            naive.sparse_adamw_step_8bit(
                params[i], grads[i], st["indices"], st["exp_avg"], st["exp_avg_absmax"],
                st["exp_avg_sq"], st["exp_avg_sq_absmax"], st.get("master"), hyper)
    if full:
        _fp32_state(
            [params[i] for i in full], [grads[i] for i in full], [states[i] for i in full], hyper)


def _fp32_state(params, grads, states, hyper: AdamWHyper) -> None:
    flats = [p.data.view(-1) for p in params]
    indices = [st["indices"] for st in states]
    g = [_selected_gradient(grad.reshape(-1), idx) for grad, idx in zip(grads, indices)]
    _resync_masters(states, flats, indices)
    w = [st["master"] if st.get("master") is not None
         else flat.index_select(0, idx).to(torch.float32)  # (a copy: written back below)
         for st, flat, idx in zip(states, flats, indices)]
    m = [st["exp_avg"] for st in states]
    v = [st["exp_avg_sq"] for st in states]
    # naive.sparse_adamw_step's operations, in its order, each over the whole group
    beta1, beta2, lr = hyper.beta1, hyper.beta2, hyper.lr
    torch._foreach_mul_(w, 1.0 - lr * hyper.weight_decay)
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g, alpha=1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**hyper.step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**hyper.step)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, hyper.eps)
    torch._foreach_addcdiv_(w, m, denom, value=-lr / bias_correction1)
    for flat, idx, new in zip(flats, indices, w):
        # (int64 indices: converting them costs less than indexing with int32; index_put_ beat
        # index_copy_ and put_ on a group of cold tensors, benchmarks/torch_step.py)
        flat.index_put_((idx.to(torch.int64),), new.to(flat.dtype))


def _resync_masters(states, flats, indices) -> None:
    """Every master copy resynced in place from its param where that changed from outside
    (`naive.resync_master`): the selected param values gathered per tensor, the comparison run
    once over all tensors of a dtype (a few ops for the group, not a few per tensor)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, st in enumerate(states):
        if st.get("master") is not None:
            by_dtype.setdefault(flats[i].dtype, []).append(i)
    for chosen in by_dtype.values():
        masters = [states[i]["master"] for i in chosen]
        current = torch.cat([flats[i].index_select(0, indices[i]) for i in chosen])
        resynced = naive.resync_master(current, torch.cat(masters))
        torch._foreach_copy_(masters, resynced.split([m.numel() for m in masters]))


def _selected_gradient(grad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The gradient of the selected entries as float32: a gathered gradient already is that."""
    picked = grad if grad.numel() == idx.numel() else grad.index_select(0, idx)
    return picked.to(torch.float32)
