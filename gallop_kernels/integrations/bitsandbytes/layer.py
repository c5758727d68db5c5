"""`SparseDeltaLinear`: a frozen base linear layer plus a trainable sparse fp32 delta."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from gallop_kernels import rules
from gallop_kernels.integrations.bitsandbytes.autograd import SparseDeltaLinearFn
from gallop_kernels.integrations.bitsandbytes.base import (
    dequantized_weight,
    is_linear4bit,
)
from gallop_kernels.phase_one import HostGradientBuffer
from gallop_kernels.rules import check_index_set


class SparseDeltaLinear(nn.Module):
    """A frozen base linear layer (``Linear4bit`` or ``nn.Linear``) plus a trainable sparse delta.

    ``forward(x) = x @ (W + Δ)ᵀ + b`` with W the (dequantized) base weight and Δ the dense
    weight-shaped tensor holding ``delta_values`` at the flat positions ``delta_indices``.
    W + Δ is formed in the compute dtype (bitsandbytes' ``compute_dtype``, else the input's), with
    each selected entry rounded once from the fp32 sum, for one layer at a time, and is not saved
    for backward. ``delta_values`` are fp32 and are the master copy: in a bf16 forward a delta
    smaller than half a bf16 ulp of its weight does not change the output yet, but it is not lost.

    Attributes:
        base: the wrapped layer (left untouched; its weight never requires grad).
        delta_indices: sorted flat indices (`rules.index_dtype`), a buffer.
        delta_values: fp32 ``nn.Parameter``, one value per index.
        selection_info: ``{"score", "density"}`` of the phase one that chose the indices.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"SparseDeltaLinear wraps nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}"
            )
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = base.weight.device
        self.register_buffer(
            "delta_indices",
            torch.empty(0, dtype=rules.index_dtype(self.weight_numel), device=device),
        )
        self.delta_values = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=device))
        self.tap_buffer: HostGradientBuffer | None = None
        self.selection_info: dict[str, str] = {}

    # -- shapes and weights ------------------------------------------------------------------

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def is_4bit(self) -> bool:
        return is_linear4bit(self.base)

    def dequantized_weight(self) -> torch.Tensor:
        """The base's dense weight (a fresh dequantized tensor for a 4-bit base)."""
        return dequantized_weight(self.base)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.is_4bit:
            return self.base.compute_dtype or x.dtype
        return self.base.weight.dtype

    def effective_weight(self, dtype: torch.dtype, values: torch.Tensor | None = None) -> torch.Tensor:
        """W + Δ in ``dtype``: a fresh dense tensor; each selected entry rounded once from fp32."""
        base = self.dequantized_weight()
        values = self.delta_values if values is None else values
        weight = base.to(dtype)
        if self.delta_indices.numel() == 0:
            return weight
        if weight.data_ptr() == base.data_ptr() and not self.is_4bit:
            weight = weight.clone()  # never write into an nn.Linear base's own weight
        idx = self.delta_indices.to(torch.int64)
        summed = base.reshape(-1).index_select(0, idx).float() + values.detach().float()
        weight.view(-1).index_copy_(0, idx, summed.to(dtype))
        return weight

    def dense_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Δ as a dense weight-shaped tensor (for merging onto a full-precision base)."""
        out = torch.zeros(self.weight_numel, dtype=dtype, device=self.delta_values.device)
        out.index_copy_(0, self.delta_indices.to(torch.int64), self.delta_values.detach().to(dtype))
        return out.view(self.weight_shape)

    # -- the delta ---------------------------------------------------------------------------

    def set_delta_indices(self, indices: torch.Tensor) -> None:
        """Install a selection: sorted unique flat indices; the values restart at zero.

        ``delta_values`` becomes a new Parameter: build the optimizer after this.
        """
        idx = check_index_set(torch.as_tensor(indices), self.weight_numel, "delta indices")
        device = self.delta_values.device
        self.delta_indices = idx.to(device=device, dtype=rules.index_dtype(self.weight_numel))
        self.delta_values = nn.Parameter(
            torch.zeros(idx.numel(), dtype=torch.float32, device=device),
            requires_grad=idx.numel() > 0,
        )

    def load_delta(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Install a saved delta (indices and their values)."""
        values = torch.as_tensor(values).reshape(-1)
        if values.numel() != torch.as_tensor(indices).numel():
            raise ValueError("indices and values must have the same number of entries")
        self.set_delta_indices(indices)
        with torch.no_grad():
            self.delta_values.copy_(values.to(torch.float32))

    # -- forward -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def tap(self, buffer: HostGradientBuffer) -> Iterator[HostGradientBuffer]:
        """Within the block, every backward through this layer adds its dense weight gradient
        (``grad_outᵀ x``, fp32) to ``buffer``: the gradient the base weight would have."""
        previous = self.tap_buffer
        self.tap_buffer = buffer
        try:
            yield buffer
        finally:
            self.tap_buffer = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.delta_indices.numel() == 0 and self.tap_buffer is None
        if plain and (not self.is_4bit or x.device.type != "cpu"):
            return self.base(x)  # no delta: the base's own (possibly fused) kernel
        inp_dtype = x.dtype
        dtype = self.compute_dtype(x)
        bias = self.base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        values = self.delta_values
        if self.tap_buffer is not None and not values.requires_grad:
            # The tap needs a backward through this layer even when nothing before it trains.
            values = values.detach().requires_grad_(True)
        out = SparseDeltaLinearFn.apply(x.to(dtype), values, bias, self)
        return out.to(inp_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"base={type(self.base).__name__}, selected={self.delta_indices.numel()}"
        )


def sparse_delta_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """Every :class:`SparseDeltaLinear` in ``model``, by qualified module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def delta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, delta_values)`` of every non-empty sparse delta in ``model``, in module order."""
    return [
        (f"{name}.delta_values", m.delta_values)
        for name, m in sparse_delta_modules(model).items()
        if m.delta_values.numel() > 0
    ]
