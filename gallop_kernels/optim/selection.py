"""Phase one of GaLLoP inside the optimizer: which gradient to score, and how state follows a new selection.

Selection is split in two so that nothing changes when it fails: `plan` only computes the new
index sets (and raises on NaN/inf scores); `apply` installs them into the optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from gallop_kernels import rules
from gallop_kernels.ops.adamw import quantization
from gallop_kernels.ops.select import select
from gallop_kernels.optim.distributed import GroupPlacement, local
from gallop_kernels.rules import DEFAULT_MIN_8BIT_ENTRIES


def uses_8bit(group: dict, num_selected: int) -> bool:
    """8-bit moments for a tensor: ``state_bits=8`` and at least ``min_8bit_entries`` selected
    (groups saved before that option existed use its default)."""
    minimum = group.get("min_8bit_entries", DEFAULT_MIN_8BIT_ENTRIES)
    return group["state_bits"] == 8 and num_selected >= minimum


def moments_fp32(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A param's (exp_avg, exp_avg_sq) as fp32, dequantizing 8-bit state."""
    if st["exp_avg"].dtype == torch.uint8:
        return (
            quantization.dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], signed=True),
            quantization.dequantize_blockwise(st["exp_avg_sq"], st["exp_avg_sq_absmax"], signed=False),
        )
    return st["exp_avg"], st["exp_avg_sq"]


def store_moments(st: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, bits: int) -> None:
    if bits == 8:
        st["exp_avg"], st["exp_avg_absmax"] = quantization.quantize_blockwise(exp_avg, signed=True)
        st["exp_avg_sq"], st["exp_avg_sq_absmax"] = quantization.quantize_blockwise(
            exp_avg_sq, signed=False
        )
    else:
        st["exp_avg"], st["exp_avg_sq"] = exp_avg, exp_avg_sq


def needs_master(param: torch.Tensor, policy: Any) -> bool:
    """fp32 master copy of the selected entries: for bf16/fp16 params under "auto", or forced."""
    if policy == "auto":
        return param.dtype in (torch.bfloat16, torch.float16)
    return bool(policy)


def selection_gradients(
    params: Sequence[torch.Tensor], state: dict, steps_since_selection: int | None
) -> list[torch.Tensor | None]:
    """The gradient each param is scored with.

    The first selection uses the current ``.grad``. A re-selection (GMT) uses the mean of the
    gradients accumulated since the previous selection. Both are local (a DTensor's shard).
    """
    if not steps_since_selection:
        return [local(p.grad) for p in params]
    grads = []
    for p in params:
        accum = state[p].get("grad_accum") if p in state else None
        grads.append(None if accum is None else (accum / steps_since_selection).view_as(local(p)))
    return grads


def plan(
    group: dict,
    state: dict,
    names: Sequence[str],
    backend: str,
    from_accumulated: bool,
    gradients: dict[torch.Tensor, torch.Tensor] | None = None,
    place: GroupPlacement | None = None,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> list[torch.Tensor]:
    """New sorted index set per param of ``group``; changes nothing.

    ``gradients`` (param -> gradient, possibly on another device) replaces ``.grad``; such
    gradients go through the torch backend's chunked radix select, which copies one chunk at a
    time.
    ``place`` (`optim/distributed.py`): a sharded group selects over all ranks' shards
    (the indices returned are local). ``reduce`` averages a re-selection's accumulated
    gradients over DDP ranks that did not average them (lean mode, `optim/ddp.py`).
    """
    params = group["params"]
    if not params:  # an empty group (the Trainer's no-decay group can be) selects nothing
        return []
    layout = place.layout if place is not None else None
    tensors = [local(p) for p in params]
    if gradients is not None:
        grads = [gradients.get(p) for p in params]
        for p, g, name in zip(tensors, grads, names):
            if g is not None and g.shape != p.shape:
                raise ValueError(f"gradient given for {name} has shape "
                                 f"{tuple(g.shape)}, expected {tuple(p.shape)}"
                                 + (" (its local shard's)" if layout is not None else ""))
        backend = "torch"  # it streams gradients from wherever they live, a chunk at a time
    else:
        since = group.get("steps_since_selection") if from_accumulated else None
        grads = selection_gradients(params, state, since)
        if since and reduce is not None:
            reduce([g for g in grads if g is not None])
    total = layout.total if layout is not None else sum(p.numel() for p in tensors)
    floors = rules.check_score_floor(group.get("score_floor"), len(tensors), group["score"])
    return select(tensors, grads, rules.k_for_density(total, group["density"]),
                  score=group["score"], score_eps=group["score_eps"], seed=group["seed"],
                  names=names, layout=layout, backend=backend, floors=floors)


def _carry_over(
    old_indices: torch.Tensor, new_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new index, whether it was selected before and where it sat in the old set."""
    old = old_indices.to(torch.int64)
    new = new_indices.to(torch.int64)
    if old.numel() == 0:
        return torch.zeros_like(new, dtype=torch.bool), torch.zeros_like(new)
    pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    return old[pos] == new, pos


def apply(group: dict, state: dict, new_indices: Sequence[torch.Tensor]) -> None:
    """Install a selection: entries that stay keep m, v and master; new entries start at zero."""
    accumulate = group["reselect_every"] is not None
    for param, idx in zip(group["params"], new_indices):
        st = state[param]  # keyed by the param; everything else lives on its local shard
        p = local(param)
        k = idx.numel()
        master = None
        same = "indices" in st and st["indices"].numel() > 0 and torch.equal(st["indices"], idx)
        if needs_master(p, group["master_weights"]):
            if same and "master" in st:
                master = st["master"]  # the same entries: everything carries over as it is
            else:
                master = p.detach().reshape(-1)[idx.to(torch.int64)].to(torch.float32)
        if same:
            exp_avg, exp_avg_sq = moments_fp32(st)
        elif "indices" in st and st["indices"].numel() > 0:
            # Gather at every new index, then keep only those that were selected before
            # (torch.where, not boolean-mask indexing: no data-dependent sizes).
            kept, pos = _carry_over(st["indices"], idx)
            old_exp_avg, old_exp_avg_sq = moments_fp32(st)
            exp_avg = torch.where(kept, old_exp_avg[pos], 0.0)
            exp_avg_sq = torch.where(kept, old_exp_avg_sq[pos], 0.0)
            if master is not None and "master" in st:
                master = torch.where(kept, st["master"][pos], master)
        else:
            exp_avg = torch.zeros(k, dtype=torch.float32, device=p.device)
            exp_avg_sq = torch.zeros_like(exp_avg)
        st.clear()
        st["indices"] = idx
        store_moments(st, exp_avg, exp_avg_sq, 8 if uses_8bit(group, k) else 32)
        if master is not None:
            st["master"] = master
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        if accumulate:
            st["grad_accum"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    group["steps_since_selection"] = 0
