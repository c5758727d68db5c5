"""4-bit (NF4) bitsandbytes base + trainable sparse delta (`gallop_kernels.integrations.bitsandbytes`).

A tiny random Llama is saved to a temp dir and reloaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` on the CPU, which gives real ``bitsandbytes.nn.Linear4bit`` layers.

What runs on the CPU here: bitsandbytes' CPU kernel for ``dequantize_4bit`` (the only bitsandbytes
kernel the wrapper needs) and plain ``F.linear``. bitsandbytes' own CPU inference kernel
(``gemm_4bit_forward`` from the `kernels` hub, or the AVX512-BF16 repacked path) is not used: the
wrapper always dequantizes and calls ``F.linear`` (the path bitsandbytes itself takes for training),
so the oracle everywhere is an ``nn.Linear`` holding the dequantized weight and ``select_naive.select``.
Nothing in this file needs a GPU; on a GPU the same code runs bitsandbytes' CUDA dequantization.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from gallop_kernels import SparseAdamW, phase_one, rules  # noqa: E402
from gallop_kernels.integrations import bitsandbytes as gbnb  # noqa: E402
from gallop_kernels.integrations.bitsandbytes import (  # noqa: E402
    SparseDeltaLinear,
    apply_sparse_delta,
    delta_optimizer,
    extract_sparse_delta,
    load_sparse_delta_state,
    select_sparse_delta,
    sparse_delta_modules,
    sparse_delta_state,
)
from gallop_kernels.integrations.bitsandbytes import autograd as delta_autograd  # noqa: E402
from gallop_kernels.ops.select import naive as select_naive  # noqa: E402

VOCAB = 64
SEQ = 12


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=torch.float32):
    model = LlamaForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        ),
        device_map="cpu",
    )
    model.train()  # (dropout is 0; train mode also keeps bitsandbytes from repacking on CPU)
    return model


def progression_batch(gen: torch.Generator, batch: int = 8) -> torch.Tensor:
    """Generated task: sequences a, a+1, a+2, ... (mod VOCAB) — predict the successor."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    return (start + torch.arange(SEQ)) % VOCAB


def lm_loss(model):
    return lambda ids: model(input_ids=ids, labels=ids).loss


def calibration_batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [progression_batch(gen) for _ in range(n)]


def first_4bit(model) -> tuple[str, nn.Module]:
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    assert isinstance(layer, bnb.nn.Linear4bit)
    return name, layer


def random_indices(numel, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values


def dequantized_dense_copy(model) -> nn.Module:
    """The oracle: the same model with every Linear4bit replaced by an nn.Linear holding its
    dequantized weight (fp32), everything frozen except those weights."""
    import copy

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(gbnb.dequantized_weight(module).float())
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_delta_forward_equals_base(llama_dir, compute_dtype):
    model = load_4bit(llama_dir, compute_dtype)
    ids = calibration_batches(1)[0]
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
    name, layer = first_4bit(model)
    x = torch.randn(3, 5, layer.in_features)
    expected = layer(x)

    wrapped = SparseDeltaLinear(layer)
    assert torch.equal(wrapped(x), expected)  # empty delta
    wrapped.set_delta_indices(random_indices(wrapped.weight_numel, 200))
    assert torch.equal(wrapped(x), expected)  # selected but still zero
    assert torch.equal(wrapped(x.requires_grad_()), expected)

    # The whole model wrapped (all decoder linears, zero deltas) gives the same logits.
    select_sparse_delta(model, calibration_batches(1), lm_loss(model), density=0.1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected_logits)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_gradient_equals_gathered_dense_gradient(llama_dir, compute_dtype):
    """Oracle: an nn.Linear holding W_dequantized + Δ; its weight.grad gathered at the indices."""
    model = load_4bit(llama_dir, compute_dtype)
    _, layer = first_4bit(model)
    wrapped = SparseDeltaLinear(layer)
    idx = random_indices(wrapped.weight_numel, 300, seed=3)
    values = torch.randn(300) * 0.05
    wrapped.load_delta(idx, values)

    oracle = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=compute_dtype)
    with torch.no_grad():
        dense = gbnb.dequantized_weight(layer).float().reshape(-1).clone()
        dense[idx] += values
        oracle.weight.copy_(dense.view(oracle.weight.shape))  # rounded once to compute_dtype
        assert torch.equal(wrapped.dense_delta().reshape(-1)[idx], values)

    x = torch.randn(4, 7, layer.in_features)
    grad_out = torch.randn(4, 7, layer.out_features)
    x1 = x.clone().requires_grad_()
    y1 = wrapped(x1)
    y1.backward(grad_out)
    x2 = x.clone().requires_grad_()
    y2 = oracle(x2.to(compute_dtype)).to(torch.float32)
    y2.backward(grad_out)

    tol = dict(rtol=0, atol=0) if compute_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    assert wrapped.delta_values.grad.dtype == torch.float32
    expected = oracle.weight.grad.reshape(-1)[idx].float()
    if compute_dtype == torch.float32:
        torch.testing.assert_close(wrapped.delta_values.grad, expected, rtol=1e-6, atol=1e-6)
    else:  # the oracle's bf16 weight gradient is rounded; ours is accumulated into fp32
        torch.testing.assert_close(wrapped.delta_values.grad, expected, rtol=2e-2, atol=5e-2)
    assert layer.weight.grad is None


