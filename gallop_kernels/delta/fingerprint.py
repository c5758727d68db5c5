"""The base fingerprint: a small, content-based sample of the base a delta was trained from.

A delta stores differences, so it only means something on its own base. Each trained tensor keeps
a `BaseSample` (`docs/design.md#delta-fingerprint`): the base's values at

- a fixed sample of `FIXED_SAMPLE` positions spread over the tensor (a golden-ratio sequence in
  integer arithmetic: the same positions on every machine for one shape), and
- up to `TOUCHED_SAMPLE` of the positions the delta changes (evenly spaced over its indices),

stored in the base's own dtype. When the base was block-quantized (a 4-bit NF4/FP4 base), the
values are the dequantized ones and each carries a tolerance of `QUANTIZED_TOLERANCE` times the
largest magnitude in its quantization block, so the full-precision base matches a delta trained on
its 4-bit copy. Positions are kept in the sample, so a reader never recomputes them.

A model matches a sample when, at every sampled position, its value equals the recorded one after
both are rounded to the coarser of their two dtypes (bit for bit when the dtypes agree; a base
loaded in bf16 from fp32 weights matches, since its values are the fp32 ones rounded). Samples
must be float16, bfloat16, float32 or float64 (`SAMPLE_DTYPES`): the check is never looser than
bf16's rounding, whatever dtype a file stores its sample in. A quantized base compares within the
tolerances instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

import torch

FIXED_SAMPLE = 32
TOUCHED_SAMPLE = 32
QUANTIZED_TOLERANCE = 0.25
"""NF4 and FP4 round an entry by at most 0.18 of its block's largest dequantized magnitude
(measured with bitsandbytes, blocksize 64, with and without double quantization)."""

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
SAMPLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes a sample may be stored in (a base's own dtype); a file with another is refused."""


@dataclass
class BaseSample:
    """The base's values at sorted unique flat ``positions`` of one tensor (``tolerance``: None
    for an exact base, else the fp32 allowance per position of a quantized one)."""

    positions: torch.Tensor
    values: torch.Tensor
    tolerance: torch.Tensor | None = None


class TensorView:
    """A base tensor as the fingerprint sees it: dense values (dequantized for a 4-bit layer) and,
    for a block-quantized one, its ``blocksize`` (the tolerance of each value)."""

    def __init__(self, tensor: torch.Tensor, blocksize: int | None = None) -> None:
        self.flat = tensor.detach().reshape(-1)
        self.blocksize = blocksize

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        return self.flat.index_select(0, positions.to(self.flat.device)).cpu()

    def tolerance(self, positions: torch.Tensor) -> torch.Tensor | None:
        if self.blocksize is None:
            return None
        size = int(self.blocksize)
        starts = positions.to(self.flat.device) // size * size
        block = starts[:, None] + torch.arange(size, device=self.flat.device)[None, :]
        block = block.clamp_(max=self.numel - 1)
        absmax = self.flat[block].float().abs().amax(dim=1)
        return (QUANTIZED_TOLERANCE * absmax).cpu()


def fixed_positions(numel: int, count: int = FIXED_SAMPLE) -> torch.Tensor:
    """``count`` positions spread over ``[0, numel)`` (all of them for a small tensor)."""
    if numel <= count:
        return torch.arange(numel, dtype=torch.int64)
    picks = {(((i + 1) * _GOLDEN) % (1 << 64)) * numel >> 64 for i in range(count)}
    return torch.tensor(sorted(picks), dtype=torch.int64)


def touched_positions(indices: torch.Tensor, count: int = TOUCHED_SAMPLE) -> torch.Tensor:
    """Up to ``count`` of the delta's sorted ``indices``, evenly spaced, first and last included."""
    indices = indices.detach().to(torch.int64).cpu()
    k = indices.numel()
    if k <= count:
        return indices
    return indices[[i * (k - 1) // (count - 1) for i in range(count)]]


def sample_positions(numel: int, indices: torch.Tensor) -> torch.Tensor:
    """The sorted unique positions a delta of ``indices`` samples in a tensor of ``numel`` entries."""
    return torch.unique(torch.cat([fixed_positions(numel), touched_positions(indices)]))


def record(view: TensorView, indices: torch.Tensor) -> BaseSample:
    """The sample of ``view`` (the base tensor) for a delta changing ``indices``."""
    positions = sample_positions(view.numel, indices)
    return BaseSample(positions, view.gather(positions).clone(), view.tolerance(positions))


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max((a, b), key=lambda d: torch.finfo(d).eps)


def differs(recorded: torch.Tensor, recorded_tol: torch.Tensor | None,
            found: torch.Tensor, found_tol: torch.Tensor | None) -> torch.Tensor:
    """Per position: whether ``found`` differs from ``recorded``. Without tolerances: after rounding
    both to the coarser of their dtypes (exact when they agree). With a quantized side: by more
    than the tolerances plus one unit of the coarser dtype at that magnitude."""
    coarse = _coarser(recorded.dtype, found.dtype)
    if recorded_tol is None and found_tol is None:
        return recorded.to(coarse) != found.to(coarse)
    info = torch.finfo(coarse)
    allowed = (info.eps * torch.maximum(recorded.double().abs(), found.double().abs()) + info.tiny
               + sum(t.double() for t in (recorded_tol, found_tol) if t is not None))
    return (recorded.double() - found.double()).abs() > allowed


def mismatches(sample: BaseSample, view: TensorView) -> int:
    """How many sampled positions of ``view`` differ from ``sample``."""
    found = view.gather(sample.positions)
    return int(differs(sample.values, sample.tolerance, found, view.tolerance(sample.positions)).sum())


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes in memory order (no numpy: the core runs without it; samples are small)."""
    return bytes(tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1).tolist())


def digest(samples: Mapping[str, BaseSample], shapes: Mapping[str, tuple[int, ...]], version: str = "3") -> str:
    """``"sha256:<hex>"`` of every tensor's name, shape and sample: the fingerprint's identity,
    written to the metadata and checked on load (a tampered sample is refused). Version 3 hashes
    a domain tag first, so a version-3 file relabelled as version 2 does not match (version 2's
    digest is the same hash without the tag)."""
    h = hashlib.sha256()
    if version != "2":
        h.update(b"gallop-delta-3 base fingerprint\0")
    for name in sorted(samples):
        s = samples[name]
        h.update(f"{name}\0{tuple(shapes[name])}\0{s.values.dtype}\0".encode())
        h.update(_raw_bytes(s.positions.to(torch.int64)))
        h.update(_raw_bytes(s.values))
        if s.tolerance is not None:
            h.update(b"\0tol\0" + _raw_bytes(s.tolerance.float()))
    return "sha256:" + h.hexdigest()
