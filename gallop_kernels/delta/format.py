"""The delta file format: the in-memory `SparseDelta`, its checks, and its safetensors file.

One safetensors file (`docs/design.md#delta-format`). Per trained tensor ``name``:

- ``{name}::indices``: sorted unique flat indices (`rules.index_dtype`),
- ``{name}::values``: version 2: the *differences* trained − base at those entries (float32, or
  float64 where float32 cannot give back every trained value exactly); version 1: the trained
  values themselves, in the parameter's dtype,
- ``{name}::shape``: the tensor's shape (int64),
- version 2 only, the base fingerprint (`delta.fingerprint`): ``{name}::base_positions`` (int64),
  ``{name}::base_values`` (the base's dtype) and, for a quantized base, ``{name}::base_tolerance``
  (float32);

and string metadata: ``format`` = "gallop-delta", ``version`` ("3"; "1" and "2" files are read),
``kind`` ("difference", or "absolute" for the entries `merge_delta` overwrote and for version-1
files), ``base_model``, ``base_fingerprint`` (`fingerprint.digest` of the samples), ``score``,
``density``, ``dtype``, ``num_entries``, ``modules`` (JSON: tensor → the class of the module that
owns it), the 4-bit writer's ``base_quantization``, ``digest`` (version 3: `content_digest`, over
every key above and every tensor's shape, dtypes and count, so that a field that changes what the
file means cannot be edited alone), and the user's own keys, which may not set any of these
(`RESERVED_KEYS`). Every reserved key has a schema (`check_metadata`); values, samples and
differences must be float16, bfloat16, float32 or float64 (`VALUE_DTYPES`; differences float32 or
float64).

`check_delta` checks a whole delta (names, shapes, index sets, values, fingerprint, metadata)
without a model; `load_delta` runs it on what it read and every operation runs it before it
changes anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from gallop_kernels import bounded_json
from gallop_kernels.atomic import write_atomic
from gallop_kernels.delta.fingerprint import SAMPLE_DTYPES, BaseSample, digest
from gallop_kernels.rules import SCORE_NAMES, check_index_set

FORMAT = "gallop-delta"
VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
VALUE_DTYPES = SAMPLE_DTYPES
"""The floating dtypes the format defines for values and samples (float8, complex: refused)."""
DIFFERENCE = "difference"
ABSOLUTE = "absolute"
DELTA_FILE = "gallop_delta.safetensors"
"""The delta's file name inside an adapter folder (`load_delta` of a folder reads it)."""

_SEP = "::"
WRITER_KEYS = ("base_quantization",)
RESERVED_KEYS = ("format", "version", "kind", "base_model", "base_fingerprint", "score", "density",
                 "dtype", "num_entries", "modules", "digest", *WRITER_KEYS)
"""Metadata keys the format writes itself; user metadata may set none of them."""

_TENSOR_PARTS = ("indices", "values", "shape", "base_positions", "base_values", "base_tolerance")


@dataclass
class SparseDelta:
    """Per-tensor flat indices and values, shapes, string metadata and the base fingerprint.

    ``values`` are differences from the base (``kind == "difference"``) or, for a version-1 file
    and for what `merge_delta` returns, the entries' absolute values (``kind == "absolute"``).
    ``base`` holds one `BaseSample` per tensor (empty when the delta has no fingerprint).
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    base: dict[str, BaseSample] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"difference"`` or ``"absolute"`` (a version-1 delta: its ``kind`` key, if any, was
        the user's)."""
        if self.metadata.get("version") == "1":
            return ABSOLUTE
        return self.metadata.get("kind", "")

    @property
    def num_entries(self) -> int:
        return sum(int(v.numel()) for v in self.values.values())

    @property
    def modules(self) -> dict[str, str]:
        """Tensor name → class of the module that owns it (empty when not recorded)."""
        if self.metadata.get("version") == "1":
            return {}
        try:
            found = bounded_json.loads(self.metadata.get("modules", "{}"), max_depth=1)
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.indices, self.values) for t in d.values())


def score_label(score: Any) -> str:
    """How a score is recorded in the metadata (a callable has no portable name)."""
    return score if isinstance(score, str) else "callable"


