"""Saving and loading the sparse delta of a (4-bit) base.

Two forms:

* :func:`sparse_delta_state` / :func:`load_sparse_delta_state`: ``{layer: (indices, Δ values)}``,
  the trainable state itself (reload it onto a freshly loaded 4-bit base and keep training);
* :func:`extract_sparse_delta` / :func:`apply_sparse_delta`: the `gallop_kernels.delta` file
  format. Its values are the differences Δ from the *dequantized* base (the layer's
  ``delta_values`` themselves, fp32) under the name ``f"{layer}.weight"`` of the unwrapped model,
  and its fingerprint samples the dequantized base with the NF4/FP4 rounding allowance, so the
  same file also applies (`delta.apply_delta`) to the full-precision base: ``W_fp + Δ``. That
  merge is what the 4-bit model computed up to the base's quantization error (at most about a
  fifth of each block's largest weight, usually far more than Δ itself): it is the fine-tune
  transferred to the full-precision weights, not a bit-exact copy of the 4-bit model's outputs.

Why there is no ``merge()``/``unmerge()`` onto a 4-bit base: W + Δ re-quantized to NF4, whose
step (about absmax/8 per block of 64) is far larger than a fine-tuning delta, would mostly round
the delta away. Keep the delta separate (it is tiny) or merge it onto a full-precision copy.
Everything is checked (the whole delta, every layer, the fingerprint) before the model changes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from gallop_kernels import delta as delta_format
from gallop_kernels.delta.fingerprint import TensorView, record
from gallop_kernels.integrations.bitsandbytes.base import base_quantization, dequantized_weight, is_linear4bit
from gallop_kernels.integrations.bitsandbytes.layer import (
    SparseDeltaLinear,
    delta_parameters,
    sparse_delta_modules,
)
from gallop_kernels.integrations.bitsandbytes.selection import wrap_layers


def base_view(module: nn.Module) -> TensorView:
    """The fingerprint's view of a layer's base weight: dequantized, with the quantization
    blocksize of a 4-bit layer (its rounding allowance)."""
    base = module.base if isinstance(module, SparseDeltaLinear) else module
    blocksize = None
    if is_linear4bit(base):
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        blocksize = int(getattr(state, "blocksize", 64))
    return TensorView(dequantized_weight(base), blocksize)


def sparse_delta_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (indices, values)}`` for every non-empty sparse delta in ``model``.

    The layer name is the wrapped module's qualified name, which is also the name of the linear
    layer in the unwrapped base model (its weight is ``f"{name}.weight"``). Indices are the sorted
    flat positions in that weight (`rules.index_dtype`), values fp32; both detached copies on
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
    parent = name.rpartition(".")[0]
    if isinstance(model.get_submodule(parent) if parent else model, SparseDeltaLinear):
        raise ValueError(f"layer {name!r} is the base inside a SparseDeltaLinear; name the wrapper ({parent!r})")
    return module


def load_sparse_delta_state(
    model: nn.Module, state: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, SparseDeltaLinear]:
    """Wrap the named layers of ``model`` (if not wrapped yet) and install the saved deltas.

    Everything is checked (names, index sets, one finite float value per index, finite in fp32)
    before the model changes; afterwards only the delta values require grad.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping {{layer: (indices, values)}}, got {type(state).__name__}")
    plan, seen = [], {}
    for name, entry in state.items():
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f"layer {name!r}: expected an (indices, values) pair")
        indices, values = entry
        module = _linear_layer(model, name)
        if id(module) in seen:
            raise ValueError(f"layers {seen[id(module)]!r} and {name!r} are the same module")
        seen[id(module)] = name
        idx = delta_format.check_entries(f"layer {name!r}", indices, values,
                                         module.in_features * module.out_features)
        if not bool(torch.isfinite(values.float()).all()):
            raise ValueError(f"layer {name!r}: values overflow float32")
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
    the fp32 differences Δ from the dequantized base, with its fingerprint (module docstring)."""
    indices, values, shapes, samples, modules = {}, {}, {}, {}, {}
    quant, scores, densities = set(), set(), set()
    for name, m in sparse_delta_modules(model).items():
        if m.delta_indices.numel() == 0:
            continue
        key = f"{name}.weight"
        indices[key] = m.delta_indices.detach().cpu().clone()
        values[key] = m.delta_values.detach().float().cpu().clone()
        shapes[key] = m.weight_shape
        samples[key] = record(base_view(m), m.delta_indices)
        modules[key] = type(m.base).__name__
        quant.add(base_quantization(m.base))
        if m.selection_info:
            scores.add(m.selection_info["score"])
            densities.add(m.selection_info["density"])
    if not indices:
        raise ValueError("the model has no non-empty sparse delta: nothing to extract")
    return delta_format.new_delta(indices, values, shapes, base_model=base_model, scores=scores,
                                  densities=densities, dtypes=["float32"], base=samples, modules=modules,
                                  fields={"base_quantization": ",".join(sorted(quant))}, metadata=metadata)


def apply_sparse_delta(
    model: nn.Module,
    delta: delta_format.SparseDelta | str | os.PathLike,
    *,
    scale: float = 1.0,
    check_base: bool = True,
) -> dict[str, SparseDeltaLinear]:
    """Install a delta (a `SparseDelta`, a delta file or an adapter folder) onto a freshly loaded
    (4-bit) base as the trainable ``delta_values``: ``scale`` × its differences, or for a
    version-1 file (absolute values) ``scale`` × (value − dequantized base).

    Refused before the model changes: an invalid delta, a tensor that is not a linear layer's
    weight of the recorded shape, and a base that differs from the recorded fingerprint
    (``check_base=False`` overrides; a delta without one only warns).
    """
    scale = delta_format.check_scale(scale)
    delta = delta_format.as_delta(delta)
    layers = {}
    for key in delta.indices:
        if not key.endswith(".weight"):
            raise ValueError(f"delta tensor {key!r} is not a linear layer's weight")
        name = key[: -len(".weight")]
        module = _linear_layer(model, name)
        shape = (module.out_features, module.in_features)
        if tuple(delta.shapes[key]) != shape:
            raise ValueError(f"{key}: delta shape {tuple(delta.shapes[key])} != layer shape {shape}")
        layers[key] = (name, module)
    if check_base:  # one layer dequantized at a time
        delta_format.check_base(delta, ((key, base_view(module)) for key, (_, module) in layers.items()))
    state = {}
    for key, (name, module) in layers.items():
        idx = delta.indices[key].to(torch.int64)
        values = delta.values[key]
        if delta.kind == delta_format.DIFFERENCE:
            diff = values.double() * scale
        else:
            diff = (values.double() - base_view(module).gather(idx).double()) * scale
        diff = diff.float()
        if not bool(torch.isfinite(diff).all()):
            raise ValueError(f"{key}: the delta with scale {scale} is not finite in float32")
        state[name] = (delta.indices[key], diff)
    return load_sparse_delta_state(model, state)
