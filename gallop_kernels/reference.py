"""Pure-torch implementation of every op: the CPU path and the oracle the Triton kernels are held to.

Everything here is written to be obviously right rather than fast (`docs/design.md#selection-semantics`,
`docs/design.md#sparse-update`):

* scores are computed in float32 from the upcast parameter and gradient;
* selection is an exact top-k over the concatenation of a group's tensors, where among equal
  scores the lower flat index wins (a stable descending sort gives exactly that order);
* the sparse AdamW step follows PyTorch's AdamW order of operations, in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Union

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = Union[str, ScoreFn]

SCORE_NAMES = ("gallop", "gradient", "magnitude", "random")
INT32_LIMIT = 2**31

_MASK32 = 0xFFFFFFFF


def k_for_density(numel: int, density: float) -> int:
    """Number of entries to select: ``min(N, max(1, floor(density * N + 0.5)))``."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def index_dtype(numel: int) -> torch.dtype:
    """Per-tensor index dtype: int32, or int64 for a tensor of 2^31 entries or more."""
    return torch.int64 if numel >= INT32_LIMIT else torch.int32


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


def hash_uniform(flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) (multiples of 2^-24) determined by ``(seed, flat_index)``.

    ``flat_index`` is the entry's position in its group's concatenation (int64, may exceed 2^32).
    """
    idx = flat_index.to(torch.int64)
    seed_mix = lowbias32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=idx.device))
    high = lowbias32(((idx >> 32) + seed_mix) & _MASK32)
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
) -> torch.Tensor:
    """Flat float32 score of every entry of ``param`` (`docs/design.md#selection-semantics`).

    ``grad=None`` counts as an all-zero gradient. ``offset`` is the position of ``param``'s first
    entry in its group's concatenation; only the ``"random"`` score depends on it.
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
        return 1.0 / (theta.abs() + score_eps)
    g = (
        torch.zeros_like(theta)
        if grad is None
        else grad.detach().reshape(-1).to(torch.float32)
    )
    if score == "gradient":
        return g.abs()
    if score == "gallop":
        return g.abs() / (theta.abs() + score_eps)
    raise ValueError(f"unknown score {score!r}; expected one of {SCORE_NAMES} or a callable")


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
) -> list[torch.Tensor]:
    """Phase one of GaLLoP for one group: score every entry, then select the global top-k."""
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    scores = []
    offset = 0
    for p, g, name in zip(params, grads, names):
        s = compute_score(p, g, score, score_eps, seed, offset)
        check_finite(s, name)
        scores.append(s)
        offset += p.numel()
    return select_topk(scores, k_for_density(offset, density))


# ----------------------------------------------------------------------------------------------
# Sparse AdamW
# ----------------------------------------------------------------------------------------------


