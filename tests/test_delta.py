"""The saved sparse delta: differences from the base, a scale, merge/unmerge, combination, and the
base fingerprint. Extract, save, load, apply onto a fresh base reproduces the fine-tune exactly."""

from __future__ import annotations

import json

import warnings

import pytest
import torch

pytest.importorskip("safetensors")
from transformers import LlamaForCausalLM  # noqa: E402

from gallop_kernels import SparseAdamW  # noqa: E402
from gallop_kernels.delta import (  # noqa: E402
    apply_delta, combine_deltas, exact_difference, extract_delta, load_delta, merge_delta, save_delta,
    unmerge_delta,
)
from gallop_kernels.integrations.transformers import select_trainable  # noqa: E402
from gallop_kernels.toy import tiny_llama_config  # noqa: E402


def tiny(seed=0, dtype=torch.float32):
    cfg = tiny_llama_config(20, hidden_size=16, num_layers=1, num_heads=2, max_positions=8, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def finetune(model, steps=3, data_seed=0, **opt_kwargs):
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                      **{"density": 0.05, **opt_kwargs})
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        ids = torch.randint(0, 20, (4, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, expected):
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), n


@pytest.fixture(scope="module")
def trained():
    """(trained model, its delta) of a 3-step fp32 fine-tune of the seed-0 base."""
    model = tiny()
    select_trainable(model)
    opt = finetune(model)
    return model, extract_delta(model, opt, base=tiny(), base_model="tiny-base")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_reproduces_the_finetuned_model(tmp_path, dtype):
    model = tiny(dtype=dtype)
    select_trainable(model, embeddings=True)
    opt = finetune(model)
    delta = extract_delta(model, opt, base=tiny(dtype=dtype), base_model="tiny-base", metadata={"task": "toy"})
    assert delta.num_entries == opt.num_selected
    path = tmp_path / "delta.safetensors"
    save_delta(path, delta)
    loaded = load_delta(path)
    md = loaded.metadata
    assert md["format"] == "gallop-delta" and md["version"] == "3" and md["kind"] == "difference"
    assert md["base_model"] == "tiny-base" and md["task"] == "toy" and md["base_fingerprint"].startswith("sha256:")
    assert md["score"] == "gallop" and float(md["density"]) == 0.05
    assert md["dtype"] == str(dtype).replace("torch.", "")
    assert set(loaded.modules) == set(loaded.indices)
    assert all(cls == ("Embedding" if "embed" in n else "Linear" if n.endswith("proj.weight") else cls)
               for n, cls in loaded.modules.items())
    assert all(t.dtype == torch.int32 for t in loaded.indices.values())
    assert all(v.dtype in (torch.float32, torch.float64) for v in loaded.values.values())
    if dtype == torch.bfloat16:  # a difference of two bf16 values is exact in fp32
        assert all(v.dtype == torch.float32 for v in loaded.values.values())
    # differences: trained minus base at the selected entries
    base = tiny(dtype=dtype)
    base_params = dict(base.named_parameters())
    for name, idx in loaded.indices.items():
        idx = idx.long()
        want = model.get_parameter(name).detach().reshape(-1)[idx].double() - base_params[name].detach().reshape(-1)[idx].double()
        torch.testing.assert_close(loaded.values[name].double(), want, rtol=0, atol=1e-6)

    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))
    updated = apply_delta(base, path, expected_base="tiny-base")
    assert set(updated) == set(loaded.indices)
    assert_same(base, params(model))
    # much smaller than the model
    assert loaded.nbytes() < 0.2 * sum(p.numel() * p.element_size() for p in model.parameters())


def test_differences_are_exact_where_float32_is_not():
    """fp32 trained values that cross zero or change by more than their size need a float64
    difference to come back exactly; bf16 ones never do in practice."""
    base = torch.tensor([-1.0, 1e-4, 0.5, 3e-3])
    trained = torch.tensor([1.0 + 2**-23, -2.5e-3, 0.5 + 2**-20, 3.1e-3])
    diff = exact_difference(base, trained)
    assert diff.dtype == torch.float64
    assert torch.equal((base.double() + diff).float(), trained)
    assert not torch.equal(base + (trained - base), trained)  # why float32 is not enough here
    b16, t16 = base.bfloat16(), trained.bfloat16()
    diff16 = exact_difference(b16, t16)
    assert diff16.dtype == torch.float32 and torch.equal((b16.float() + diff16).bfloat16(), t16)


