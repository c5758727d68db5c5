"""The trained sparse delta: its file format, its metadata and its index checks, in one place.

A GaLLoP fine-tune changes only the selected entries of the trained tensors. Saving the whole
model for that wastes space; :func:`save_delta` writes a safetensors file holding, per trained
tensor ``name`` (`docs/design.md#delta-format`):

- ``{name}::indices``: the sorted flat indices of the selected entries (`reference.index_dtype`:
  int32, int64 for tensors of 2^31 entries or more),
- ``{name}::values``: the trained values of those entries, in the parameter's dtype,
- ``{name}::shape``: the tensor's shape (int64), checked when the delta is applied,

and string metadata: ``format`` ("gallop-delta"), ``version``, ``base_model``, ``score``,
``density``, ``dtype``, ``num_entries``, fields of the representation that wrote it (the 4-bit
path adds ``base_quantization`` and ``values``) plus anything passed in ``metadata``.
:func:`apply_delta` writes the values into a freshly loaded base model
(``param.view(-1)[indices] = values``), so the base plus the delta is the fine-tuned model.
Values are the trained values themselves, not differences, so applying is exact in any dtype; a
delta only makes sense on the base it was trained from, whose name is recorded in the metadata
(and checked when you pass ``expected_base``).

Every writer builds its delta with :func:`new_delta` and every reader checks each tensor with
:func:`check_entries` (sorted, unique, in-range integer indices, one value per index) before
anything changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from gallop_kernels.optim.unwrap import unwrap_optimizer
from gallop_kernels.reference import index_dtype
from gallop_kernels.rules import check_index_set

FORMAT = "gallop-delta"
VERSION = "1"
_SEP = "::"
RESERVED_KEYS = ("format", "version")


@dataclass
class SparseDelta:
    """Per-tensor selected indices and trained values, plus metadata (all strings)."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(int(v.numel()) for v in self.values.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.indices, self.values) for t in d.values())


def score_label(score: Any) -> str:
    """How a score is recorded in the metadata (a callable has no portable name)."""
    return score if isinstance(score, str) else "callable"


def new_delta(
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    *,
    base_model: str,
    scores: Iterable[str],
    densities: Iterable[str],
    dtypes: Iterable[str],
    fields: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SparseDelta:
    """A `SparseDelta` with the format's metadata; ``fields`` are the writer's own (e.g. the
    4-bit path's ``base_quantization``), ``metadata`` the user's. Neither may set ``format`` or
    ``version``, which would make the file unreadable by :func:`load_delta`."""
    extra = {**(fields or {}), **(metadata or {})}
    clash = sorted(set(map(str, extra)) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"delta metadata may not set {clash}: the format writes them itself")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": str(base_model),
        "score": ",".join(sorted(set(scores))),
        "density": ",".join(sorted(set(densities))),
        "dtype": ",".join(sorted(set(dtypes))),
        "num_entries": str(sum(int(v.numel()) for v in values.values())),
    }
    meta.update({str(k): str(v) for k, v in extra.items()})
    return SparseDelta(indices, values, shapes, meta)


def check_entries(where: str, indices: Any, values: Any, numel: int) -> torch.Tensor:
    """The checks of one delta tensor: indices sorted, unique, integer and in ``[0, numel)``
    (`rules.check_index_set`), and one value per index. Returns the indices as int64."""
    idx = check_index_set(indices, numel, where)
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != idx.numel():
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where}: {idx.numel()} indices need as many values, got {got}")
    return idx