def _selected_entries(
    param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, master: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both steps read: the flat param, int64 indices, the selected gradient in float32
    (``grad`` dense or already gathered) and the float32 weight (``master`` itself, or a copy)."""
    flat = param.data.view(-1)
    idx = indices.to(torch.int64)
    g = grad.reshape(-1)
    if g.numel() != idx.numel():
        g = g[idx]
    return flat, idx, g.to(torch.float32), (master if master is not None else flat[idx].to(torch.float32))


def sparse_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
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

    w.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    flat[idx] = w.to(param.dtype)


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise optimizer state (bitsandbytes' dynamic quantization maps)
#
# The contract of state_bits=8 is that every backend produces the same codes, absmaxes and
# weights, bit for bit, step after step. So this section defines both the quantization rule and
# the step's float32 arithmetic exactly (not "whatever torch's CPU or CUDA kernels do"), and the
# Triton kernel (`gallop_kernels.ops.triton.sparse_adamw`) computes the same operations in the
# same order. bitsandbytes stays the source of the maps.
# ----------------------------------------------------------------------------------------------

QUANT_BLOCK = 256
"""Entries per absmax block of 8-bit state, as bitsandbytes' blockwise 8-bit optimizers."""


def quantization_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' dynamic map (256 sorted float32 values in [-1, 1]): signed for
    ``exp_avg``, unsigned for ``exp_avg_sq``."""
    return _quantization_map(signed, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _quantization_map(signed: bool, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map(signed=signed).to(device=device, dtype=torch.float32)


def quantize_blockwise(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (uint8 codes, fp32 absmax per block of `QUANT_BLOCK`): the one quantization rule.

    Per block, ``absmax`` is the largest ``|x|`` (signed) or the largest ``x`` (unsigned, x >= 0),
    ``s = x / absmax`` (IEEE float32 division; 0 when absmax is 0) clamped to [-1, 1], and the
    code is the index of the map value nearest to ``s``: the last map value ``<= s`` or the next
    one, whichever has the smaller float32 distance ``|c - s|``, the lower code on a tie.

    How this relates to bitsandbytes: the absmaxes and the maps are bitsandbytes' own, and
    dequantization (``map[code] * absmax``) is identical, so bitsandbytes can read these codes.
    Its quantizers do not always pick the nearest code: on the same values and maps its CPU
    ``quantize_blockwise`` picks another code for ~0.2% of entries of Gaussian (m-like) or
    uniform blocks and ~3% of squared-Gaussian (v-like) blocks, up to 7 codes away, and never a
    nearer one (measured; tests/test_state_8bit.py pins that ours is never farther). Small
    per-step differences compound through the moments, so an optimizer that mixed the two
    rules would drift apart within tens of steps. Nearest-with-ties-down is a rule that a Triton
    kernel, a vectorised torch function and a reader can all state and reproduce exactly.
    """
    device = values.device
    x = values.reshape(-1).to(torch.float32)
    n = x.numel()
    if n == 0:
        return (torch.empty(0, dtype=torch.uint8, device=device),
                torch.empty(0, dtype=torch.float32, device=device))
    blocks = -(-n // QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32, device=device)
    padded[:n] = x
    padded = padded.view(blocks, QUANT_BLOCK)
    absmax = (padded.abs() if signed else padded).amax(dim=1)
    # An elementwise division by a broadcast tensor: IEEE on every device (torch's CUDA kernels
    # multiply by a reciprocal only when the divisor is a host scalar).
    scaled = torch.where(absmax[:, None] > 0, padded / absmax[:, None], torch.zeros_like(padded))
    scaled = scaled.clamp(-1.0, 1.0).reshape(-1)[:n]
    code = quantization_map(signed, device)
    lo = (torch.searchsorted(code, scaled, right=True) - 1).clamp_(min=0)
    up = (lo + 1).clamp_(max=code.numel() - 1)
    nearer_up = (code[up] - scaled).abs() < (scaled - code[lo]).abs()
    return torch.where(nearer_up, up, lo).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """(uint8 codes, absmax) -> fp32: ``map[code] * absmax`` (bitsandbytes' dequantization)."""
    if codes.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=codes.device)
    code = quantization_map(signed, codes.device)
    block_max = absmax.repeat_interleave(QUANT_BLOCK)[: codes.numel()]
    return code[codes.long()] * block_max


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


def adamw_update_exact(w, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float):
    """One AdamW step in float32 with every rounding defined; returns new (w, m, v).

    The same operations as the Triton kernel (`ops/triton/adamw_math.adamw_update`), in order:
    scalars rounded to float32 from Python doubles; ``w·decay``; ``m = fma(g, 1-β1, m·β1)``;
    ``v = fma((1-β2)·g, g, v·β2)``; ``denom = sqrt_rn(v) / sqrt(1-β2^t) + eps`` (correctly
    rounded square root: float64 sqrt of a float32 then rounded, which is exact for float32);
    ``w + (-lr/(1-β1^t))·m / denom``. IEEE division throughout.
    """
    dev = w.device

    def f32(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=dev)

    decay = f32(1.0 - lr * weight_decay)
    b1, c1, b2, c2 = f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2)
    bc2_sqrt = f32(math.sqrt(1.0 - beta2**step))
    step_size = f32(-lr / (1.0 - beta1**step))
    w = w * decay
    m = fma_f32(g, c1, m * b1)
    v = fma_f32(c2 * g, g, v * b2)
    root = v.to(torch.float64).sqrt().to(torch.float32)
    denom = _div_f32(root, bc2_sqrt) + f32(eps)
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
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """`sparse_adamw_step` with m, v held as 8-bit blockwise codes, in place: dequantize,
    `adamw_update_exact`, requantize with `quantize_blockwise`. Every backend reproduces this
    bit for bit (codes, absmaxes, master and param)."""
    if indices.numel() == 0:
        return
    flat, idx, g, w = _selected_entries(param, grad, indices, master)
    m = dequantize_blockwise(exp_avg, exp_avg_absmax, signed=True)
    v = dequantize_blockwise(exp_avg_sq, exp_avg_sq_absmax, signed=False)
    w_new, m, v = adamw_update_exact(w, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
    if master is not None:
        master.copy_(w_new)
    flat[idx] = w_new.to(param.dtype)
    for codes, absmax, value, signed in (
        (exp_avg, exp_avg_absmax, m, True), (exp_avg_sq, exp_avg_sq_absmax, v, False)
    ):
        new_codes, new_absmax = quantize_blockwise(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
