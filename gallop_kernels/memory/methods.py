"""The training methods the memory report compares, and their optimizer-state formulas: one registry.

The analytic model (`memory.model`) and the measurement (`memory.measure`) read a method's traits
from here instead of branching on its name, and the benchmarks' state table is meant to call
:func:`state_bytes` as well (`docs/design.md#memory-methods`):

* ``optimizer``: what holds the state -- ``"adamw"`` (torch AdamW, state in the trained tensors'
  dtype), ``"adamw-mixed"`` (fp32 master + fp32 m, v), ``"adamw8bit"`` (bitsandbytes),
  ``"sparse"`` (SparseAdamW);
* ``trains``: which tensors train -- ``"params"`` (the model's own), ``"lora"`` (fp32 adapters),
  ``"delta"`` (the fp32 delta values of a 4-bit base);
* ``lean``, ``state_bits``, ``four_bit``: SparseAdamW's lean mode, its 8-bit moments, a 4-bit base;
* ``reference``: a prediction-only row (not measured).

:func:`state_bytes` is the one formula of optimizer state for every method, given the tensors the
method trains as ``(entries, count)`` pairs (a flat parameter count is ``[(N, 1)]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from gallop_kernels.ops.adamw.quantization import QUANT_BLOCK
from gallop_kernels.rules import DEFAULT_MIN_8BIT_ENTRIES

BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes' AdamW8bit keeps fp32 m, v for tensors smaller than this (its ``min_8bit_size``)."""

QUANT_MAPS_BYTES = 2 * 256 * 4
"""bitsandbytes AdamW8bit's two fp32 quantization maps."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    optimizer: str  # "adamw" | "adamw-mixed" | "adamw8bit" | "sparse"
    trains: str = "params"  # "params" | "lora" | "delta"
    lean: bool = False
    state_bits: int = 32
    four_bit: bool = False
    reference: bool = False  # prediction only

    @property
    def sparse(self) -> bool:
        """SparseAdamW on the model's own weights."""
        return self.optimizer == "sparse"


REGISTRY: dict[str, Method] = {m.key: m for m in (
    Method("adamw", "torch AdamW", "adamw"),
    Method("adamw8bit", "bitsandbytes AdamW8bit", "adamw8bit"),
    Method("lora", "LoRA r=16, all linear (peft)", "adamw", trains="lora"),
    Method("sparse", "SparseAdamW plain", "sparse"),
    Method("sparse-lean", "SparseAdamW lean", "sparse", lean=True),
    Method("sparse-lean-8bit", "SparseAdamW lean + 8-bit state", "sparse", lean=True, state_bits=8),
    Method("sparse-4bit-delta", "4-bit NF4 base + sparse delta", "adamw", trains="delta", four_bit=True),
    Method("adamw-mixed", "AdamW, fp32 master + fp32 m, v (reference)", "adamw-mixed", reference=True),
)}

MEASURED = tuple(k for k, m in REGISTRY.items() if not m.reference)
"""The methods a measurement can run, in report order."""


def get(key: str) -> Method:
    """The registered method ``key``; ``ValueError`` naming the known ones otherwise."""
    try:
        return REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown method {key!r}; expected one of {', '.join(REGISTRY)}") from None


def sparse_entries(numel: int, density: float) -> int:
    """The memory model's assumption of how many entries of one tensor are selected: ρ of them
    (where they land is data-dependent)."""
    return max(0, round(density * numel))


def state_bytes(method: Method, tensors: Iterable[tuple[int, int]], *, param_bytes: int,
                density: float = 1.0, min_8bit_entries: int = DEFAULT_MIN_8BIT_ENTRIES) -> int:
    """Optimizer-state bytes of ``method`` over the tensors it trains, ``(entries, count)`` each.

    ``param_bytes``: bytes per entry of those tensors (the model's dtype; 4 for LoRA adapters and
    delta values, which are fp32). ``density`` only matters for SparseAdamW. Lean mode's compact
    gradients are not optimizer state.
    """
    tensors = list(tensors)
    if method.optimizer == "adamw":  # torch allocates m, v as zeros_like(param)
        return sum(2 * param_bytes * n * c for n, c in tensors)
    if method.optimizer == "adamw-mixed":
        return sum(12 * n * c for n, c in tensors)
    if method.optimizer == "adamw8bit":
        return QUANT_MAPS_BYTES + sum(
            c * (2 * (n + 4 * math.ceil(n / QUANT_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 8 * n)
            for n, c in tensors)
    if method.optimizer == "sparse":
        master = 4 if param_bytes < 4 else 0  # fp32 master copy of bf16/fp16 entries
        total = 0
        for n, c in tensors:
            k = sparse_entries(n, density)
            if method.state_bits == 8 and k >= min_8bit_entries:
                moments = 2 * k + 2 * 4 * math.ceil(k / QUANT_BLOCK)  # 1-byte m, v + fp32 absmax each
            else:
                moments = 8 * k
            total += c * (k * (4 + master) + moments)
        return total
    raise ValueError(f"method {method.key!r} has no state formula for optimizer {method.optimizer!r}")


__all__ = ["BNB_MIN_8BIT_SIZE", "MEASURED", "Method", "REGISTRY", "get", "sparse_entries", "state_bytes"]
