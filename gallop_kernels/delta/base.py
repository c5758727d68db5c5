"""Where a delta's base values come from when a difference is taken: a model, a state dict, or
the base's safetensors weights on disk (read one tensor at a time).

A difference needs the base values of the trained entries, which the trained model no longer
holds. Any of these gives them (`docs/design.md#delta-format`):

- the base model itself (``nn.Module``), e.g. loaded again with ``from_pretrained``;
- a mapping ``{parameter name: tensor}`` (a state dict, or a copy taken before training);
- a path: a Hugging Face model folder (``model.safetensors`` or a sharded
  ``model.safetensors.index.json``) or one ``.safetensors`` file. Tensors are read lazily, one
  at a time, so extracting from an 8B base needs no second copy of the model in memory.

A base tensor is returned in the dtype the trained parameter has (``from_pretrained`` with
``dtype=`` rounds the stored weights the same way), so a bf16 run on an fp32 checkpoint
differences against the bf16 values it actually started from.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

import torch
from torch import nn

BaseSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class BaseTensors:
    """``get(name, shape, dtype, device)``: the base tensor ``name``, checked to have ``shape``,
    converted to ``dtype`` on ``device``."""

    def __init__(self, source: BaseSource) -> None:
        self._mapping: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, str] = {}
        self.where = ""
        if isinstance(source, nn.Module):
            self._mapping = dict(source.named_parameters(remove_duplicate=False))
            self.where = f"the base model ({type(source).__name__})"
        elif isinstance(source, Mapping):
            self._mapping = source
            self.where = "the base state dict"
        elif isinstance(source, (str, os.PathLike)):
            self._files = _safetensors_index(os.fspath(source))
            self.where = repr(os.fspath(source))
        else:
            raise TypeError("base must be a model, a {name: tensor} mapping or a path to safetensors "
                            f"weights, got {type(source).__name__}")

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
        if self._mapping is not None:
            if name not in self._mapping:
                raise ValueError(f"{self.where} has no tensor {name!r}")
            tensor = self._mapping[name]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{self.where}[{name!r}] is a {type(tensor).__name__}, not a tensor")
        else:
            if name not in self._files:
                raise ValueError(f"{self.where} has no tensor {name!r}")
            from safetensors import safe_open

            with safe_open(self._files[name], framework="pt") as f:
                tensor = f.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.where}: {name!r} has shape {tuple(tensor.shape)}, the trained "
                             f"tensor {tuple(shape)}; is it the base this model was trained from?")
        if not tensor.is_floating_point():
            raise ValueError(f"{self.where}: {name!r} is not a floating-point tensor")
        return tensor.detach().to(device=device, dtype=dtype)


def _safetensors_index(path: str) -> dict[str, str]:
    """``{tensor name: file}`` of a safetensors file, or of a model folder's weights."""
    from safetensors import safe_open

    if os.path.isdir(path):
        index = os.path.join(path, _INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            return {name: os.path.join(path, os.path.basename(file)) for name, file in weight_map.items()}
        single = os.path.join(path, _SINGLE)
        if not os.path.isfile(single):
            raise ValueError(f"{path!r} holds no {_SINGLE} or {_INDEX}: pass the base model (or its "
                             "state dict) as base= instead")
        path = single
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no base weights at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: path for name in f.keys()}
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e


def open_base(source: Any) -> BaseTensors:
    """The base tensors of ``source`` (see the module docstring); checks the path at once."""
    return source if isinstance(source, BaseTensors) else BaseTensors(source)