def extract_delta(
    model: nn.Module,
    optimizer: Any,
    *,
    base_model: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> SparseDelta:
    """The selected entries of every parameter the SparseAdamW ``optimizer`` trains in ``model``."""
    opt = unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    indices, values, shapes = {}, {}, {}
    dtypes, scores, densities = set(), set(), set()
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "indices" not in st or st["indices"].numel() == 0:
                continue  # nothing of this tensor changed
            if id(p) not in names:
                raise ValueError("the optimizer trains a tensor that is not a parameter of the model")
            name = names[id(p)]
            idx = st["indices"].to(torch.int64)
            indices[name] = idx.to(index_dtype(p.numel())).cpu()
            values[name] = p.detach().reshape(-1)[idx].cpu().contiguous()
            shapes[name] = tuple(p.shape)
            dtypes.add(str(p.dtype).replace("torch.", ""))
            scores.add(score_label(group["score"]))
            densities.add(repr(float(group["density"])))
    if not indices:
        raise ValueError("the optimizer has no selection yet: nothing to extract")
    return new_delta(indices, values, shapes, base_model=base_model, scores=scores,
                     densities=densities, dtypes=dtypes, metadata=metadata)


def save_delta(path: str | os.PathLike, delta: SparseDelta) -> None:
    """Write ``delta`` as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {}
    for name in delta.indices:
        tensors[f"{name}{_SEP}indices"] = delta.indices[name].contiguous()
        tensors[f"{name}{_SEP}values"] = delta.values[name].contiguous()
        tensors[f"{name}{_SEP}shape"] = torch.tensor(delta.shapes[name], dtype=torch.int64)
    save_file(tensors, str(path), metadata=dict(delta.metadata))


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Read a file written by :func:`save_delta` (``ValueError`` when it is not one)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no delta file at {os.fspath(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a GaLLoP delta (metadata format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"unsupported GaLLoP delta version {meta.get('version')!r} (this reader: {VERSION})")
    indices, values, shapes = {}, {}, {}
    for key, t in tensors.items():
        name, _, kind = key.rpartition(_SEP)
        if kind == "indices":
            indices[name] = t
        elif kind == "values":
            values[name] = t
        elif kind == "shape":
            shapes[name] = tuple(int(s) for s in t.tolist())
        else:
            raise ValueError(f"unexpected tensor {key!r} in delta file")
    if not (set(indices) == set(values) == set(shapes)):
        raise ValueError("corrupt delta file: indices, values and shapes name different tensors")
    for name in indices:
        if indices[name].shape != values[name].shape or indices[name].dim() != 1:
            raise ValueError(f"corrupt delta file: {name!r} has {indices[name].shape} indices "
                             f"and {values[name].shape} values")
    return SparseDelta(indices, values, shapes, meta)


def _plan(model: nn.Module, delta: SparseDelta, expected_base: str | None, strict: bool) -> list[tuple]:
    """Validate a delta against ``model``; (name, param, int64 indices, values) per tensor."""
    if expected_base is not None and delta.metadata.get("base_model") != expected_base:
        raise ValueError(f"delta was trained from base {delta.metadata.get('base_model')!r}, "
                         f"not {expected_base!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    plan = []
    for name, indices in delta.indices.items():
        if name not in params:
            if strict:
                raise ValueError(f"the model has no parameter {name!r} named in the delta")
            continue
        p = params[name]
        if tuple(p.shape) != tuple(delta.shapes[name]):
            raise ValueError(f"{name}: delta shape {delta.shapes[name]} != model shape {tuple(p.shape)}")
        idx = check_entries(f"delta tensor {name!r}", indices, delta.values[name], p.numel())
        plan.append((name, p, idx, delta.values[name]))
    return plan


@torch.no_grad()
def apply_delta(
    model: nn.Module,
    delta: SparseDelta | str | os.PathLike,
    *,
    expected_base: str | None = None,
    strict: bool = True,
) -> list[str]:
    """Write the delta's values into ``model``'s parameters in place; returns the names updated.

    Every named tensor must exist with the recorded shape and every index must be in range;
    otherwise ``ValueError`` is raised before anything changes. With ``strict=False`` tensors the
    model lacks are skipped. ``expected_base`` is compared with the recorded base model name.
    """
    if not isinstance(delta, SparseDelta):
        delta = load_delta(delta)
    plan = _plan(model, delta, expected_base, strict)
    for _, p, idx, vals in plan:
        p.view(-1)[idx.to(p.device)] = vals.to(device=p.device, dtype=p.dtype)
    return [name for name, *_ in plan]


@torch.no_grad()
def merge_delta(
    model: nn.Module,
    delta: SparseDelta | str | os.PathLike,
    *,
    expected_base: str | None = None,
    strict: bool = True,
) -> SparseDelta:
    """`apply_delta`, returning the entries it overwrote as a delta of their own.

    ``unmerge_delta(model, merge_delta(model, delta))`` restores the base bit for bit.
    """
    if not isinstance(delta, SparseDelta):
        delta = load_delta(delta)
    plan = _plan(model, delta, expected_base, strict)
    previous = SparseDelta(
        indices={name: delta.indices[name].clone() for name, *_ in plan},
        values={name: p.view(-1)[idx.to(p.device)].detach().cpu().clone() for name, p, idx, _ in plan},
        shapes={name: tuple(p.shape) for name, p, *_ in plan},
        metadata={**delta.metadata, "unmerges": delta.metadata.get("base_model", "")},
    )
    for _, p, idx, vals in plan:
        p.view(-1)[idx.to(p.device)] = vals.to(device=p.device, dtype=p.dtype)
    return previous


def unmerge_delta(model: nn.Module, previous: SparseDelta) -> list[str]:
    """Undo `merge_delta` with the delta it returned (the base's original entries)."""
    return apply_delta(model, previous)
