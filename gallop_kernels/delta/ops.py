"""What a delta does to a model: apply with a scale, merge and unmerge, combine, convert.

Every operation validates its whole input first -- the delta (`format.check_delta`), the scale,
every named parameter (present, same shape, floating point, contiguous, not named twice), the base
fingerprint, and the finiteness of every value it would write -- and only then writes, so a
refused input leaves the model bit for bit as it was (`docs/design.md#delta-operations`).

Applying a difference Δ with scale s writes, at each index, ``(base + s·Δ)`` computed in Δ's dtype
and rounded once to the parameter's dtype (`apply_difference`). With s = 1 on the base it was
extracted from, that is the trained value itself (`exact_difference` chose Δ's dtype for that).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from gallop_kernels.delta.base import BaseSource, open_base
from gallop_kernels.delta.fingerprint import (
    BaseSample,
    TensorView,
    differs,
    mismatches,
    record,
)
from gallop_kernels.delta.format import (
    ABSOLUTE,
    DIFFERENCE,
    FORMAT,
    RESERVED_KEYS,
    VERSION,
    SparseDelta,
    check_delta,
    load_delta,
    new_delta,
    sealed,
)
from gallop_kernels.rules import index_dtype

DeltaLike = SparseDelta | str | os.PathLike


def check_scale(scale: Any, name: str = "scale") -> float:
    """A finite real number (bools refused)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be finite, got {scale!r}")
    return float(scale)


def as_delta(delta: Any) -> SparseDelta:
    """A checked delta: a `SparseDelta` or the path of a delta file or adapter folder."""
    if isinstance(delta, (str, os.PathLike)):
        return load_delta(delta)
    check_delta(delta)
    return delta