def _check_metadata_keys(extra: Mapping[Any, Any], allowed: Iterable[str], whose: str) -> None:
    bad = [k for k in extra if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{whose} metadata keys must be strings, got {bad[0]!r}")
    clash = sorted(set(extra) & (set(RESERVED_KEYS) - set(allowed)))
    if clash:
        raise ValueError(f"{whose} metadata may not set {clash}: the delta format writes them itself")


def new_delta(
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    *,
    base_model: str,
    scores: Iterable[str],
    densities: Iterable[str],
    dtypes: Iterable[str],
    base: Mapping[str, BaseSample] | None = None,
    modules: Mapping[str, str] | None = None,
    kind: str = DIFFERENCE,
    fields: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SparseDelta:
    """A checked `SparseDelta` of the current version with the format's metadata.

    ``fields`` are the writer's own keys (``base_quantization``), ``metadata`` the user's; neither
    may set the keys the format writes (`RESERVED_KEYS`), which would make the file unreadable or
    lie about its content.
    """
    _check_metadata_keys(fields or {}, WRITER_KEYS, "writer")
    _check_metadata_keys(metadata or {}, (), "user")
    shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
    samples = dict(base or {})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "base_model": str(base_model),
        "score": ",".join(sorted(set(scores))),
        "density": ",".join(sorted(set(densities))),
        "dtype": ",".join(sorted(set(dtypes))),
        "num_entries": str(sum(int(v.numel()) for v in values.values())),
    }
    if samples:
        meta["base_fingerprint"] = digest(samples, shapes)
    if modules:
        meta["modules"] = json.dumps(dict(sorted(modules.items())))
    meta.update({k: str(v) for k, v in (fields or {}).items()})
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    delta = SparseDelta(dict(indices), dict(values), shapes, meta, samples)
    return sealed(delta)


def content_digest(delta: SparseDelta) -> str:
    """``"sha256:<hex>"`` of what a version-3 delta means: every reserved metadata key (absent ones
    too) but ``digest`` itself, and per tensor its name, shape, index dtype and count, values dtype
    and the shape of its fingerprint sample (the sample's content is in ``base_fingerprint``). Not
    the values themselves: it guards the meaning against a tool that edits one field, it is not a
    checksum of the data (a writer that recomputes it can write anything, as it always could)."""
    h = hashlib.sha256(b"gallop-delta-3 content\0")
    for key in sorted(RESERVED_KEYS):
        if key != "digest":
            h.update(f"{key}\0{delta.metadata.get(key)!r}\0".encode())
    for name in sorted(delta.indices):
        idx, val = delta.indices[name], delta.values[name]
        h.update(f"{name}\0{tuple(delta.shapes[name])}\0{idx.dtype}\0{idx.numel()}\0{val.dtype}\0".encode())
        if name in delta.base:
            s = delta.base[name]
            h.update(f"{s.values.dtype}\0{s.positions.numel()}\0{s.tolerance is not None}\0".encode())
    return "sha256:" + h.hexdigest()


def sealed(delta: SparseDelta) -> SparseDelta:
    """``delta`` (of the current version) with its ``digest`` written, checked (`check_delta`)."""
    delta.metadata["digest"] = content_digest(delta)
    check_delta(delta)
    return delta


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_dense(where: str, tensor: Any) -> None:
    """A tensor with data (no meta or sparse tensor reaches the numeric checks)."""
    if isinstance(tensor, torch.Tensor) and (tensor.is_meta or tensor.layout != torch.strided):
        raise ValueError(f"{where}: expected a dense tensor with data, got a {tensor.layout} "
                         f"tensor{' on the meta device' if tensor.is_meta else ''}")


def check_values(where: str, values: Any, count: int) -> None:
    """``count`` finite floating-point values in a 1-D tensor."""
    _check_dense(where, values)
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != count:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where}: {count} indices need as many values in a 1-D tensor, got {got}")
    if not values.is_floating_point():
        raise ValueError(f"{where}: values must be floating point, got {values.dtype}")
    if values.dtype not in VALUE_DTYPES:
        raise ValueError(f"{where}: values are {values.dtype}, which the delta format does not define "
                         f"(it holds {', '.join(str(d).replace('torch.', '') for d in VALUE_DTYPES)})")
    if count and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: values must be finite (found NaN or inf)")


def check_entries(where: str, indices: Any, values: Any, numel: int) -> torch.Tensor:
    """One delta tensor: indices sorted, unique, integer and in ``[0, numel)``
    (`rules.check_index_set`), one finite floating-point value per index. Returns int64 indices."""
    _check_dense(where, indices)
    idx = check_index_set(indices, numel, where)
    check_values(where, values, idx.numel())
    return idx


def _check_shape(where: str, shape: Any) -> int:
    if not isinstance(shape, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"{where}: shape must be a tuple of non-negative ints, got {shape!r}")
    return math.prod(shape)


def _check_sample(where: str, sample: Any, numel: int) -> None:
    if not isinstance(sample, BaseSample):
        raise ValueError(f"{where}: base fingerprint must be a BaseSample, got {type(sample).__name__}")
    _check_dense(f"{where} (base fingerprint)", sample.positions)
    positions = check_index_set(sample.positions, numel, f"{where} (base fingerprint)")
    check_values(f"{where} (base fingerprint)", sample.values, positions.numel())
    if sample.tolerance is not None:
        check_values(f"{where} (base tolerance)", sample.tolerance, positions.numel())
        if sample.tolerance.dtype != torch.float32 or bool((sample.tolerance < 0).any()):
            raise ValueError(f"{where}: base tolerance must be non-negative float32")


