"""The fp32 master copy never overwrites what was written into a bf16/fp16 model (issue 17, case 2).

The rule (`docs/design.md#sparse-update`): the param is the truth, the master is its higher
precision while the param holds the master's rounding. Where a selected entry's param no longer
does (``model.load_state_dict``, ``merge_delta``/``unmerge_delta``, an in-place edit, through
``.data`` too), the step takes the param's value as the weight (the master resyncs from it). The
same for fp32 and 8-bit moments, lean mode, and the torch and Triton backends, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallop_kernels import SparseAdamW
from gallop_kernels.ops.adamw import AdamWHyper, naive, sparse_adamw
from gallop_kernels.ops.adamw.quantization import quantize_blockwise

CASES = [  # (dtype, state_bits, lean)
    (torch.bfloat16, 32, False), (torch.bfloat16, 8, False), (torch.bfloat16, 32, True),
    (torch.float16, 32, False), (torch.float32, 32, False),  # the fp32 control (no master)
]


def model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 8)).to(dtype)


def loss(net: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 24, generator=gen).to(next(net.parameters()).dtype)
    return net(x).float().square().mean()


def trained(dtype, state_bits, lean, backend, steps=3):
    net = model(dtype)
    base = copy.deepcopy(net.state_dict())
    opt = SparseAdamW(net.named_parameters(), lr=3e-2, density=0.5, backend=backend, lean=lean,
                      state_bits=state_bits, min_8bit_entries=0)
    for i in range(steps):
        loss(net, i).backward()
        opt.step()
        opt.zero_grad()
    return net, opt, base


def zero_step(net: nn.Module, opt: SparseAdamW) -> None:
    """A step with lr = 0 and all-zero gradients: it must not change a single weight."""
    for group in opt.param_groups:
        group["lr"] = 0.0
    (sum(p.float().sum() for p in net.parameters()) * 0.0).backward()
    opt.step()
    opt.zero_grad()


def differing(net: nn.Module, state: dict) -> int:
    return sum(int((p.detach() != state[n]).sum()) for n, p in net.named_parameters())


@pytest.mark.parametrize("dtype, state_bits, lean", CASES)
def test_a_loaded_state_survives_the_next_step(backend, dtype, state_bits, lean):
    """The issue's reproduction: train, ``model.load_state_dict(base_state)``, one step at lr = 0
    with zero gradients: 0 entries differ from ``base_state`` (416 did before the fix)."""
    net, opt, base = trained(dtype, state_bits, lean, backend)
    assert differing(net, base) > 0  # training changed the selected entries
    net.load_state_dict(base)
    zero_step(net, opt)
    assert differing(net, base) == 0


@pytest.mark.parametrize("dtype, state_bits, lean", CASES)
def test_merge_unmerge_and_edits_survive_the_next_step(backend, dtype, state_bits, lean, tmp_path):
    from gallop_kernels.delta import extract_delta, merge_delta, unmerge_delta

    net, opt, base = trained(dtype, state_bits, lean, backend)
    delta = extract_delta(net, opt, base=base)
    net.load_state_dict(base)
    restore = merge_delta(net, delta, scale=0.5)
    merged = copy.deepcopy(net.state_dict())
    zero_step(net, opt)
    assert differing(net, merged) == 0
    unmerge_delta(net, restore)
    zero_step(net, opt)
    assert differing(net, base) == 0
    weight = net[0].weight
    selected = opt.selected_indices(weight)[:5]
    with torch.no_grad():
        weight.data.view(-1)[selected] = torch.tensor([0.5, -2.0, 3.0, 0.0, 1e-3], dtype=dtype)  # via .data
        net[2].weight.mul_(-1)  # in place, through the param
    edited = copy.deepcopy(net.state_dict())
    zero_step(net, opt)
    assert differing(net, edited) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resync_changes_only_what_changed_and_training_goes_on_from_it(dtype):
    """Entries nobody touched keep their master's full precision (the resync is the identity
    there), an edited entry trains on from its new value, exactly as a fresh master would."""
    net, opt, _ = trained(dtype, 32, False, "torch")
    weight = net[0].weight
    st = opt.state[weight]
    before = st["master"].clone()
    assert torch.equal(naive.resync_master(weight.detach().view(-1)[st["indices"].long()], before), before)
    j = 3
    with torch.no_grad():
        weight.view(-1)[st["indices"][j].long()] = 0.25
    for group in opt.param_groups:
        group["lr"] = 1e-2
    loss(net, 9).backward()
    expected = before.clone()
    expected[j] = 0.25
    g = weight.grad.view(-1)[st["indices"].long()].float()
    m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    steps = opt.param_groups[0]["steps_since_selection"] + 1
    w = expected.clone()  # the weight a fresh master would hold, stepped by the oracle
    naive.sparse_adamw_step(w, g, torch.arange(g.numel()), m, v, None,
                            AdamWHyper(step=steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0))
    opt.step()
    assert torch.equal(st["master"], w)


def _op_level_agreement(data) -> None:
    """The op itself, every backend (naive, torch, Triton interpreter), fp32 and 8-bit state,
    bf16/fp16 params, dense and compact gradients, with random outside edits: bit for bit."""
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]), label="dtype")
    eight = data.draw(st.booleans(), label="8-bit")
    compact = data.draw(st.booleans(), label="compact gradient")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    n = data.draw(st.integers(1, 700), label="numel")
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen).to(dtype)
    k = data.draw(st.integers(1, n), label="k")
    idx = torch.sort(torch.randperm(n, generator=gen)[:k]).values.to(torch.int32)
    master = param[idx.long()].float() + torch.randn(k, generator=gen) * 1e-4  # its rounding is the param...
    param[idx.long()] = master.to(dtype)
    edits = torch.rand(k, generator=gen) < data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="edited share")
    param[idx.long()[edits]] = (torch.randn(int(edits.sum()), generator=gen) * 3).to(dtype)  # ...except here
    grad = torch.randn(k if compact else n, generator=gen).to(dtype)
    m, v = torch.randn(k, generator=gen) * 0.1, torch.rand(k, generator=gen) * 0.01
    hyper = AdamWHyper(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    def state():
        st_ = {"indices": idx.clone(), "master": master.clone()}
        if eight:
            st_["exp_avg"], st_["exp_avg_absmax"] = quantize_blockwise(m, True)
            st_["exp_avg_sq"], st_["exp_avg_sq_absmax"] = quantize_blockwise(v, False)
        else:
            st_["exp_avg"], st_["exp_avg_sq"] = m.clone(), v.clone()
        return st_

    results = []
    for backend in ("naive", "torch", "triton"):
        p, s = param.clone(), state()
        if backend == "naive":
            if eight:
                naive.sparse_adamw_step_8bit(p, grad, s["indices"], s["exp_avg"], s["exp_avg_absmax"],
                                             s["exp_avg_sq"], s["exp_avg_sq_absmax"], s["master"], hyper)
            else:
                naive.sparse_adamw_step(p, grad, s["indices"], s["exp_avg"], s["exp_avg_sq"], s["master"], hyper)
        else:
            sparse_adamw([p], [grad], [s], hyper, backend=backend)
        results.append((p, s))
    (p0, s0), others = results[0], results[1:]
    for p, s in others:
        assert torch.equal(p.view(torch.int16), p0.view(torch.int16))
        for key in s0:
            assert torch.equal(s[key], s0[key]), key
    if not eight:  # an edited entry stepped from the param's value, the others from their master
        w = torch.where(edits, param[idx.long()].float(), master)
        naive.sparse_adamw_step(w, grad if compact else grad[idx.long()], torch.arange(k), m.clone(), v.clone(),
                                None, hyper)
        assert torch.equal(s0["master"], w)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_backend_resyncs_bit_for_bit(data):
    _op_level_agreement(data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_backend_resyncs_bit_for_bit_many(data):
    _op_level_agreement(data)
