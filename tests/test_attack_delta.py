"""Attack suite over delta files and in-memory deltas: every refused input leaves the model bit for
bit as it was, and nothing but TypeError/ValueError (FileNotFoundError for a missing file) escapes.

Tables name each kind of bad input once; Hypothesis then mixes the kinds, the tensor they hit
(the last one included: nothing may be written before it is checked), the operation and the
scale, and corrupts saved files byte by byte. A tiny MLP keeps every example fast.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import tempfile

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from gallop_kernels import SparseAdamW  # noqa: E402
from gallop_kernels.delta import (  # noqa: E402
    RESERVED_KEYS, apply_delta, check_delta, combine_deltas, extract_delta, load_delta,
    merge_delta, new_delta, save_delta, unmerge_delta,
)
from gallop_kernels.delta.fingerprint import digest  # noqa: E402
from gallop_kernels.delta.format import sealed  # noqa: E402
from gallop_kernels.integrations.bitsandbytes import apply_sparse_delta  # noqa: E402

REFUSED = (TypeError, ValueError)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def valid():
    """A delta over the three weights of a briefly trained MLP (fp32; float64 differences where
    fp32 is not exact), with its fingerprint."""
    model = mlp()
    weights = [model[0].weight, model[2].weight, model[4].weight]
    opt = SparseAdamW(weights, lr=5e-2, density=0.2, backend="torch")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    delta = extract_delta(model, opt, base=mlp(), base_model="mlp")
    assert list(delta.indices) == ["0.weight", "2.weight", "4.weight"]
    return delta


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: p.detach().clone() for n, p in model.named_parameters()})


def apply_or_unchanged(model, delta):
    """apply_delta: applied, or refused with the model bit for bit as before."""
    snap = snapshot(model)
    try:
        apply_delta(model, delta)
    except REFUSED:
        assert_unchanged(model, snap)
        return False
    return True


def assert_unchanged(model, snap):
    modules, values = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert now.keys() == values.keys()
    for n, v in values.items():
        assert torch.equal(now[n].detach().view(torch.uint8), v.view(torch.uint8)), n


# ----------------------------------------------------------------------------------------------
# In-memory corruptions: (label, function(delta, name) mutating it in place)
# ----------------------------------------------------------------------------------------------


def _set(part, fn):
    return lambda d, n: getattr(d, part).__setitem__(n, fn(getattr(d, part)[n], d, n))


def _rename(d, n, new):
    for part in ("indices", "values", "shapes", "base"):
        getattr(d, part)[new] = getattr(d, part).pop(n)
    d.metadata["base_fingerprint"] = digest(d.base, d.shapes)


def _swap01(t):
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _poke(t, i, v):
    t = t.clone()
    t[i] = v
    return t


def _numel(d, n):
    return math.prod(d.shapes[n])


def _tamper_sample(d, n):
    d.base[n].values = _poke(d.base[n].values, 0, d.base[n].values[0] + 1)


CORRUPTIONS = {
    "duplicate index": _set("indices", lambda t, d, n: _poke(t, 1, t[0])),
    "unsorted indices": _set("indices", lambda t, d, n: _swap01(t)),
    "negative index": _set("indices", lambda t, d, n: _poke(t, 0, -1)),
    "index = numel": _set("indices", lambda t, d, n: _poke(t, -1, _numel(d, n))),
    "huge index": _set("indices", lambda t, d, n: _poke(t.long(), -1, 2**40)),
    "float indices": _set("indices", lambda t, d, n: t.float() + 0.9),
    "bool indices": _set("indices", lambda t, d, n: t > 0),
    "2-D indices": _set("indices", lambda t, d, n: t.reshape(1, -1)),
    "indices as a list": _set("indices", lambda t, d, n: t.tolist()),
    "meta indices": _set("indices", lambda t, d, n: t.to("meta")),
    "meta values": _set("values", lambda t, d, n: t.to("meta")),
    "sparse values": _set("values", lambda t, d, n: t.to_sparse()),
    "NaN value": _set("values", lambda t, d, n: _poke(t, 0, math.nan)),
    "inf value": _set("values", lambda t, d, n: _poke(t, -1, math.inf)),
    "-inf value": _set("values", lambda t, d, n: _poke(t, 0, -math.inf)),
    "one value short": _set("values", lambda t, d, n: t[:-1]),
    "one value too many": _set("values", lambda t, d, n: torch.cat([t, t[:1]])),
    "one value for all indices": _set("values", lambda t, d, n: t[:1]),
    "0-d value": _set("values", lambda t, d, n: t[0]),
    "integer values": _set("values", lambda t, d, n: t.round().long()),
    "fp16 differences": _set("values", lambda t, d, n: t.half()),
    "2-D values": _set("values", lambda t, d, n: t.reshape(1, -1)),
    "wrong shape": _set("shapes", lambda t, d, n: (t[1], t[0]) if t[0] != t[1] else (t[0] + 1, t[1])),
    "negative shape": _set("shapes", lambda t, d, n: (-1, *t[1:])),
    "shape as floats": _set("shapes", lambda t, d, n: tuple(float(s) for s in t)),
    "no values": lambda d, n: d.values.pop(n),
    "no shape": lambda d, n: d.shapes.pop(n),
    "no fingerprint sample": lambda d, n: d.base.pop(n),
    "tampered fingerprint sample": _tamper_sample,
    "sample position out of range": lambda d, n: setattr(d.base[n], "positions", _poke(d.base[n].positions, -1, 10**9)),
    "NaN in the sample": lambda d, n: setattr(d.base[n], "values", _poke(d.base[n].values, 0, math.nan)),
    "edited digest": lambda d, n: d.metadata.__setitem__("base_fingerprint", "sha256:" + "0" * 64),
    "format": lambda d, n: d.metadata.__setitem__("format", "gallop-delta-x"),
    "version 4": lambda d, n: d.metadata.__setitem__("version", "4"),
    "version 2 (a relabelled version 3)": lambda d, n: d.metadata.__setitem__("version", "2"),
    "version 1 with a fingerprint": lambda d, n: d.metadata.__setitem__("version", "1"),
    "unknown kind": lambda d, n: d.metadata.__setitem__("kind", "sum"),
    "entry count": lambda d, n: d.metadata.__setitem__("num_entries", str(d.num_entries + 1)),
    "non-string metadata": lambda d, n: d.metadata.__setitem__("steps", 3),
    "separator in a name": lambda d, n: _rename(d, n, "a::b"),
    "not a SparseDelta": None,  # handled below
}


def corrupted(delta, label, name):
    if label == "not a SparseDelta":
        return {"indices": delta.indices, "values": delta.values}
    bad = copy.deepcopy(delta)
    CORRUPTIONS[label](bad, name)
    return bad


def _merge(model, delta, scale):
    return merge_delta(model, delta, scale=scale)


def _unmerge(model, delta, scale):
    return unmerge_delta(model, delta)


def _apply_4bit_loader(model, delta, scale):
    return apply_sparse_delta(model, delta, scale=scale)


def _save(model, delta, scale):
    folder = tempfile.mkdtemp()
    try:
        save_delta(os.path.join(folder, "d.safetensors"), delta)
    finally:
        left = os.listdir(folder)
        for name in left:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
        assert left == [], "a refused delta left a file behind"


OPS = {
    "apply_delta": lambda m, d, s: apply_delta(m, d, scale=s),
    "merge_delta": _merge,
    "unmerge_delta": _unmerge,
    "apply_sparse_delta": _apply_4bit_loader,
    "save_delta": _save,
    "combine_deltas": lambda m, d, s: combine_deltas([d], weights=[s]),
}


MODEL_RELATIVE = {"wrong shape"}  # a valid delta, just not of this model
WITHOUT_MODEL = {"save_delta", "combine_deltas"}


def applicable(label, op):
    return not (label in MODEL_RELATIVE and op in WITHOUT_MODEL)


@pytest.mark.parametrize("label", sorted(CORRUPTIONS))
def test_every_kind_of_bad_delta_is_refused_before_any_write(valid, label):
    """The table: each corruption, on the LAST tensor, through every operation."""
    name = list(valid.indices)[-1]
    bad = corrupted(valid, label, name)
    for op_name, op in OPS.items():
        if not applicable(label, op_name):
            continue
        model = mlp()
        snap = snapshot(model)
        with pytest.raises(REFUSED):
            op(model, bad, 1.0)
        assert_unchanged(model, snap)


@settings(max_examples=150, **SETTINGS)
@given(label=st.sampled_from(sorted(CORRUPTIONS)), which=st.integers(0, 2), op=st.sampled_from(sorted(OPS)),
       scale=st.one_of(st.just(1.0), st.floats(-4, 4, allow_nan=False)))
def test_corrupted_deltas_never_change_the_model(valid, label, which, op, scale):
    if not applicable(label, op):
        return
    name = list(valid.indices)[which]
    bad = corrupted(valid, label, name)
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(REFUSED):
        OPS[op](model, bad, scale)
    assert_unchanged(model, snap)


@settings(max_examples=60, **SETTINGS)
@given(labels=st.lists(st.sampled_from(sorted(set(CORRUPTIONS) - {"not a SparseDelta"})), min_size=2, max_size=4),
       which=st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_several_corruptions_at_once(valid, labels, which):
    """Mixed corruptions: either refused with the model unchanged, or (when they cancel out) a
    delta that passes every check."""
    bad = copy.deepcopy(valid)
    for label, w in zip(labels, which):
        names = list(bad.indices)
        try:
            CORRUPTIONS[label](bad, names[w % len(names)])
        except (KeyError, IndexError, RuntimeError, AttributeError, TypeError):
            pass  # a previous corruption removed what this one edits
    if apply_or_unchanged(mlp(), bad):
        check_delta(bad)


@settings(max_examples=60, **SETTINGS)
@given(scale=st.one_of(st.floats(-1e300, 1e300, allow_nan=False), st.floats(-10, 10, allow_nan=False)),
       huge=st.booleans(), op=st.sampled_from(["apply_delta", "merge_delta", "apply_sparse_delta"]))
def test_a_result_that_overflows_is_refused_before_any_write(valid, scale, huge, op):
    """Valid deltas: a scale (or a difference) whose result is not finite in the parameter's
    dtype -- found in the LAST tensor only -- is refused with nothing written."""
    delta = copy.deepcopy(valid)
    if huge:
        last = list(delta.values)[-1]
        delta.values[last] = torch.full_like(delta.values[last], 3e38)
    model = mlp()
    snap = snapshot(model)
    try:
        OPS[op](model, delta, scale)
    except ValueError as e:
        assert "finite" in str(e)
        assert_unchanged(model, snap)
    else:
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The base: any change at a sampled entry is another base
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(which=st.integers(0, 2), pick=st.integers(0, 10**6),
       factor=st.one_of(st.floats(1 + 2**-20, 4), st.floats(-4, -2**-20), st.just(0.0)))
def test_a_base_changed_at_a_sampled_entry_is_refused(valid, which, pick, factor):
    name = list(valid.indices)[which]
    sample = valid.base[name]
    model = mlp()
    pos = int(sample.positions[pick % sample.positions.numel()])
    with torch.no_grad():
        flat = model.get_parameter(name).view(-1)
        changed = flat[pos] * factor if float(flat[pos]) != 0 else torch.tensor(1e-3)
        if torch.equal(changed, flat[pos]):
            return
        flat[pos] = changed
    snap = snapshot(model)
    with pytest.raises(ValueError, match="check_base=False"):
        apply_delta(model, valid)
    assert_unchanged(model, snap)
    apply_delta(model, valid, check_base=False)  # the opt-out


def test_a_foreign_base_and_a_merged_base_are_refused(valid):
    model = mlp(seed=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="another base") as info:
        apply_delta(model, valid)
    assert "check_base=False" in str(info.value)
    assert_unchanged(model, snap)
    apply_delta(mlp(seed=0).double().float(), valid)  # the same values: the base
    model = mlp()
    merge_delta(model, valid)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already merged"):
        merge_delta(model, valid)
    assert_unchanged(model, snap)


def test_aliased_parameters_and_odd_models(valid):
    """Two delta tensors naming one parameter (tied weights) would be added twice: refused."""
    model = mlp()
    model.register_parameter("alias", model[4].weight)
    bad = copy.deepcopy(valid)
    bad.indices["alias"] = bad.indices["4.weight"].clone()
    bad.values["alias"] = bad.values["4.weight"].clone()
    bad.shapes["alias"] = bad.shapes["4.weight"]
    bad.base["alias"] = copy.deepcopy(bad.base["4.weight"])
    bad.metadata["base_fingerprint"] = digest(bad.base, bad.shapes)
    bad.metadata["num_entries"] = str(bad.num_entries)
    sealed(bad)  # consistent in itself: the model check must refuse it
    snap = snapshot(model)
    with pytest.raises(ValueError, match="same parameter"):
        apply_delta(model, bad)
    assert_unchanged(model, snap)
    with pytest.raises(TypeError):
        apply_delta("not a model", valid)
    for scale in (math.nan, math.inf, "1", True, None):
        model = mlp()
        snap = snapshot(model)
        with pytest.raises(REFUSED):
            apply_delta(model, valid, scale=scale)
        assert_unchanged(model, snap)


def test_the_4bit_loader_refuses_the_base_inside_a_wrapper(valid):
    model = mlp()
    apply_sparse_delta(model, valid)  # wraps 0, 2 and 4
    snap = snapshot(model)
    state = {"0.base": (valid.indices["0.weight"], valid.values["0.weight"].float())}
    from gallop_kernels.integrations.bitsandbytes import load_sparse_delta_state

    with pytest.raises(ValueError, match="inside a SparseDeltaLinear"):
        load_sparse_delta_state(model, state)
    for bad in ({"0": valid.indices["0.weight"]}, {"0": (valid.indices["0.weight"],)}, [("0", None)]):
        with pytest.raises(REFUSED):
            load_sparse_delta_state(model, bad)
    assert_unchanged(model, snap)


def test_restore_points_are_checked_too(valid):
    model = mlp()
    restore = merge_delta(model, valid)
    merged = snapshot(model)
    bad = copy.deepcopy(restore)
    name = list(bad.values)[-1]
    bad.values[name] = bad.values[name][:-1]
    with pytest.raises(ValueError):
        unmerge_delta(model, bad)
    assert_unchanged(model, merged)
    unmerge_delta(model, restore)
    assert_unchanged(model, snapshot(mlp()))


# ----------------------------------------------------------------------------------------------
# Metadata: the format's keys cannot be overwritten
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", RESERVED_KEYS)
def test_user_metadata_cannot_set_a_format_key(valid, key):
    args = (dict(valid.indices), dict(valid.values), dict(valid.shapes))
    kwargs = dict(base_model="mlp", scores=["gallop"], densities=["0.2"], dtypes=["float32"], base=valid.base)
    with pytest.raises(ValueError, match="may not set"):
        new_delta(*args, **kwargs, metadata={key: "x"})
    with pytest.raises(ValueError, match="may not set"):
        combine_deltas([valid], metadata={key: "x"})
    if key != "base_quantization":
        with pytest.raises(ValueError, match="may not set"):
            new_delta(*args, **kwargs, fields={key: "x"})


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _file_parts(delta, tmp_path):
    path = tmp_path / "valid.safetensors"
    save_delta(path, delta)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


FILE_CORRUPTIONS = {
    "float indices": lambda t, m, n: t.__setitem__(f"{n}::indices", t[f"{n}::indices"].float() + 0.9),
    "duplicate indices": lambda t, m, n: t.__setitem__(f"{n}::indices", _poke(t[f"{n}::indices"], 1, t[f"{n}::indices"][0])),
    "unsorted indices": lambda t, m, n: t.__setitem__(f"{n}::indices", _swap01(t[f"{n}::indices"])),
    "negative index": lambda t, m, n: t.__setitem__(f"{n}::indices", _poke(t[f"{n}::indices"], 0, -5)),
    "huge index": lambda t, m, n: t.__setitem__(f"{n}::indices", _poke(t[f"{n}::indices"].long(), -1, 2**62)),
    "NaN value": lambda t, m, n: t.__setitem__(f"{n}::values", _poke(t[f"{n}::values"], 0, math.nan)),
    "short values": lambda t, m, n: t.__setitem__(f"{n}::values", t[f"{n}::values"][:-1]),
    "float shape": lambda t, m, n: t.__setitem__(f"{n}::shape", t[f"{n}::shape"].float()),
    "negative shape": lambda t, m, n: t.__setitem__(f"{n}::shape", -t[f"{n}::shape"]),
    "wrong shape": lambda t, m, n: t.__setitem__(f"{n}::shape", t[f"{n}::shape"] + 1),
    "missing values": lambda t, m, n: t.pop(f"{n}::values"),
    "missing shape": lambda t, m, n: t.pop(f"{n}::shape"),
    "missing indices": lambda t, m, n: t.pop(f"{n}::indices"),
    "missing sample values": lambda t, m, n: t.pop(f"{n}::base_values"),
    "unexpected tensor": lambda t, m, n: t.__setitem__(f"{n}::extra", torch.zeros(1)),
    "tensor without a part": lambda t, m, n: t.__setitem__("stray", torch.zeros(1)),
    "tampered sample": lambda t, m, n: t.__setitem__(f"{n}::base_values", t[f"{n}::base_values"] * 2),
    "negative tolerance": lambda t, m, n: t.__setitem__(f"{n}::base_tolerance", -torch.ones_like(t[f"{n}::base_values"]).float()),
    "no format": lambda t, m, n: m.pop("format"),
    "version 4": lambda t, m, n: m.__setitem__("version", "4"),
    "version 2 (a relabelled version 3)": lambda t, m, n: m.__setitem__("version", "2"),
    "version 1 with a fingerprint": lambda t, m, n: m.__setitem__("version", "1"),
    "kind": lambda t, m, n: m.__setitem__("kind", "absolute-ish"),
    "entry count": lambda t, m, n: m.__setitem__("num_entries", "1"),
    "digest": lambda t, m, n: m.__setitem__("base_fingerprint", "sha256:1234"),
    "no digest": lambda t, m, n: m.pop("base_fingerprint"),
}


@pytest.mark.parametrize("label", sorted(FILE_CORRUPTIONS))
def test_every_kind_of_bad_file_is_refused(valid, tmp_path, label):
    tensors, meta = _file_parts(valid, tmp_path)
    name = list(valid.indices)[-1]
    FILE_CORRUPTIONS[label](tensors, meta, name)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError):
        load_delta(path)
    for op in (lambda m: apply_delta(m, path), lambda m: merge_delta(m, path), lambda m: apply_sparse_delta(m, path)):
        model = mlp()
        snap = snapshot(model)
        with pytest.raises(ValueError):
            op(model)
        assert_unchanged(model, snap)


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_damaged_files_are_refused_or_valid(valid, tmp_path, data):
    """Truncated, bit-flipped or padded files: load_delta raises ValueError, or what it returns
    passes every check; applying it either works or leaves the model unchanged."""
    path = tmp_path / "valid.safetensors"
    if not path.exists():
        save_delta(path, valid)
    blob = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "header"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "append":
        blob += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        header = 8 + int.from_bytes(blob[:8], "little")
        i = data.draw(st.integers(8, header - 1))
        blob[i] = data.draw(st.sampled_from(list(b'{}[]",:0129-eE.FIU"')))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    try:
        delta = load_delta(bad)
    except ValueError:
        return
    assert how != "truncate", "a truncated file was read"
    check_delta(delta)
    apply_or_unchanged(mlp(), delta)


def test_missing_and_odd_paths(tmp_path, valid):
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path)  # a folder without a delta
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError):
        load_delta(tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="folder"):
        save_delta(tmp_path, valid)
    buf = io.BytesIO()
    with pytest.raises(TypeError):
        save_delta(buf, valid)


# ----------------------------------------------------------------------------------------------
# Issue 17, case 6: every field that changes the meaning is covered by the digest, metadata has a
# schema, only the format's dtypes, and the fingerprint check does not loosen with the sample dtype
# ----------------------------------------------------------------------------------------------

from gallop_kernels.delta.format import content_digest  # noqa: E402


def resealed(delta):
    """What a writer that recomputes both digests produces (so that the check under test, not a
    digest mismatch, is what refuses)."""
    delta.metadata["base_fingerprint"] = digest(delta.base, delta.shapes)
    delta.metadata["digest"] = content_digest(delta)
    return delta


def _file_with(delta, tmp_path, edit_meta=None, name="edited.safetensors"):
    tensors, meta = _file_parts(delta, tmp_path)
    if edit_meta:
        edit_meta(meta)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta)
    return path


def assert_refused_everywhere(delta_or_path, match=None):
    with pytest.raises(ValueError, match=match):
        load_delta(delta_or_path) if not hasattr(delta_or_path, "metadata") else check_delta(delta_or_path)
    for op in (lambda m: apply_delta(m, delta_or_path), lambda m: merge_delta(m, delta_or_path)):
        model = mlp()
        snap = snapshot(model)
        with pytest.raises(ValueError):
            op(model)
        assert_unchanged(model, snap)


@pytest.mark.parametrize("key, value", [
    ("kind", "absolute"), ("version", "2"), ("dtype", "bfloat16"), ("score", "gradient"), ("density", "0.5"),
    ("base_model", "another"), ("modules", '{"0.weight": "Embedding"}'), ("base_quantization", "nf4"),
])
def test_an_edited_field_that_changes_the_meaning_is_refused(valid, tmp_path, key, value):
    """The issue's case: `kind` flipped from difference to absolute would apply the differences as
    weights. Every such field, edited alone in a saved file, is refused before anything changes."""
    assert valid.metadata.get(key) != value
    path = _file_with(valid, tmp_path, lambda meta: meta.__setitem__(key, value))
    assert_refused_everywhere(path)


def test_a_version_2_file_still_reads_and_its_kind_flip_is_refused(valid, tmp_path):
    """Files written before version 3 (digest of the samples only, no content digest) load and
    apply as before; an absolute-valued delta never had a fingerprint, so flipping a version-2
    difference to "absolute" is refused by that rule."""
    old = copy.deepcopy(valid)
    old.metadata["version"] = "2"
    old.metadata.pop("digest")
    old.metadata["base_fingerprint"] = digest(old.base, old.shapes, "2")
    check_delta(old)
    path = _file_with(old, tmp_path)
    m1, m2 = mlp(), mlp()
    apply_delta(m1, path)
    apply_delta(m2, valid)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert_refused_everywhere(_file_with(old, tmp_path, lambda m: m.__setitem__("kind", "absolute"), "k.safetensors"),
                              "carries no base fingerprint")


def test_float8_values_and_samples_are_refused_with_a_message(valid, tmp_path):
    name = list(valid.indices)[-1]
    bad = copy.deepcopy(valid)
    bad.values[name] = bad.values[name].to(torch.float8_e4m3fn)
    assert_refused_everywhere(bad, "which the delta format does not define")
    bad = copy.deepcopy(valid)
    for sample in bad.base.values():
        sample.values = sample.values.to(torch.float8_e4m3fn)  # "re-saved as float8, digest recomputed"
    assert_refused_everywhere(resealed(bad), "which the delta format does not define")
    tensors, meta = _file_parts(valid, tmp_path)
    tensors[f"{name}::base_values"] = tensors[f"{name}::base_values"].to(torch.float8_e5m2)
    save_file(tensors, str(tmp_path / "f8.safetensors"), metadata=meta)
    assert_refused_everywhere(tmp_path / "f8.safetensors", "does not define")


@pytest.mark.parametrize("factor", [1.05, 1.01, 1.002])
def test_the_fingerprint_check_does_not_loosen_with_the_sample_dtype(valid, factor):
    """Samples re-saved in bf16 with the digests recomputed: the true base still matches (the
    check rounds to the coarser dtype), a base scaled by `factor` still fails."""
    coarse = copy.deepcopy(valid)
    for sample in coarse.base.values():
        sample.values = sample.values.to(torch.bfloat16)
    resealed(coarse)
    for delta in (valid, coarse):
        apply_delta(mlp(), delta)  # the base it was trained from
        scaled = mlp()
        with torch.no_grad():
            for p in scaled.parameters():
                p.mul_(factor)
        snap = snapshot(scaled)
        with pytest.raises(ValueError, match="another base"):
            apply_delta(scaled, delta)
        assert_unchanged(scaled, snap)
    bf16_copy = mlp().to(torch.bfloat16)  # the same base in another precision
    apply_delta(bf16_copy, valid)


@pytest.mark.parametrize("key, value, message", [
    ("modules", "[" * 100_000, "nested 100000 levels deep"),
    ("modules", '{"0.weight": {"x": "Linear"}}', "nested 2 levels deep"),
    ("modules", '["Linear"]', "must be a JSON object"),
    ("modules", '{"0.weight": 3}', "must be a JSON object"),
    ("modules", '{"9.weight": "Linear"}', "names tensors the delta does not hold"),
    ("density", "1e999", "'1e999' is not a number in"),
    ("density", "nan", "is not a number in"),
    ("density", "0", "is not a number in"),
    ("score", "fisher", "unknown score 'fisher'"),
    ("dtype", "float8_e4m3fn", "is not one of"),
    ("base_quantization", "int3", "is not one of nf4"),
    ("num_entries", "1" * 400, "is not a count"),
    ("base_fingerprint", "md5:abc", "is not a sha256 digest"),
])
def test_metadata_has_a_schema(valid, key, value, message):
    bad = copy.deepcopy(valid)
    bad.metadata[key] = value
    bad.metadata["digest"] = content_digest(bad)  # the schema refuses, not the digest
    assert_refused_everywhere(bad, f"delta metadata {key}.*{re.escape(message)}")


# ----------------------------------------------------------------------------------------------
# Adapter configs: bounded, typed, and saying exactly what the delta says
# ----------------------------------------------------------------------------------------------

from gallop_kernels.adapter import load_adapter, save_adapter  # noqa: E402
from gallop_kernels.adapter.folder import CONFIG_FILE, described  # noqa: E402


@pytest.fixture
def adapter_folder(valid, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(folder, valid, peft=False, config={"data": ["train.jsonl"], "training": {"lr": 0.05}})
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.__setitem__("density", "DENSITY_1e999"), "beyond the range of a float"),
    (lambda c: c.__setitem__("density", "DENSITY_NaN"), "NaN is not a finite number"),
    (lambda c: c.__setitem__("density", 0.5), "describe different deltas .*density"),
    (lambda c: c.__setitem__("delta_kind", "absolute"), "describe different deltas .*delta_kind"),
    (lambda c: c.__setitem__("num_entries", 10**200), "an integer of 201 digits"),
    (lambda c: c.__setitem__("trained_modules", ["0"]), "describe different deltas .*trained_modules"),
    (lambda c: c.__setitem__("data", "NEST"), "nested 100001 levels deep"),
    (lambda c: c.__setitem__("target_modules", {"q": 1}), "target_modules must be a string or a list"),
    (lambda c: c.__setitem__("peft", []), "peft must be an object"),
    (lambda c: c.__setitem__("version", 2), "unsupported adapter config version"),
])
def test_a_bad_adapter_config_is_refused_naming_the_file(valid, adapter_folder, edit, message):
    path = adapter_folder / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    text = json.dumps(config).replace('"DENSITY_1e999"', "1e999").replace('"DENSITY_NaN"', "NaN")
    path.write_text(text.replace('"NEST"', "[" * 100_000 + "]" * 100_000))
    with pytest.raises(ValueError, match=message) as caught:
        load_adapter(adapter_folder)
    assert str(adapter_folder) in str(caught.value)
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        load_adapter(adapter_folder).apply(model)
    assert_unchanged(model, snap)


_ATOMS = st.sampled_from(["1e999", "NaN", "-Infinity", "9" * 150, "[" * 50, "]", "{", "}", '"x"', "null", "0.5",
                          "true", '"absolute"', "[]", "{}", ",", ":", '"'])


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_any_edit_of_an_adapter_config_is_refused_or_consistent(valid, adapter_folder, data):
    """A property over the new surface: replace the value of one key of gallop_adapter.json by a
    random run of JSON atoms. load_adapter either refuses with ValueError or returns a config that
    says exactly what the delta says; nothing else escapes (no RecursionError)."""
    path = adapter_folder / CONFIG_FILE
    original = path.read_text()
    config = json.loads(original)
    key = data.draw(st.sampled_from(sorted(config)))
    value = "".join(data.draw(st.lists(_ATOMS, min_size=1, max_size=8)))
    text = json.dumps({**config, key: "@@"}).replace('"@@"', value)
    try:
        path.write_text(text)
        try:
            adapter = load_adapter(adapter_folder)
        except ValueError:
            return
        assert all(adapter.config[k] == v for k, v in described(valid).items())
    finally:
        path.write_text(original)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_any_edit_of_a_reserved_key_is_refused(valid, tmp_path, data):
    """A property over delta metadata: a saved version-3 file with one reserved key set to another
    value (random text, JSON fragments, deep nesting, huge numbers) or removed is refused by
    load_delta with ValueError, and applying it leaves the model unchanged."""
    key = data.draw(st.sampled_from(sorted(k for k in RESERVED_KEYS if k != "format")), label="key")
    value = data.draw(st.one_of(
        st.none(), st.text(max_size=30), st.sampled_from(["[" * 5000, "1" * 500, "nan", "1e999", "{}", "2", "1",
                                                          '{"0.weight": "Linear"}', "absolute", "difference"])),
        label="value")
    tensors, meta = _file_parts(valid, tmp_path)
    if value is None:
        if key not in meta:
            return
        meta.pop(key)
    else:
        if meta.get(key) == value:
            return
        meta[key] = value
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError):
        load_delta(path)
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        apply_delta(model, path)
    assert_unchanged(model, snap)