def test_plain_linear_base_and_bias():
    """A frozen nn.Linear base (e.g. bf16 weights kept as they are) works the same way."""
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    base.requires_grad_(False)
    before = base.weight.detach().clone()
    wrapped = SparseDeltaLinear(base)
    idx = random_indices(240, 30)
    wrapped.load_delta(idx, torch.randn(30))
    x = torch.randn(6, 20, requires_grad=True)
    y = wrapped(x)
    ref_w = (base.weight.detach().reshape(-1).clone().index_add_(0, idx, wrapped.delta_values.detach())
             ).view(12, 20).requires_grad_()
    y_ref = x @ ref_w.T + base.bias
    torch.testing.assert_close(y, y_ref)
    g = torch.randn(6, 12)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(wrapped.delta_values.grad, ref_w.grad.reshape(-1)[idx])
    assert torch.equal(base.weight, before)  # W + Δ never written into the base


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_oracle(llama_dir):
    """Dense autograd on the dequantized model over the calibration batches: the decoder linears'
    names, dequantized weights and mean weight gradients."""
    model = load_4bit(llama_dir, torch.float32)
    dense = dequantized_dense_copy(model)
    batches = calibration_batches(3)
    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    weights = [dense.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    for ids in batches:
        dense(input_ids=ids, labels=ids).loss.backward()
    return names, [w.detach() for w in weights], [w.grad / len(batches) for w in weights]


@pytest.mark.parametrize("score", ["gallop", "gradient", "magnitude", "random", "callable"])
def test_selection_equals_reference_on_dequantized_weights(llama_dir, dense_oracle, score):
    model = load_4bit(llama_dir, torch.float32)
    batches = calibration_batches(3)
    score_arg = (lambda p, g: g.abs() * (p.abs() + 1.0)) if score == "callable" else score
    names, weights, mean_grads = dense_oracle
    expected = select_naive.select(weights, mean_grads, 0.03, score_arg, seed=7, names=names)

    wrapped = select_sparse_delta(
        model, batches, lm_loss(model), density=0.03, score=score_arg, seed=7, chunk=1000
    )
    assert list(wrapped) == names  # every decoder linear, in module order; no lm_head
    assert not isinstance(model.lm_head, SparseDeltaLinear)
    total = sum(m.weight_numel for m in wrapped.values())
    assert sum(m.delta_indices.numel() for m in wrapped.values()) == rules.k_for_density(total, 0.03)
    for name, exp in zip(names, expected):
        got = wrapped[name].delta_indices
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64), exp), name
        assert torch.equal(wrapped[name].delta_values, torch.zeros(exp.numel()))

    # Frozen: only the non-empty deltas train; no gradient left behind.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.delta_values" for n in names if wrapped[n].delta_indices.numel()}
    assert all(p.grad is None for p in model.parameters())


def test_quantization_floor_selects_the_oracles_set_with_half_the_nf4_step(llama_dir, dense_oracle):
    """``quantization_floor=True``: each layer's floor is half the median NF4 step next to zero,
    read from its dequantized weight; the selection is the oracle's with those floors."""
    from gallop_kernels.score_floor import quantization_floor

    model = load_4bit(llama_dir, torch.float32)
    names, weights, mean_grads = dense_oracle
    floors = rules.check_score_floor([quantization_floor(w, "nf4") for w in weights], len(weights))
    expected = select_naive.select(weights, mean_grads, 0.03, "gallop", names=names, floors=floors)
    wrapped = select_sparse_delta(model, calibration_batches(3), lm_loss(model), density=0.03, chunk=1000,
                                  quantization_floor=True)
    for name, exp in zip(names, expected):
        assert torch.equal(wrapped[name].delta_indices.to(torch.int64), exp), name
    with pytest.raises(ValueError, match="applies to"):
        select_sparse_delta(load_4bit(llama_dir), calibration_batches(1), lm_loss(model), density=0.03,
                            score="gradient", quantization_floor=True)


