"""Export a GaLLoP delta as a PEFT SHiRA adapter, so ``PeftModel.from_pretrained`` loads it.

PEFT's SHiRA (``peft.ShiraConfig``, `peft/tuners/shira/`) holds, per adapted linear layer, an
arbitrary set of (row, column) indices (``shira_indices``, int32 ``[2, K]``, restored from the
file as saved) and one fp32 value per index (``shira_weight``), added to the base weight as a
sparse matrix: exactly a sparse delta on linear weights. Its one restriction is the count: every
layer holds ``K = r·(in + out)`` entries for a single ``r`` (no per-layer rank), because the
adapter's parameters are built from ``r`` before the file is read.

So the export picks the smallest ``r`` with ``r·(in + out) ≥`` each layer's selected count and
pads every layer with zero-valued entries at unselected positions (the lowest flat positions not
selected) -- values that change nothing. It refuses, with the reason
(`docs/design.md#adapter-folder`), what SHiRA cannot hold:

- a tensor that is not a linear layer's weight (embeddings, norms, biases: SHiRA adapts
  ``nn.Linear`` layers only; a 4-bit ``Linear4bit`` base is fine);
- an ``r`` with ``r·(in + out) > in·out`` in some layer (SHiRA refuses it): a layer selected
  almost densely next to a narrow one;
- a delta of absolute values (version 1): SHiRA stores differences.

Values are rounded to float32 (a float64 difference loses its last bits; PEFT adds them in the
base's dtype, so a merged PEFT model matches `apply_delta` to float rounding, not bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gallop_kernels.delta import DIFFERENCE, SparseDelta
from gallop_kernels.quiet import no_bitsandbytes_notice

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LINEAR_CLASSES = ("Linear", "Linear4bit")
_PREFIX = "base_model.model."


class NotExportable(ValueError):
    """SHiRA cannot hold this delta; the message says why."""


@dataclass
class ShiraExport:
    """What `shira_export` produces: PEFT's config dict and its safetensors tensors."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    r: int
    padding: int


def _layers(delta: SparseDelta) -> dict[str, tuple[str, int, int]]:
    """tensor name → (module name, out, in) for every tensor, or `NotExportable`."""
    if delta.kind != DIFFERENCE:
        raise NotExportable("the delta stores absolute values (format version 1); SHiRA stores "
                            "differences: convert it with to_difference(delta, base) first")
    owners = delta.modules
    if not owners:
        raise NotExportable("the delta does not record which modules own its tensors (written before "
                            "format version 2 or by hand), so they cannot be shown to be linear layers")
    layers = {}
    for name, shape in delta.shapes.items():
        cls = owners.get(name)
        if not name.endswith(".weight") or len(shape) != 2 or cls not in LINEAR_CLASSES:
            raise NotExportable(f"SHiRA adapts linear layers only, and {name!r} is a {cls or 'unknown'} "
                                "tensor; train all-linear targets to export to PEFT")
        layers[name] = (name[: -len(".weight")], int(shape[0]), int(shape[1]))
    return layers


def _padded(indices: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """``indices`` plus the lowest ``count − len(indices)`` positions not in them, sorted."""
    k = indices.numel()
    candidates = torch.arange(min(count + k, numel), dtype=torch.int64)
    free = candidates[~torch.isin(candidates, indices)][: count - k]
    return torch.sort(torch.cat([indices, free])).values


def shira_export(delta: SparseDelta) -> ShiraExport:
    """The delta as PEFT SHiRA files' content, or `NotExportable` (module docstring)."""
    try:
        with no_bitsandbytes_notice():  # peft imports bitsandbytes
            from peft import ShiraConfig
    except ImportError as e:
        raise NotExportable(f"peft with SHiRA (peft >= 0.17) is not installed: {e}") from e
    layers = _layers(delta)
    r = max([1] + [math.ceil(delta.indices[n].numel() / (o + i)) for n, (_, o, i) in layers.items()])
    for name, (_, out_f, in_f) in layers.items():
        if r * (out_f + in_f) > out_f * in_f:
            raise NotExportable(f"SHiRA needs one r for every layer; r={r} (for the densest layer) gives "
                                f"{name!r} ({out_f}x{in_f}) more entries than it has")
    tensors, padding = {}, 0
    for name, (module, out_f, in_f) in layers.items():
        idx = delta.indices[name].to(torch.int64)
        count = r * (out_f + in_f)
        full = _padded(idx, count, out_f * in_f)
        weight = torch.zeros(count, dtype=torch.float32)
        weight[torch.searchsorted(full, idx)] = delta.values[name].float()
        tensors[f"{_PREFIX}{module}.shira_indices"] = torch.stack([full // in_f, full % in_f]).to(torch.int32)
        tensors[f"{_PREFIX}{module}.shira_weight"] = weight
        padding += count - idx.numel()
    config = ShiraConfig(r=r, target_modules=sorted(m for m, _, _ in layers.values()),
                         base_model_name_or_path=delta.metadata.get("base_model") or None,
                         mask_type="random", init_weights=True, inference_mode=True).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return ShiraExport(config, tensors, r, padding)