_HEX_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
_QUANTIZATIONS = ("nf4", "fp4", "none")


def _parts(meta: Mapping[str, str], key: str) -> list[str]:
    return [p for p in meta[key].split(",") if p] if key in meta else []


def check_metadata(meta: Mapping[str, str], names: Iterable[str]) -> None:
    """The reserved metadata keys against their schema (`docs/design.md#delta-format`): ``score``
    names, ``density`` finite fractions in (0, 1], ``dtype`` defined dtypes, ``num_entries`` a
    count, and (from version 2 on) ``modules`` a flat JSON object naming this delta's tensors,
    ``base_quantization`` nf4/fp4/none, digests as ``sha256:<64 hex>``. ``ValueError`` naming the
    key."""
    for score in _parts(meta, "score"):
        if score not in (*SCORE_NAMES, "callable"):
            raise ValueError(f"delta metadata score: unknown score {score[:40]!r}")
    for density in _parts(meta, "density"):
        try:
            number = float(density)
        except ValueError:
            number = math.nan
        if not 0.0 < number <= 1.0:
            raise ValueError(f"delta metadata density: {density[:40]!r} is not a number in (0, 1]")
    for dtype in _parts(meta, "dtype"):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"delta metadata dtype: {dtype[:40]!r} is not one of {', '.join(_DTYPE_NAMES)}")
    if "num_entries" in meta and not (meta["num_entries"].isdigit() and len(meta["num_entries"]) <= 20):
        raise ValueError(f"delta metadata num_entries: {meta['num_entries'][:40]!r} is not a count")
    if meta.get("version") == "1":
        return  # (version 1 reserved nothing else: other keys were the user's)
    if "modules" in meta:
        try:
            modules = bounded_json.loads(meta["modules"], max_depth=1)
        except ValueError as e:
            raise ValueError(f"delta metadata modules: {e}") from None
        if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
            raise ValueError("delta metadata modules must be a JSON object of tensor name -> module class")
        unknown = sorted(set(modules) - set(names))
        if unknown:
            raise ValueError(f"delta metadata modules names tensors the delta does not hold: {unknown[:3]}")
    for quant in _parts(meta, "base_quantization"):
        if quant not in _QUANTIZATIONS:
            raise ValueError(f"delta metadata base_quantization: {quant[:40]!r} is not one of "
                             f"{', '.join(_QUANTIZATIONS)}")
    for key in ("base_fingerprint", "digest") if meta.get("version") != "2" else ("base_fingerprint",):
        if key in meta and not _HEX_DIGEST.fullmatch(meta[key]):
            raise ValueError(f"delta metadata {key} is not a sha256 digest")


