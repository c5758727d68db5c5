"""8-bit blockwise optimizer state: the dynamic maps and the one quantization rule.

The contract of ``state_bits=8`` (`docs/design.md#state-layout`) is that every backend produces
the same codes, absmaxes and weights, bit for bit, step after step. So this module defines the
quantization rule exactly (not "whatever bitsandbytes' CPU or CUDA quantizer does"), `naive.py`
defines the step's float32 arithmetic, and the Triton kernel (`kernel.py`) computes the same
operations in the same order. The maps are bitsandbytes' values, built here (`dynamic_map`), so
8-bit state needs no bitsandbytes.
"""

from __future__ import annotations

import functools

import torch

QUANT_BLOCK = 256
"""Entries per absmax block of 8-bit state, as bitsandbytes' blockwise 8-bit optimizers."""



def quantization_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dynamic map (256 sorted float32 values in [-1, 1]): signed for ``exp_avg``, unsigned
    for ``exp_avg_sq``."""
    return _quantization_map(signed, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _quantization_map(signed: bool, device: str) -> torch.Tensor:
    return dynamic_map(signed).to(device)


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' "dynamic" 8-bit map, built here so that 8-bit state needs no bitsandbytes.

    Seven decades of magnitude (10^-6 … 1), each split linearly: decade i holds the midpoints of
    ``linspace(0.1, 1, n_i)`` scaled by 10^(i-6), with n_i = 2^i + 1 for the signed map (each
    value and its negative) and 2^(i+1) + 1 for the unsigned one; plus 0 and 1; sorted. This is
    `bitsandbytes.functional.create_dynamic_map(signed)`'s construction (7 exponent bits, 8
    bits), in the same float32 operations: tests/test_adamw_8bit.py checks the values against
    bitsandbytes where it is installed and against a pinned digest everywhere.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, (2**i if signed else 2 ** (i + 1)) + 1, dtype=torch.float32)
        midpoints = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * midpoints).tolist()
        if signed:
            values += (-scale * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


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
    nearer one (measured; tests/test_adamw_8bit.py pins that ours is never farther). Small
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
