"""The selection op written to be obviously right: the oracle every backend is tested against.

`docs/design.md#selection-semantics`: scores are computed in float32 from the upcast parameter
and gradient; selection is an exact top-k over the concatenation of a group's tensors, where
among equal scores the lower flat index wins (a stable descending sort gives exactly that order).
It holds every score and a sort of the whole group in memory: the torch backend
(`streaming.py`) and the Triton backend (`launcher.py`) select the same sets in O(chunk) memory.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gallop_kernels.rules import SCORE_NAMES, Score, k_for_density

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Counter-based uniform numbers for the "random" score.
#
# A hash of (seed, flat index) rather than a stateful generator, so that the Triton kernels can
# produce the identical value for every entry without materialising a score vector. The mixer is
# the "lowbias32" integer hash (C. Wellons); all arithmetic is mod 2^32.
# ----------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + ((hi * c) & 0xFFFF) * 65536) & _MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer mixer on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_mix(seed: int) -> int:
    """``lowbias32(seed mod 2^32)``: the seed as the hash mixes it (the kernels get it as an int)."""
    return int(lowbias32(torch.tensor(seed & _MASK32, dtype=torch.int64)))


def hash_uniform(flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) (multiples of 2^-24) determined by ``(seed, flat_index)``.

    ``flat_index`` is the entry's position in its group's concatenation (int64, may exceed 2^32).
    """
    idx = flat_index.to(torch.int64)
    high = lowbias32(((idx >> 32) + seed_mix(seed)) & _MASK32)
    bits = lowbias32((idx & _MASK32) ^ high)
    return (bits >> 8).to(torch.float32) * (2.0**-24)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def compute_score(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    score: Score = "gallop",
    score_eps: float = 1e-8,
    seed: int = 0,
    offset: int = 0,
    floor: float | None = None,
) -> torch.Tensor:
    """Flat float32 score of every entry of ``param`` (`docs/design.md#selection-semantics`).

    ``grad=None`` counts as an all-zero gradient. ``offset`` is the position of ``param``'s first
    entry in its group's concatenation; only the ``"random"`` score depends on it. ``floor``
    (`docs/design.md#score-floor`, a float32 value from `rules.check_score_floor`): the "gallop"
    and "magnitude" scores read max(|θ|, floor) instead of |θ| (a NaN θ stays NaN).
    """
    theta = param.detach().reshape(-1).to(torch.float32)
    if callable(score):
        g = grad if grad is not None else torch.zeros_like(param)
        user = score(param.detach(), g.detach())
        if not isinstance(user, torch.Tensor) or user.shape != param.shape:
            got = tuple(user.shape) if isinstance(user, torch.Tensor) else type(user).__name__
            raise ValueError(
                f"a score callable must return a tensor of the parameter's shape "
                f"{tuple(param.shape)}, got {got}"
            )
        # +0.0 folds -0.0 onto +0.0 so that the two compare (and hash) as the same value.
        return user.detach().reshape(-1).to(device=param.device, dtype=torch.float32) + 0.0
    if score == "random":
        index = torch.arange(offset, offset + theta.numel(), device=theta.device, dtype=torch.int64)
        return hash_uniform(index, seed)
    if score == "magnitude":
        return 1.0 / (_floored(theta, floor) + score_eps)
    g = (
        torch.zeros_like(theta)
        if grad is None
        else grad.detach().reshape(-1).to(torch.float32)
    )
    if score == "gradient":
        return g.abs()
    if score == "gallop":
        return g.abs() / (_floored(theta, floor) + score_eps)
    raise ValueError(f"unknown score {score!r}; expected one of {SCORE_NAMES} or a callable")


def _floored(theta: torch.Tensor, floor: float | None) -> torch.Tensor:
    """|θ|, or max(|θ|, floor) written so that a NaN θ stays NaN (``tl.where`` in the kernels)."""
    magnitude = theta.abs()
    if floor is None:
        return magnitude
    f = torch.tensor(floor, dtype=torch.float32, device=theta.device)
    return torch.where(magnitude < f, f, magnitude)


def check_finite(scores: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the parameter if any score is NaN or infinite."""
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        count = int(bad.sum())
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"selection score of parameter {name} has {count} NaN/infinite value(s) "
            f"(first at flat index {first}); check its weights and gradient"
        )


# ----------------------------------------------------------------------------------------------
# Exact top-k selection
# ----------------------------------------------------------------------------------------------


def select_topk(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exact top-``k`` over the concatenation of ``scores``; ties go to the lower flat index.

    Returns, per input tensor, the sorted int64 flat indices (local to that tensor) of its
    selected entries.
    """
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} must be between 0 and the number of entries {total}")
    if total == 0:
        return [torch.empty(0, dtype=torch.int64) for _ in scores]
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device=device, dtype=torch.float32) for s in scores])
    # A stable sort keeps equal scores in index order, so the first k are exactly the k largest
    # with the lower flat index winning every tie.
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.sort(order).values
    out = []
    start = 0
    for size, score in zip(sizes, scores):
        lo = torch.searchsorted(chosen, start)
        hi = torch.searchsorted(chosen, start + size)
        out.append((chosen[lo:hi] - start).to(score.device))
        start += size
    return out


def threshold_of(scores: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest score of the concatenation (the selection threshold)."""
    flat = torch.cat([s.reshape(-1).to(torch.float32).cpu() for s in scores])
    return float(torch.sort(flat, descending=True).values[k - 1])


def select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    density: float,
    score: Score = "gallop",
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    floors: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Phase one of GaLLoP for one group: score every entry, then select the global top-k.
    ``floors``: one magnitude floor per tensor (`compute_score`), or None."""
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    floors = list(floors) if floors is not None else [None] * len(params)
    scores = []
    offset = 0
    for p, g, name, floor in zip(params, grads, names, floors):
        s = compute_score(p, g, score, score_eps, seed, offset, floor)
        check_finite(s, name)
        scores.append(s)
        offset += p.numel()
    return select_topk(scores, k_for_density(offset, density))