def check_delta(delta: Any) -> None:
    """The whole delta, before anything uses it: metadata (format, readable version, kind,
    entry count, fingerprint digest), every tensor present with a shape, its index set and one
    finite value per index, and a fingerprint sample per tensor when there is one at all.
    ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"expected a SparseDelta (or a delta file path), got {type(delta).__name__}")
    meta = delta.metadata
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("delta metadata must be a dict of strings")
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a GaLLoP delta (metadata format={meta.get('format')!r}); build deltas with new_delta")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"unsupported GaLLoP delta version {meta.get('version')!r} "
                         f"(this reader: {', '.join(READABLE_VERSIONS)})")
    if meta["version"] == "1" and delta.base:
        raise ValueError("a version-1 delta holds absolute values and no fingerprint")
    if delta.kind not in (DIFFERENCE, ABSOLUTE):
        raise ValueError(f"unknown delta kind {meta.get('kind')!r} (expected {DIFFERENCE!r} or {ABSOLUTE!r})")
    for part in ("indices", "values", "shapes", "base"):
        if not isinstance(getattr(delta, part), dict):
            raise TypeError(f"delta.{part} must be a dict")
    names = set(delta.indices)
    if set(delta.values) != names or set(delta.shapes) != names:
        raise ValueError("delta indices, values and shapes must name the same tensors "
                         f"(missing or extra: {sorted(names ^ set(delta.values) | names ^ set(delta.shapes))})")
    if delta.base and set(delta.base) != names:
        raise ValueError(f"the base fingerprint must cover every tensor (missing or extra: "
                         f"{sorted(names ^ set(delta.base))})")
    for name in delta.indices:
        if not isinstance(name, str) or not name or _SEP in name:
            raise ValueError(f"invalid tensor name {name!r} in delta")
        where = f"delta tensor {name!r}"
        numel = _check_shape(where, delta.shapes[name])
        check_entries(where, delta.indices[name], delta.values[name], numel)
        if delta.kind == DIFFERENCE and delta.values[name].dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{where}: differences must be float32 or float64, got {delta.values[name].dtype}")
        if delta.base:
            _check_sample(where, delta.base[name], numel)
    check_metadata(meta, delta.indices)
    if delta.kind == ABSOLUTE and delta.base:  # (no writer records a base for absolute values)
        raise ValueError("a delta of absolute values carries no base fingerprint: its kind was edited")
    if "num_entries" in meta and meta["num_entries"] != str(delta.num_entries):
        raise ValueError(f"delta metadata says {meta['num_entries']} entries, the tensors hold {delta.num_entries}")
    if delta.base:
        if meta.get("base_fingerprint") != digest(delta.base, delta.shapes, meta["version"]):
            raise ValueError("the delta's base fingerprint does not match its recorded digest (corrupt or edited)")
    elif "base_fingerprint" in meta and meta["version"] != "1":  # (version 1 reserved no such key)
        raise ValueError("the delta's metadata names a base fingerprint but holds no sample")
    if meta["version"] == "3" and meta.get("digest") != content_digest(delta):
        raise ValueError("the delta's metadata does not match its digest: a field that changes its meaning (kind, "
                         "version, dtypes, shapes, counts, score, density, modules, base) was edited, or it is corrupt")


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def save_delta(path: str | os.PathLike, delta: SparseDelta) -> None:
    """Check ``delta`` (`check_delta`), then write it as one safetensors file, atomically and with
    the user's normal permissions (`gallop_kernels.atomic.write_atomic`)."""
    from safetensors.torch import save_file

    check_delta(delta)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; give the delta file's path (or use gallop_kernels.adapter.save_adapter)")
    tensors = {}
    for name in delta.indices:
        tensors[f"{name}{_SEP}indices"] = delta.indices[name].detach().cpu().contiguous()
        tensors[f"{name}{_SEP}values"] = delta.values[name].detach().cpu().contiguous()
        tensors[f"{name}{_SEP}shape"] = torch.tensor(delta.shapes[name], dtype=torch.int64)
        if delta.base:
            s = delta.base[name]
            tensors[f"{name}{_SEP}base_positions"] = s.positions.to(torch.int64).cpu().contiguous()
            tensors[f"{name}{_SEP}base_values"] = s.values.cpu().contiguous()
            if s.tolerance is not None:
                tensors[f"{name}{_SEP}base_tolerance"] = s.tolerance.cpu().contiguous()
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=dict(delta.metadata)))


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or payload
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e
    return meta, tensors


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Read a delta file (version 2, or version 1 with absolute values), or the delta of an
    adapter folder; everything is checked (`check_delta`). ``ValueError`` when it is not a valid
    delta, ``FileNotFoundError`` when there is nothing at ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DELTA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no delta file at {path!r}")
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a GaLLoP delta (metadata format={meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path!r}: unsupported GaLLoP delta version {meta.get('version')!r} "
                         f"(this reader: {', '.join(READABLE_VERSIONS)})")
    allowed = _TENSOR_PARTS if meta["version"] != "1" else _TENSOR_PARTS[:3]
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _TENSOR_PARTS}
    for key, t in tensors.items():
        name, sep, part = key.rpartition(_SEP)
        if not sep or part not in allowed:
            raise ValueError(f"{path!r}: unexpected tensor {key!r} in a version-{meta['version']} delta file")
        parts[part][name] = t
    shapes = {}
    for name, t in parts["shape"].items():
        if t.dtype != torch.int64 or t.dim() != 1 or bool((t < 0).any()):
            raise ValueError(f"{path!r}: {name}{_SEP}shape must be non-negative int64 sizes")
        shapes[name] = tuple(int(s) for s in t.tolist())
    names = set(parts["indices"])
    samples = {}
    for name in parts["base_positions"].keys() | parts["base_values"].keys() | parts["base_tolerance"].keys():
        if name not in parts["base_positions"] or name not in parts["base_values"]:
            raise ValueError(f"{path!r}: incomplete base fingerprint for {name!r}")
        samples[name] = BaseSample(parts["base_positions"][name], parts["base_values"][name],
                                   parts["base_tolerance"].get(name))
    delta = SparseDelta(parts["indices"], parts["values"], shapes, meta, samples)
    if names != set(shapes) or names != set(parts["values"]):
        raise ValueError(f"{path!r}: corrupt delta file: indices, values and shapes name different tensors")
    try:
        check_delta(delta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r}: {e}") from e
    return delta
