"""Saving and loading the sparse delta of a (4-bit) base.

Two forms:

* :func:`sparse_delta_state` / :func:`load_sparse_delta_state`: ``{layer: (indices, Δ values)}``,
  the trainable state itself (reload it onto a freshly loaded 4-bit base and keep training);
* :func:`extract_sparse_delta` / :func:`apply_sparse_delta`: the `gallop_kernels.delta` file
  format, which stores trained *values*, here ``W_dequantized[indices] + Δ`` in fp32 under the
  name ``f"{layer}.weight"`` of the unwrapped model. ``delta.apply_delta`` of it onto a dense model
  holding the dequantized base reproduces the trained model; applied to the full-precision base
  it overwrites the selected entries with dequantized-base + Δ (their NF4 rounding error
  included).

Why there is no ``merge()``/``unmerge()`` onto a 4-bit base: W + Δ re-quantized to NF4, whose
step (about absmax/8 per block of 64) is far larger than a fine-tuning delta, would mostly round
the delta away. Keep the delta separate (it is tiny) or merge it onto a full-precision copy.
Every index set goes through `delta.check_entries` before the model changes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from gallop_kernels import delta as delta_format
from gallop_kernels.integrations.bitsandbytes.base import base_quantization, dequantized_weight
from gallop_kernels.integrations.bitsandbytes.layer import (
    SparseDeltaLinear,
    delta_parameters,
    sparse_delta_modules,
)
from gallop_kernels.integrations.bitsandbytes.selection import wrap_layers


def sparse_delta_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (indices, values)}`` for every non-empty sparse delta in ``model``.

    The layer name is the wrapped module's qualified name, which is also the name of the linear
    layer in the unwrapped base model (its weight is ``f"{name}.weight"``). Indices are the sorted
    flat positions in that weight (`reference.index_dtype`), values fp32; both detached copies on
    the CPU, ready for safetensors.
    """
    return {
        name: (m.delta_indices.detach().cpu().clone(), m.delta_values.detach().cpu().clone())
        for name, m in sparse_delta_modules(model).items()
        if m.delta_indices.numel() > 0
    }


def _linear_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the model has no layer named {name!r}") from exc
    if not isinstance(module, (nn.Linear, SparseDeltaLinear)):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a linear layer")
    return module


def load_sparse_delta_state(
    model: nn.Module, state: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, SparseDeltaLinear]:
    """Wrap the named layers of ``model`` (if not wrapped yet) and install the saved deltas.

    Everything is checked (names, index sets, value counts) before the model changes; afterwards
    only the delta values require grad.
    """
    plan = []
    for name, (indices, values) in state.items():
        module = _linear_layer(model, name)
        values = torch.as_tensor(values).reshape(-1)
        idx = delta_format.check_entries(f"layer {name!r}", torch.as_tensor(indices), values,
                                         module.in_features * module.out_features)
        plan.append((name, module, idx, values))
    wrapped = wrap_layers(model, [(name, module) for name, module, *_ in plan])
    for name, _, idx, values in plan:
        wrapped[name].load_delta(idx, values)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in delta_parameters(model):
        p.requires_grad_(True)
    return wrapped


def extract_sparse_delta(
    model: nn.Module, *, base_model: str = "", metadata: dict[str, Any] | None = None
) -> delta_format.SparseDelta:
    """The model's sparse deltas as a `gallop_kernels.delta.SparseDelta` (for ``save_delta``):
    values ``W_dequantized[indices] + delta_values`` in fp32 (see the module docstring)."""
    indices, values, shapes = {}, {}, {}
    quant, scores, densities = set(), set(), set()
    for name, m in sparse_delta_modules(model).items():
        if m.delta_indices.numel() == 0:
            continue
        key = f"{name}.weight"
        idx = m.delta_indices.to(torch.int64)
        base = m.dequantized_weight().reshape(-1).index_select(0, idx).float()
        indices[key] = m.delta_indices.detach().cpu().clone()
        values[key] = (base + m.delta_values.detach().float()).cpu().contiguous()
        shapes[key] = m.weight_shape
        quant.add(base_quantization(m.base))
        if m.selection_info:
            scores.add(m.selection_info["score"])
            densities.add(m.selection_info["density"])
    if not indices:
        raise ValueError("the model has no non-empty sparse delta: nothing to extract")
    fields = {"base_quantization": ",".join(sorted(quant)), "values": "dequantized base + sparse delta"}
    return delta_format.new_delta(indices, values, shapes, base_model=base_model, scores=scores,
                                  densities=densities, dtypes=["float32"], fields=fields,
                                  metadata=metadata)


def apply_sparse_delta(model: nn.Module, delta: Any) -> dict[str, SparseDeltaLinear]:
    """Install a delta written by :func:`extract_sparse_delta` (a `SparseDelta` or a file path)
    onto a freshly loaded (4-bit) base: the stored values minus the dequantized base become the
    trainable ``delta_values``. Everything is checked before the model changes."""
    if not isinstance(delta, delta_format.SparseDelta):
        delta = delta_format.load_delta(delta)
    state = {}
    for key, indices in delta.indices.items():
        if not key.endswith(".weight"):
            raise ValueError(f"delta tensor {key!r} is not a linear layer's weight")
        name = key[: -len(".weight")]
        module = _linear_layer(model, name)
        shape = (module.out_features, module.in_features)
        if tuple(delta.shapes[key]) != shape:
            raise ValueError(f"{key}: delta shape {tuple(delta.shapes[key])} != layer shape {shape}")
        idx = delta_format.check_entries(f"delta tensor {key!r}", indices, delta.values[key],
                                         shape[0] * shape[1])
        base_module = module.base if isinstance(module, SparseDeltaLinear) else module
        base = dequantized_weight(base_module).reshape(-1).index_select(0, idx.to(base_module.weight.device))
        state[name] = (idx, delta.values[key].float() - base.float().cpu())
    return load_sparse_delta_state(model, state)
