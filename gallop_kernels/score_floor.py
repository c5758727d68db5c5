"""Magnitude floors for a quantized base: the ``score_floor`` of `SparseAdamW` (`docs/design.md#score-floor`).

A weight of a quantized base is only known to within half a quantization step: a GGUF Q4_1 block
stores ``d·q + m`` (q in 0..15), an NF4 block ``absmax·code``, so every weight whose true
magnitude was below about half a step comes back as (nearly) the same tiny value -- often exactly
0. The GaLLoP score |g| / (|θ| + ε) divides by that noise: on the embedded SmolLM2 (a dequantized
Q4_1 file) it selects every one of the 33,483 exact zeros first. The floor replaces |θ| by
max(|θ|, floor_t), floor_t = ``fraction`` (default ½) × the tensor's typical (median) step, so
that entries below the base's resolution tie on magnitude and are ranked by |g| alone.

The step of each block is read off the dequantized values (no access to the file needed): for the
affine formats (Q4_1, Q5_1) it is the block's range over the number of levels minus one; for the
symmetric ones (Q4_0, Q5_0, Q8_0, NF4) the block's largest magnitude over the largest code (NF4:
times the code nearest to zero, 0.0796, the spacing that matters for small weights). The
formulas are exact for blocks quantized the way llama.cpp and bitsandbytes do it (the extreme
element of a block lands on the extreme code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

NF4_SMALLEST_CODE = 0.07958029955625534
"""bitsandbytes' NF4 code nearest to zero (the positive one; the negative is -0.0911)."""


@dataclass(frozen=True)
class BlockFormat:
    """How a format's step is read from one block of dequantized values."""

    block: int  # entries per block, along the flattened (row-major) weight
    affine: bool  # True: step = (max − min) / divisor; False: step = max |w| / divisor
    divisor: float


FORMATS: dict[str, BlockFormat] = {
    "q4_0": BlockFormat(32, False, 8.0),  # w = d·(q − 8): the block's largest |w| is 8|d|
    "q4_1": BlockFormat(32, True, 15.0),  # w = d·q + m, q in 0..15: max − min = 15 d
    "q5_0": BlockFormat(32, False, 16.0),
    "q5_1": BlockFormat(32, True, 31.0),
    "q8_0": BlockFormat(32, False, 127.0),
    "nf4": BlockFormat(64, False, 1.0 / NF4_SMALLEST_CODE),  # step next to 0 = 0.0796 · absmax
}


def _format(fmt: str) -> BlockFormat:
    try:
        return FORMATS[fmt.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"no magnitude floor for quantization format {fmt!r}; known: {', '.join(FORMATS)}") from None


def block_steps(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The quantization step of every block of ``weight`` (float32, one per block)."""
    spec = _format(fmt)
    flat = weight.detach().reshape(-1).to(torch.float32)
    if flat.numel() % spec.block:
        raise ValueError(f"a {fmt} tensor has a multiple of {spec.block} entries, got {flat.numel()}")
    blocks = flat.view(-1, spec.block)
    if spec.affine:
        lo, hi = torch.aminmax(blocks, dim=1)
        return (hi - lo) / spec.divisor
    return blocks.abs().amax(dim=1) / spec.divisor


def quantization_floor(weight: torch.Tensor, fmt: str, fraction: float = 0.5) -> float:
    """``fraction`` × the median block step of ``weight`` quantized as ``fmt``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return fraction * float(block_steps(weight, fmt).median())


def smallest_nonzero(weight: torch.Tensor) -> float:
    """The smallest non-zero |θ| of ``weight`` (0 when all are zero): the floor that only turns
    exact zeros into ties with the next magnitude up."""
    mag = weight.detach().abs().reshape(-1)
    nonzero = mag[mag > 0]
    return float(nonzero.min()) if nonzero.numel() else 0.0


def floors(named_params: Iterable[tuple[str, torch.Tensor]], formats: Mapping[str, str],
           fraction: float = 0.5) -> list[float]:
    """One floor per param, in order: `quantization_floor` for a param whose name has a format in
    ``formats``, 0 (no floor) for the others (weights stored unquantized)."""
    return [quantization_floor(p, formats[name], fraction) if name in formats else 0.0
            for name, p in named_params]


__all__ = ["FORMATS", "NF4_SMALLEST_CODE", "BlockFormat", "block_steps", "floors", "quantization_floor",
           "smallest_nonzero"]