def apply_difference(base: torch.Tensor, diff: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``base + scale·diff`` in ``diff``'s dtype, rounded once to ``dtype``: the one formula."""
    step = diff if scale == 1.0 else diff * scale
    return (base.to(diff.dtype) + step).to(dtype)


def exact_difference(base: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """trained − base on the CPU, in float32 when that gives back every trained value exactly
    through `apply_difference` (as good as always for bf16/fp16 parameters), else float64.

    float64 is exact unless a trained value is over 2^28 times smaller than its base value; such
    an entry comes back within one unit in the last place of itself.
    """
    wide = trained.double() - base.double()
    narrow = wide.float()
    if torch.equal(apply_difference(base, narrow, 1.0, trained.dtype), trained):
        return narrow.cpu()
    return wide.cpu()


def _refuse_foreign_base(delta: SparseDelta, bad: list[tuple[str, int, int]]) -> None:
    name, count, total = bad[0]
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    raise ValueError(
        f"this delta was trained from another base: {name!r} differs from the recorded base at "
        f"{count} of {total} sampled entries{more} (recorded base: "
        f"{delta.metadata.get('base_model') or 'unnamed'}, {delta.metadata.get('base_fingerprint')}). "
        "If a delta is already merged into this model, unmerge it first; to apply it anyway, pass "
        "check_base=False."
    )


def check_base(delta: SparseDelta, views: Mapping[str, TensorView] | Iterable[tuple[str, TensorView]]) -> None:
    """Refuse a model whose tensors differ from the base ``delta`` recorded (warn when the delta
    has no fingerprint: version-1 files still apply). ``views`` may be a lazy iterable of
    ``(name, view)`` pairs, so a caller can dequantize one layer at a time."""
    if not delta.base:
        warnings.warn(
            "this delta records no base fingerprint (it was written before format version 2), so "
            "the model cannot be checked to be its base; pass check_base=False to silence this",
            UserWarning, stacklevel=3,
        )
        return
    pairs = views.items() if isinstance(views, Mapping) else views
    bad = []
    for name, view in pairs:
        count = mismatches(delta.base[name], view)
        if count:
            bad.append((name, count, delta.base[name].positions.numel()))
    if bad:
        _refuse_foreign_base(delta, bad)


@dataclass
class _Write:
    name: str
    param: torch.Tensor
    index: torch.Tensor
    new: torch.Tensor
    old: torch.Tensor


def _targets(model: nn.Module, delta: SparseDelta, strict: bool) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    targets = []
    for name in delta.indices:
        if name not in params:
            if strict:
                raise ValueError(f"the model has no parameter {name!r} named in the delta "
                                 "(strict=False skips such tensors)")
            continue
        p = params[name]
        if id(p) in seen:
            raise ValueError(f"delta tensors {seen[id(p)]!r} and {name!r} are the same parameter of the model")
        seen[id(p)] = name
        if tuple(p.shape) != tuple(delta.shapes[name]):
            raise ValueError(f"{name}: delta shape {tuple(delta.shapes[name])} != model shape {tuple(p.shape)}")
        if not p.is_floating_point() or p.is_meta or not p.is_contiguous():
            raise ValueError(f"{name}: the parameter must be a contiguous floating-point tensor with data")
        targets.append((name, p))
    return targets


def _plan(model: nn.Module, delta: SparseDelta, scale: float, check: bool, strict: bool,
          expected_base: str | None) -> list[_Write]:
    """Everything `apply_delta` checks, and the values it would write; changes nothing."""
    if expected_base is not None and delta.metadata.get("base_model") != expected_base:
        raise ValueError(f"delta was trained from base {delta.metadata.get('base_model')!r}, "
                         f"not {expected_base!r}")
    targets = _targets(model, delta, strict)
    if check:
        check_base(delta, {name: TensorView(p) for name, p in targets})
    writes = []
    for name, p in targets:
        index = delta.indices[name].to(device=p.device, dtype=torch.int64)
        old = p.detach().reshape(-1).index_select(0, index)
        values = delta.values[name].to(p.device)
        if delta.kind == DIFFERENCE:
            new = apply_difference(old, values, scale, p.dtype)
        elif scale == 1.0:
            new = values.to(p.dtype)
        else:
            new = (old.double() + scale * (values.double() - old.double())).to(p.dtype)
        if new.numel() and not bool(torch.isfinite(new).all()):
            raise ValueError(f"{name}: applying the delta with scale {scale} would write non-finite values")
        writes.append(_Write(name, p, index, new, old))
    return writes


@torch.no_grad()
def _write(writes: list[_Write]) -> list[str]:
    for w in writes:
        w.param.view(-1).index_copy_(0, w.index, w.new)
    return [w.name for w in writes]


def apply_delta(
    model: nn.Module,
    delta: DeltaLike,
    *,
    scale: float = 1.0,
    check_base: bool = True,
    strict: bool = True,
    expected_base: str | None = None,
) -> list[str]:
    """Add ``scale`` × the delta to ``model``'s parameters in place; returns the names updated.

    ``delta``: a `SparseDelta`, a delta file or an adapter folder. With ``scale=1`` on its base
    this rebuilds the fine-tuned model exactly. A version-1 delta (absolute values) writes its
    values at ``scale=1`` and ``base + scale·(value − base)`` otherwise.

    Refused with ``ValueError`` before anything changes: an invalid delta, a tensor the model
    lacks (skipped with ``strict=False``), a shape that differs, a model that is not the delta's
    base (its fingerprint; ``check_base=False`` overrides, and a delta without a fingerprint only
    warns), a recorded base name other than ``expected_base``, a result that is not finite.
    """
    scale = check_scale(scale)
    delta = as_delta(delta)
    return _write(_plan(model, delta, scale, check_base, strict, expected_base))


def merge_delta(
    model: nn.Module,
    delta: DeltaLike,
    *,
    scale: float = 1.0,
    check_base: bool = True,
    strict: bool = True,
    expected_base: str | None = None,
) -> SparseDelta:
    """`apply_delta`, returning the entries it overwrote (an ``"absolute"`` delta without a
    fingerprint): ``unmerge_delta(model, merge_delta(model, delta))`` restores them bit for bit."""
    scale = check_scale(scale)
    delta = as_delta(delta)
    writes = _plan(model, delta, scale, check_base, strict, expected_base)
    restore = sealed(SparseDelta(
        indices={w.name: delta.indices[w.name].clone() for w in writes},
        values={w.name: w.old.cpu().clone() for w in writes},
        shapes={w.name: tuple(w.param.shape) for w in writes},
        metadata={"format": FORMAT, "version": VERSION, "kind": ABSOLUTE,
                  "num_entries": str(sum(w.old.numel() for w in writes)),
                  "restores": delta.metadata.get("base_fingerprint", delta.metadata.get("base_model", ""))},
    ))
    _write(writes)
    return restore


def unmerge_delta(model: nn.Module, previous: DeltaLike) -> list[str]:
    """Undo `merge_delta` with the delta it returned: writes the base's original entries back."""
    previous = as_delta(previous)
    if previous.kind != ABSOLUTE:
        raise ValueError("unmerge_delta takes what merge_delta returned (absolute values), not a "
                         "difference; to subtract a delta, apply it with scale=-1")
    return _write(_plan(model, previous, 1.0, False, True, None))


# ----------------------------------------------------------------------------------------------
# Combining deltas and converting version-1 files
# ----------------------------------------------------------------------------------------------


def _union_samples(samples: list[BaseSample]) -> BaseSample:
    """One sample over every position the inputs sampled (the first input's value wins)."""
    dtype = samples[0].values.dtype
    if any(s.values.dtype != dtype for s in samples):
        dtype = torch.float64 if any(s.values.dtype == torch.float64 for s in samples) else torch.float32
    positions = torch.cat([s.positions.to(torch.int64) for s in samples])
    values = torch.cat([s.values.to(dtype) for s in samples])
    has_tol = any(s.tolerance is not None for s in samples)
    tol = torch.cat([s.tolerance if s.tolerance is not None else torch.zeros(s.positions.numel())
                     for s in samples]) if has_tol else None
    unique, inverse = torch.unique(positions, return_inverse=True)
    first = torch.full((unique.numel(),), positions.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(positions.numel()), reduce="amin")
    return BaseSample(unique, values[first].clone(), None if tol is None else tol[first].float().clone())


def _samples_disagree(a: BaseSample, b: BaseSample) -> int:
    common, ia, ib = _common_positions(a.positions, b.positions)
    if not common:
        return 0
    pick = lambda t, i: None if t is None else t[i]  # noqa: E731
    return int(differs(a.values[ia], pick(a.tolerance, ia), b.values[ib], pick(b.tolerance, ib)).sum())


def _common_positions(a: torch.Tensor, b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    a, b = a.to(torch.int64), b.to(torch.int64)
    ia = torch.nonzero(torch.isin(a, b)).squeeze(1)
    ib = torch.searchsorted(b, a[ia])
    return int(ia.numel()), ia, ib


def combine_deltas(
    deltas: Sequence[DeltaLike],
    weights: Sequence[float] | None = None,
    *,
    check_base: bool = True,
    metadata: dict[str, Any] | None = None,
) -> SparseDelta:
    """The weighted sum Σ wᵢ·Δᵢ over the union of the deltas' indices (PEFT's
    ``add_weighted_adapter`` with ``combination_type="linear"``, for sparse deltas).

    All deltas must be differences (convert version-1 files with `to_difference`) from the same
    base: their fingerprints must agree wherever they sampled the same entries
    (``check_base=False`` skips that), and a tensor must have one shape in all of them. The result
    keeps every input's fingerprint sample; values are float64 if any input's are, else float32.
    """
    if isinstance(deltas, (SparseDelta, str, os.PathLike)) or not isinstance(deltas, Sequence) or not deltas:
        raise TypeError("deltas must be a non-empty list of deltas")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas need as many weights, got {len(weights)}")
    weights = [check_scale(w, f"weight {i}") for i, w in enumerate(weights)]
    loaded = [as_delta(d) for d in deltas]
    for i, d in enumerate(loaded):
        if d.kind != DIFFERENCE:
            raise ValueError(f"delta {i} stores absolute values (format version 1): convert it with "
                             "to_difference(delta, base) first")
    names = sorted({n for d in loaded for n in d.indices})
    for name in names:
        having = [(i, d) for i, d in enumerate(loaded) if name in d.indices]
        shapes = {tuple(d.shapes[name]) for _, d in having}
        if len(shapes) > 1:
            raise ValueError(f"{name}: the deltas disagree on its shape ({sorted(shapes)})")
        if check_base:
            with_base = [(i, d) for i, d in having if d.base]
            pairs = [(x, y) for k, x in enumerate(with_base) for y in with_base[k + 1:]]
            for (i, a), (j, b) in pairs:
                if _samples_disagree(a.base[name], b.base[name]):
                    raise ValueError(f"deltas {i} and {j} were trained from different bases ({name!r} "
                                     "differs where both sampled it); pass check_base=False to combine anyway")
    if check_base and any(not d.base for d in loaded):
        warnings.warn("a delta without a base fingerprint is combined: its base cannot be checked",
                      UserWarning, stacklevel=2)
    indices, values, shapes, samples = {}, {}, {}, {}
    wide = any(v.dtype == torch.float64 for d in loaded for v in d.values.values())
    for name in names:
        having = [(w, d) for w, d in zip(weights, loaded) if name in d.indices]
        union = torch.unique(torch.cat([d.indices[name].to(torch.int64) for _, d in having]))
        total = torch.zeros(union.numel(), dtype=torch.float64)
        for w, d in having:
            total.index_add_(0, torch.searchsorted(union, d.indices[name].to(torch.int64)),
                             w * d.values[name].double())
        first = having[0][1]
        indices[name] = union.to(index_dtype(math.prod(first.shapes[name])))
        values[name] = total if wide else total.float()
        shapes[name] = tuple(first.shapes[name])
        if all(d.base for _, d in having):
            samples[name] = _union_samples([d.base[name] for _, d in having])
    if len(samples) != len(names):
        samples = {}
    modules: dict[str, str] = {}
    for d in loaded:
        modules.update(d.modules)
    split = lambda key: [s for d in loaded for s in d.metadata.get(key, "").split(",") if s]  # noqa: E731
    combination = [{"weight": w, "base_model": d.metadata.get("base_model", ""),
                    "base_fingerprint": d.metadata.get("base_fingerprint", ""), "num_entries": d.num_entries}
                   for w, d in zip(weights, loaded)]
    quant = sorted(set(split("base_quantization")))
    return new_delta(indices, values, shapes, base_model=loaded[0].metadata.get("base_model", ""),
                     scores=split("score"), densities=split("density"), dtypes=split("dtype"),
                     base=samples, modules={k: v for k, v in modules.items() if k in indices},
                     fields={"base_quantization": ",".join(quant)} if quant else None,
                     metadata={"combination": json.dumps(combination), **(metadata or {})})


_STALE_KEYS = ("values",)  # version 1's 4-bit writer: "dequantized base + sparse delta"


def _user_metadata(delta: SparseDelta) -> dict[str, str]:
    return {k: v for k, v in delta.metadata.items() if k not in RESERVED_KEYS and k not in _STALE_KEYS}


def to_difference(delta: DeltaLike, base: BaseSource, *, base_model: str | None = None) -> SparseDelta:
    """A version-1 delta (absolute values) as a difference from ``base`` (a model, a state dict or
    a safetensors path; `delta.base`), with ``base``'s fingerprint recorded."""
    delta = as_delta(delta)
    if delta.kind != ABSOLUTE:
        raise ValueError("this delta already stores differences")
    source = open_base(base)
    indices, values, samples = {}, {}, {}
    for name, index in delta.indices.items():
        tensor = source.get(name, delta.shapes[name], delta.values[name].dtype)
        index = index.to(torch.int64)
        indices[name] = delta.indices[name].clone()
        values[name] = exact_difference(tensor.reshape(-1)[index], delta.values[name])
        samples[name] = record(TensorView(tensor), index)
    meta = delta.metadata
    return new_delta(indices, values, dict(delta.shapes),
                     base_model=meta.get("base_model", "") if base_model is None else base_model,
                     scores=[s for s in meta.get("score", "").split(",") if s],
                     densities=[s for s in meta.get("density", "").split(",") if s],
                     dtypes=[s for s in meta.get("dtype", "").split(",") if s],
                     base=samples, modules=delta.modules,
                     fields={k: meta[k] for k in ("base_quantization",) if k in meta},
                     metadata={**_user_metadata(delta), "converted_from_version": meta.get("version", "")})
