"""The saved sparse delta: extract, save, load, apply onto a fresh base reproduces the fine-tune."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")
from transformers import LlamaForCausalLM  # noqa: E402

from gallop_kernels import SparseAdamW  # noqa: E402
from gallop_kernels.delta import (  # noqa: E402
    apply_delta, extract_delta, load_delta, merge_delta, save_delta, unmerge_delta,
)
from gallop_kernels.integrations.transformers import select_trainable  # noqa: E402
from gallop_kernels.toy import tiny_llama_config  # noqa: E402


def tiny(seed=0, dtype=torch.float32):
    cfg = tiny_llama_config(20, hidden_size=16, num_layers=1, num_heads=2, max_positions=8, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def finetune(model, steps=3):
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, density=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 20, (4, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_reproduces_the_finetuned_model(tmp_path, dtype):
    model = tiny(dtype=dtype)
    select_trainable(model, embeddings=True)
    opt = finetune(model)
    delta = extract_delta(model, opt, base_model="tiny-base", metadata={"task": "toy"})
    assert delta.num_entries == opt.num_selected
    path = tmp_path / "delta.safetensors"
    save_delta(path, delta)
    loaded = load_delta(path)
    md = loaded.metadata
    assert md["format"] == "gallop-delta" and md["base_model"] == "tiny-base" and md["task"] == "toy"
    assert md["score"] == "gallop" and float(md["density"]) == 0.05
    assert md["dtype"] == str(dtype).replace("torch.", "")
    assert all(t.dtype == torch.int32 for t in loaded.indices.values())
    assert all(v.dtype == dtype for v in loaded.values.values())

    base = tiny(dtype=dtype)
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))
    updated = apply_delta(base, path, expected_base="tiny-base")
    assert set(updated) == set(loaded.indices)
    for (n, p), q in zip(base.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    # much smaller than the model
    assert loaded.nbytes() < 0.2 * sum(p.numel() * p.element_size() for p in model.parameters())


def test_bad_deltas_are_refused_before_anything_changes(tmp_path):
    model = tiny()
    select_trainable(model)
    opt = finetune(model, steps=1)
    delta = extract_delta(model, opt, base_model="a")
    path = tmp_path / "d.safetensors"
    save_delta(path, delta)

    base = tiny()
    snapshot = [p.detach().clone() for p in base.parameters()]
    with pytest.raises(ValueError, match="trained from base"):
        apply_delta(base, path, expected_base="b")
    name = next(iter(delta.indices))
    delta.shapes[name] = (1, 2)
    with pytest.raises(ValueError, match="shape"):
        apply_delta(base, delta)
    delta = load_delta(path)
    delta.indices[name] = delta.indices[name].clone()
    delta.indices[name][-1] = 10**6
    with pytest.raises(ValueError, match="out of range"):
        apply_delta(base, delta)
    delta = load_delta(path)
    delta.indices["nope.weight"] = delta.indices.pop(name)
    delta.values["nope.weight"] = delta.values.pop(name)
    delta.shapes["nope.weight"] = delta.shapes.pop(name)
    with pytest.raises(ValueError, match="no parameter"):
        apply_delta(base, delta)
    assert all(torch.equal(p, s) for p, s in zip(base.parameters(), snapshot))
    assert apply_delta(base, delta, strict=False)  # the other tensors apply

    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_delta(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a GaLLoP delta"):
        load_delta(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no selection"):
        extract_delta(model, SparseAdamW([p for p in model.parameters() if p.requires_grad]))


def test_merge_then_unmerge_restores_the_base_exactly(tmp_path):
    model = tiny()
    select_trainable(model)
    opt = finetune(model)
    delta = extract_delta(model, opt, base_model="tiny-base")
    base = tiny()
    original = [p.detach().clone() for p in base.parameters()]
    previous = merge_delta(base, delta, expected_base="tiny-base")
    for p, q in zip(base.parameters(), model.parameters()):
        assert torch.equal(p, q)
    unmerge_delta(base, previous)
    for p, q in zip(base.parameters(), original):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="trained from base"):
        merge_delta(base, delta, expected_base="another-model")
