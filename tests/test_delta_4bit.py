"""A delta trained on a 4-bit (NF4) base: its file stores Δ against the dequantized base, so it
reloads onto a 4-bit base and merges onto the full-precision base (W_fp + Δ); the fingerprint
accepts the full-precision base within NF4's rounding and refuses any other."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from gallop_kernels.delta import (  # noqa: E402
    SparseDelta, apply_delta, load_delta, merge_delta, save_delta, unmerge_delta,
)
from gallop_kernels.integrations.bitsandbytes import (  # noqa: E402
    apply_sparse_delta, delta_optimizer, extract_sparse_delta, select_sparse_delta, sparse_delta_modules,
)

VOCAB = 64


def save_llama(path, seed):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return (save_llama(tmp_path_factory.mktemp("base"), 0), save_llama(tmp_path_factory.mktemp("other"), 1))


def load_4bit(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
    model.train()  # (keeps bitsandbytes from repacking the weights for its CPU inference kernel)
    return model


def batches(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (1, 1), generator=gen) + torch.arange(12)) % VOCAB for _ in range(n)]


@pytest.fixture(scope="module")
def trained_4bit(bases):
    model = load_4bit(bases[0])
    select_sparse_delta(model, batches(), lambda ids: model(input_ids=ids, labels=ids).loss, density=0.05)
    opt = delta_optimizer(model, lr=2e-2)
    for ids in batches(3, seed=2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_the_file_stores_the_difference_from_the_dequantized_base(trained_4bit, tmp_path):
    delta = extract_sparse_delta(trained_4bit, base_model="tiny")
    save_delta(tmp_path / "d.safetensors", delta)
    loaded = load_delta(tmp_path / "d.safetensors")
    assert loaded.kind == "difference" and loaded.metadata["base_quantization"] == "nf4"
    assert set(loaded.modules.values()) == {"Linear4bit"}
    for name, m in sparse_delta_modules(trained_4bit).items():
        if m.delta_indices.numel():
            assert torch.equal(loaded.values[f"{name}.weight"], m.delta_values.detach())
            sample = loaded.base[f"{name}.weight"]
            assert sample.tolerance is not None and bool((sample.tolerance > 0).all())


def test_reload_onto_a_4bit_base_with_a_scale(trained_4bit, bases):
    delta = extract_sparse_delta(trained_4bit)
    fresh = load_4bit(bases[0])
    apply_sparse_delta(fresh, delta, scale=0.5)
    for name, m in sparse_delta_modules(fresh).items():
        torch.testing.assert_close(m.delta_values.detach(), 0.5 * delta.values[f"{name}.weight"], rtol=0, atol=0)
    other = load_4bit(bases[1])
    kinds = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match="another base"):
        apply_sparse_delta(other, delta)
    assert [type(m) for m in other.modules()] == kinds  # nothing wrapped
    apply_sparse_delta(other, delta, check_base=False)


def test_merge_onto_the_full_precision_base(trained_4bit, bases):
    """W_fp + Δ: the fingerprint accepts the full-precision base within NF4's rounding, and the
    change is exactly Δ at the trained entries (rounded once to fp32)."""
    delta = extract_sparse_delta(trained_4bit)
    full = LlamaForCausalLM.from_pretrained(bases[0])
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    restore = merge_delta(full, delta)
    for name, idx in delta.indices.items():
        got = full.get_parameter(name).detach().reshape(-1)
        want = before[name].reshape(-1).clone()
        want[idx.long()] = want[idx.long()] + delta.values[name]
        assert torch.equal(got, want), name
    unmerge_delta(full, restore)
    for n, p in full.named_parameters():
        assert torch.equal(p, before[n]), n

    other = LlamaForCausalLM.from_pretrained(bases[1])
    kept = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="another base"):
        apply_delta(other, delta)
    for n, p in other.named_parameters():
        assert torch.equal(p, kept[n]), n


def test_version_1_files_of_the_4bit_path_still_install(trained_4bit, bases):
    """The previous 4-bit writer stored dequantized base + Δ (absolute values): still read."""
    current = extract_sparse_delta(trained_4bit)
    fresh = load_4bit(bases[0])
    absolute = {}
    for name, m in sparse_delta_modules(trained_4bit).items():
        if m.delta_indices.numel():
            base = m.dequantized_weight().reshape(-1)[m.delta_indices.long()].float()
            absolute[f"{name}.weight"] = base + m.delta_values.detach()
    old = SparseDelta(
        {k: v.clone() for k, v in current.indices.items()}, absolute, dict(current.shapes),
        {"format": "gallop-delta", "version": "1", "base_model": "", "score": "gallop", "density": "0.05",
         "dtype": "float32", "num_entries": str(current.num_entries), "base_quantization": "nf4",
         "values": "dequantized base + sparse delta"},
    )
    with pytest.warns(UserWarning, match="no base fingerprint"):
        apply_sparse_delta(fresh, old)
    for name, m in sparse_delta_modules(fresh).items():
        torch.testing.assert_close(m.delta_values.detach(), current.values[f"{name}.weight"], rtol=0, atol=1e-6)


def test_bad_4bit_deltas_change_nothing(trained_4bit, bases):
    delta = extract_sparse_delta(trained_4bit)
    fresh = load_4bit(bases[0])
    kinds = [type(m) for m in fresh.modules()]
    name = next(iter(delta.indices))
    bad = SparseDelta(dict(delta.indices), dict(delta.values), dict(delta.shapes), dict(delta.metadata), dict(delta.base))
    bad.values[name] = bad.values[name][:-1]
    with pytest.raises(ValueError, match="values"):
        apply_sparse_delta(fresh, bad)
    bad = SparseDelta(dict(delta.indices), dict(delta.values), dict(delta.shapes), dict(delta.metadata), dict(delta.base))
    bad.values[name] = torch.full_like(bad.values[name], 1e300, dtype=torch.float64)
    with pytest.raises(ValueError):
        apply_sparse_delta(fresh, bad)
    with pytest.raises(ValueError, match="not finite"):
        apply_sparse_delta(fresh, delta, scale=1e300)
    assert [type(m) for m in fresh.modules()] == kinds