def test_calibration_holds_one_dense_gradient_at_a_time(llama_dir, monkeypatch):
    """Every dense weight gradient the taps (and the delta backward) create is recorded with a
    weakref; when the next is created, all earlier ones must already be freed."""
    model = load_4bit(llama_dir, torch.float32)
    created: list[weakref.ref] = []
    max_alive = [0]
    real = delta_autograd.weight_grad

    def counting(grad_out_2d, x_2d):
        out = real(grad_out_2d, x_2d)
        created.append(weakref.ref(out))
        max_alive[0] = max(max_alive[0], sum(r() is not None for r in created))
        return out

    added = []
    real_add = phase_one.HostGradientBuffer.add

    def add(self, grad):
        added.append(tuple(grad.shape))
        # No parameter anywhere holds a dense gradient while the taps run.
        assert all(p.grad is None for p in model.parameters())
        real_add(self, grad)

    monkeypatch.setattr(delta_autograd, "weight_grad", counting)
    monkeypatch.setattr(phase_one.HostGradientBuffer, "add", add)
    batches = calibration_batches(3)
    wrapped = select_sparse_delta(model, batches, lm_loss(model), density=0.05, max_batches=2)
    assert len(added) == 2 * len(wrapped)  # max_batches honoured; one tap per layer per batch
    assert max_alive[0] == 1

    # Training backward: the dense gradient inside each layer's backward is transient too.
    created.clear()
    ids = batches[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(created) == sum(1 for m in wrapped.values() if m.delta_indices.numel())
    assert max_alive[0] == 1


# ----------------------------------------------------------------------------------------------
# Training and saving
# ----------------------------------------------------------------------------------------------


def test_training_changes_only_the_delta_and_reduces_loss(llama_dir, tmp_path):
    model = load_4bit(llama_dir, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_sparse_delta(model, calibration_batches(2), lm_loss(model), density=0.05)

    opt = delta_optimizer(model, lr=2e-2)
    assert opt.defaults["fused"] is True
    gen = torch.Generator().manual_seed(5)
    eval_ids = progression_batch(gen, 16)
    with torch.no_grad():
        loss0 = float(lm_loss(model)(eval_ids))
    for _ in range(10):
        loss = lm_loss(model)(progression_batch(gen))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss1 = float(lm_loss(model)(eval_ids))
    assert loss1 < loss0 - 0.25, (loss0, loss1)

    # AdamW state: fp32 m and v, one value per selected entry (8 bytes/entry).
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert st["exp_avg"].numel() == p.numel()

    # Everything but the delta is bit-identical, the 4-bit codes and quant states included.
    after = model.state_dict()
    delta_keys = {k for k in after if k.endswith((".delta_indices", ".delta_values"))}
    renamed = {k.replace(".base.", "."): v for k, v in after.items() if k not in delta_keys}
    assert renamed.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(renamed[k], v), k
    assert any(bool(m.delta_values.abs().sum() > 0) for m in sparse_delta_modules(model).values())

    # Save as a small safetensors file and load onto a fresh 4-bit model: same logits.
    safetensors = pytest.importorskip("safetensors.torch")
    state = sparse_delta_state(model)
    flat = {}
    for name, (idx, val) in state.items():
        assert idx.dtype == torch.int32 and val.dtype == torch.float32
        flat[f"{name}.indices"], flat[f"{name}.values"] = idx, val
    safetensors.save_file(flat, tmp_path / "delta.safetensors")
    loaded = safetensors.load_file(tmp_path / "delta.safetensors")
    fresh = load_4bit(llama_dir, torch.bfloat16)
    load_sparse_delta_state(
        fresh, {n: (loaded[f"{n}.indices"], loaded[f"{n}.values"]) for n in state}
    )
    with torch.no_grad():
        trained_logits = model(input_ids=eval_ids).logits
        assert torch.equal(fresh(input_ids=eval_ids).logits, trained_logits)

    # The gallop_kernels.delta file format (differences from the base) round-trips onto a fresh 4-bit base.
    delta_format = pytest.importorskip("gallop_kernels.delta")
    delta = extract_sparse_delta(model, base_model="tiny-llama")
    assert delta.metadata["base_quantization"] == "nf4" and delta.metadata["score"] == "gallop"
    delta_format.save_delta(tmp_path / "gallop_delta.safetensors", delta)
    fresh = load_4bit(llama_dir, torch.bfloat16)
    apply_sparse_delta(fresh, tmp_path / "gallop_delta.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=eval_ids).logits, trained_logits, rtol=0, atol=1e-5)


def test_delta_merges_onto_dense_base(llama_dir):
    """dense_delta() added to the dequantized weights of a dense copy reproduces the wrapped model
    (fp32 compute); the same is how a delta merges onto a full-precision base."""
    model = load_4bit(llama_dir, torch.float32)
    dense = dequantized_dense_copy(model)
    wrapped = select_sparse_delta(model, calibration_batches(1), lm_loss(model), density=0.05)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in wrapped.values():
            m.delta_values.copy_(torch.randn(m.delta_values.shape, generator=gen) * 0.05)
        for name, m in wrapped.items():
            dense.get_submodule(name).weight.add_(m.dense_delta())
    ids = calibration_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    # gallop_kernels.delta.apply_delta (differences) onto a dense dequantized base: the same.
    delta_format = pytest.importorskip("gallop_kernels.delta")
    dense = dequantized_dense_copy(load_4bit(llama_dir, torch.float32))
    updated = delta_format.apply_delta(dense, extract_sparse_delta(model))
    assert sorted(updated) == sorted(f"{n}.weight" for n, m in wrapped.items() if m.delta_indices.numel())
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_sparse_adamw_on_delta_matches_adamw():
    """SparseAdamW(density=1.0) also trains delta values (same update, plus a redundant index)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(50))
    b = nn.Parameter(a.detach().clone())
    opt_a = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.0)
    opt_b = SparseAdamW([b], lr=1e-2, weight_decay=0.0, density=1.0, backend="torch")
    for _ in range(3):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(density=0.0), ValueError),
        (dict(density=1.5), ValueError),
        (dict(density=math.nan), ValueError),
        (dict(density=True), TypeError),
        (dict(density=0.1, target_modules=["q_proj", "no_such_proj"]), ValueError),
        (dict(density=0.1, target_modules=["input_layernorm"]), ValueError),
        (dict(density=0.1, target_modules=[]), ValueError),
        (dict(density=0.1, score="largest"), ValueError),
        (dict(density=0.1, max_batches=0), ValueError),
    ],
)
def test_bad_input_raises_before_anything_changes(llama_dir, kwargs, error):
    model = load_4bit(llama_dir, torch.float32)
    snap = _snapshot(model)
    calls = []

    def loss_fn(ids):
        calls.append(1)
        return lm_loss(model)(ids)

    with pytest.raises(error) as info:
        select_sparse_delta(model, calibration_batches(1), loss_fn, **kwargs)
    if "target_modules" in kwargs and kwargs["target_modules"]:
        assert repr(kwargs["target_modules"][-1]) in str(info.value)
    assert calls == []
    assert _snapshot(model) == snap


def test_failure_during_calibration_restores_the_model(llama_dir):
    model = load_4bit(llama_dir, torch.float32)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no calibration batches"):
        select_sparse_delta(model, [], lm_loss(model), density=0.1)
    assert _snapshot(model) == snap

    def nan_loss(ids):
        return lm_loss(model)(ids) * math.nan

    with pytest.raises(ValueError, match="NaN"):
        select_sparse_delta(model, calibration_batches(1), nan_loss, density=0.1, target_modules=["q_proj"])
    assert _snapshot(model) == snap
    assert not sparse_delta_modules(model)


def test_target_modules_by_suffix(llama_dir):
    model = load_4bit(llama_dir, torch.float32)
    wrapped = select_sparse_delta(
        model, calibration_batches(1), lm_loss(model), density=0.1, target_modules=["q_proj", "mlp.up_proj"]
    )
    assert list(wrapped) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]
    assert isinstance(model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    # Selecting again on layers that already carry a delta is refused.
    with pytest.raises(ValueError, match="already carries"):
        select_sparse_delta(model, calibration_batches(1), lm_loss(model), density=0.1,
                            target_modules=["q_proj"])


def test_gradient_checkpointing(llama_dir):
    """With (reentrant) activation checkpointing the taps and the delta gradients still work and
    give what the plain model gives."""
    plain, ckpt = load_4bit(llama_dir), load_4bit(llama_dir)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batches = calibration_batches(2)
    got = select_sparse_delta(ckpt, batches, lm_loss(ckpt), density=0.05)
    expected = select_sparse_delta(plain, batches, lm_loss(plain), density=0.05)
    for name in expected:
        assert torch.equal(got[name].delta_indices, expected[name].delta_indices), name
    lm_loss(ckpt)(batches[0]).backward()
    lm_loss(plain)(batches[0]).backward()
    for name, m in expected.items():
        if m.delta_indices.numel():
            torch.testing.assert_close(got[name].delta_values.grad, m.delta_values.grad)
