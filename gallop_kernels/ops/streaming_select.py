"""Exact top-k selection in pure torch that holds one chunk of scores at a time.

`reference.select` sorts the whole group's scores: simple, but it needs ~16 bytes per entry of
the group at once. This radix select (three passes of 11/11/10-bit digits over order-preserving
32-bit keys, then an ordered compaction) recomputes scores chunk by chunk from θ and g, so its
extra memory is O(chunk) and the gradients may live elsewhere (pinned host memory during
calibration): each chunk is copied to the parameter's device when it is scored. It selects exactly
the same index set as the reference.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from gallop_kernels import reference
from gallop_kernels.reference import Score

DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, width): 32 key bits, most significant first
DEFAULT_CHUNK = 1 << 24


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int64 keys in [0, 2^32) that order exactly like the floats."""
    bits = scores.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), ~bits)


def _chunks(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    score: Score,
    score_eps: float,
    seed: int,
    names: Sequence[str],
    chunk: int,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (tensor position, start within tensor, keys) for every chunk of the group, in order."""
    offset = 0
    for t, (p, g, name) in enumerate(zip(params, grads, names)):
        n = p.numel()
        # A callable sees whole tensors; named scores are elementwise and can be chunked.
        step = n if callable(score) else chunk
        flat_p = p.detach().reshape(-1)
        flat_g = None if g is None else g.detach().reshape(-1)
        for start in range(0, n, max(step, 1)):
            stop = min(n, start + step)
            if callable(score):
                piece_p, piece_g = p.detach(), (None if g is None else g.detach().to(p.device))
            else:
                piece_p = flat_p[start:stop]
                piece_g = None if flat_g is None else flat_g[start:stop].to(p.device, non_blocking=True)
            s = reference.compute_score(piece_p, piece_g, score, score_eps, seed, offset + start)
            reference.check_finite(s, name)
            yield t, start, order_keys(s)
        offset += n


def streaming_select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    k: int,
    score: Score = "gallop",
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[torch.Tensor]:
    """Per tensor, the sorted int64 flat indices of the exact top-k (ties to the lower index)."""
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    total = sum(p.numel() for p in params)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the number of entries {total}")
    args = (params, grads, score, score_eps, seed, names, chunk)

    # Radix passes: narrow the key of the k-th largest entry down one digit at a time.
    prefix, remaining = 0, k
    for shift, width in DIGITS:
        hist = torch.zeros(1 << width, dtype=torch.int64)
        for _, _, keys in _chunks(*args):
            top = shift + width
            match = keys if top >= 32 else keys[(keys >> top) == prefix]
            digit = (match >> shift) & ((1 << width) - 1)
            hist += torch.bincount(digit, minlength=1 << width).cpu()
        from_top = hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, remaining))
        bucket = (1 << width) - 1 - j
        remaining -= int(from_top[j]) - int(hist[bucket])
        prefix = (prefix << width) | bucket
    threshold = prefix  # the exact key of the k-th largest score

    # Ordered compaction: everything above the threshold, then the first `remaining` ties.
    picked: list[list[torch.Tensor]] = [[] for _ in params]
    for t, start, keys in _chunks(*args):
        above = (keys > threshold).nonzero().flatten()
        if remaining > 0:
            ties = (keys == threshold).nonzero().flatten()[:remaining]
            remaining -= ties.numel()
            above = torch.cat([above, ties]).sort().values
        picked[t].append(above + start)
    return [
        torch.cat(parts).to(p.device) if parts else torch.empty(0, dtype=torch.int64, device=p.device)
        for parts, p in zip(picked, params)
    ]