def test_scale_scales_the_difference(trained):
    model, delta = trained
    base = tiny()
    before = params(base)
    apply_delta(base, delta, scale=0.5)
    for name, idx in delta.indices.items():
        got = base.get_parameter(name).detach().reshape(-1)
        want = before[name].reshape(-1).clone()
        want[idx.long()] = (want[idx.long()].to(delta.values[name].dtype) + 0.5 * delta.values[name]).float()
        assert torch.equal(got, want), name
    base = tiny()
    apply_delta(base, delta, scale=0.0)
    assert_same(base, before)
    with pytest.raises(TypeError, match="scale"):
        apply_delta(base, delta, scale=True)
    with pytest.raises(ValueError, match="finite"):
        apply_delta(base, delta, scale=float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        apply_delta(base, delta, scale=1e300)
    assert_same(base, before)


@pytest.mark.parametrize("scale", [1.0, 0.37, -2.0])
def test_merge_then_unmerge_restores_the_base_exactly(trained, tmp_path, scale):
    model, delta = trained
    base = tiny()
    original = params(base)
    previous = merge_delta(base, delta, scale=scale, expected_base="tiny-base")
    if scale == 1.0:
        assert_same(base, params(model))
    save_delta(tmp_path / "restore.safetensors", previous)  # a restore point survives a file
    unmerge_delta(base, tmp_path / "restore.safetensors")
    assert_same(base, original)
    with pytest.raises(ValueError, match="trained from base"):
        merge_delta(base, delta, expected_base="another-model")
    with pytest.raises(ValueError, match="absolute"):
        unmerge_delta(base, delta)


def test_a_foreign_base_is_refused_unless_asked(trained):
    model, delta = trained
    other = tiny(seed=1)
    before = params(other)
    with pytest.raises(ValueError, match="check_base=False") as info:
        apply_delta(other, delta)
    assert "another base" in str(info.value) and "tiny-base" in str(info.value)
    assert_same(other, before)
    apply_delta(other, delta, check_base=False)
    assert any(not torch.equal(p, before[n]) for n, p in other.named_parameters())

    # A model that already holds the delta is not its base any more: merging twice is refused.
    base = tiny()
    apply_delta(base, delta)
    merged = params(base)
    with pytest.raises(ValueError, match="already merged"):
        apply_delta(base, delta)
    assert_same(base, merged)

    # The same base in another dtype is still the base (bf16 rounding of the fp32 weights).
    half = tiny(dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_delta(half, delta)


def test_combination_is_the_weighted_sum_over_the_union(trained):
    model, delta_a = trained
    other = tiny()
    select_trainable(other)
    opt = finetune(other, data_seed=7, score="gradient")
    delta_b = extract_delta(other, opt, base=tiny(), base_model="tiny-base")
    both = combine_deltas([delta_a, delta_b], weights=[0.75, -0.5])
    assert both.metadata["kind"] == "difference" and "combination" in both.metadata
    for name in set(delta_a.indices) | set(delta_b.indices):
        dense = torch.zeros(both.shapes[name], dtype=torch.float64).reshape(-1)
        for w, d in ((0.75, delta_a), (-0.5, delta_b)):
            if name in d.indices:
                dense[d.indices[name].long()] += w * d.values[name].double()
        union = torch.unique(torch.cat([d.indices[name].long() for d in (delta_a, delta_b) if name in d.indices]))
        assert torch.equal(both.indices[name].long(), union)
        torch.testing.assert_close(both.values[name].double(), dense[union], rtol=1e-7, atol=0)
    base = tiny()
    apply_delta(base, both)  # the combined fingerprint still recognises the base
    assert combine_deltas([delta_a], weights=[1.0]).num_entries == delta_a.num_entries

    foreign = tiny(seed=3)
    select_trainable(foreign)
    opt = finetune(foreign)
    delta_c = extract_delta(foreign, opt, base=tiny(seed=3))
    with pytest.raises(ValueError, match="different bases"):
        combine_deltas([delta_a, delta_c])
    assert combine_deltas([delta_a, delta_c], check_base=False).num_entries > 0
    with pytest.raises(ValueError, match="weights"):
        combine_deltas([delta_a, delta_b], weights=[1.0])
    with pytest.raises(TypeError):
        combine_deltas(delta_a)


def test_reselection_keeps_every_entry_that_changed():
    """With reselect_every, entries trained under an earlier selection are part of the delta."""
    model = tiny()
    select_trainable(model)
    opt = finetune(model, steps=4, reselect_every=1, density=0.02)
    delta = extract_delta(model, opt, base=tiny())
    assert delta.num_entries > opt.num_selected
    base = tiny()
    apply_delta(base, delta)
    assert_same(base, params(model))


def test_base_sources(tmp_path):
    model = tiny()
    select_trainable(model)
    opt = finetune(model, steps=1)
    folder = tmp_path / "base"
    tiny().save_pretrained(folder)
    from_folder = extract_delta(model, opt, base_model=str(folder))  # the recorded path is read
    from_dict = extract_delta(model, opt, base={n: p.detach().clone() for n, p in tiny().named_parameters()})
    from_file = extract_delta(model, opt, base=folder / "model.safetensors")
    for other in (from_dict, from_file):
        assert other.metadata["base_fingerprint"] == from_folder.metadata["base_fingerprint"]
        for name in other.indices:
            assert torch.equal(other.values[name], from_folder.values[name])
    with pytest.raises(ValueError, match="pass base="):
        extract_delta(model, opt, base_model="some/hub-id")
    with pytest.raises(ValueError, match="itself"):
        extract_delta(model, opt, base=model)
    with pytest.raises(ValueError, match="no tensor"):
        extract_delta(model, opt, base={})
    with pytest.raises(ValueError, match="shape"):
        extract_delta(model, opt, base={n: p.detach()[:1] for n, p in tiny().named_parameters()})
    with pytest.raises(ValueError, match="no model.safetensors"):
        extract_delta(model, opt, base=tmp_path)
    with pytest.raises(ValueError, match="no selection"):
        extract_delta(model, SparseAdamW([p for p in model.parameters() if p.requires_grad]), base=tiny())


def test_bad_deltas_are_refused_before_anything_changes(trained, tmp_path):
    _, delta = trained
    path = tmp_path / "d.safetensors"
    save_delta(path, delta)
    base = tiny()
    snapshot = params(base)
    with pytest.raises(ValueError, match="trained from base"):
        apply_delta(base, path, expected_base="b")
    bad = load_delta(path)
    name = next(iter(bad.indices))
    bad.shapes[name] = (1, 2)
    with pytest.raises(ValueError):
        apply_delta(base, bad)
    bad = load_delta(path)
    for part in ("indices", "values", "shapes", "base"):
        getattr(bad, part)["nope.weight"] = getattr(bad, part).pop(name)
    bad.metadata.pop("base_fingerprint")
    from gallop_kernels.delta.fingerprint import digest

    bad.metadata["base_fingerprint"] = digest(bad.base, bad.shapes)
    modules = bad.modules
    modules["nope.weight"] = modules.pop(name)
    bad.metadata["modules"] = json.dumps(modules)
    from gallop_kernels.delta.format import sealed

    sealed(bad)  # a consistent delta of another model's tensor: refused by the model check
    with pytest.raises(ValueError, match="no parameter"):
        apply_delta(base, bad)
    assert_same(base, snapshot)
    assert apply_delta(base, bad, strict=False)  # the other tensors apply

    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_delta(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a GaLLoP delta"):
        load_delta(tmp_path / "other.safetensors")


def test_metadata_cannot_overwrite_the_format_keys(trained):
    model = tiny()
    select_trainable(model)
    opt = finetune(model, steps=1)
    for key in ("format", "version", "kind", "base_fingerprint", "num_entries", "base_model"):
        with pytest.raises(ValueError, match="may not set"):
            extract_delta(model, opt, base=tiny(), metadata={key: "mine"})
    with pytest.raises(TypeError, match="strings"):
        extract_delta(model, opt, base=tiny(), metadata={1: "x"})
