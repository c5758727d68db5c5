"""The torch backend of the sparse step (ops/adamw/foreach.py) against the oracle, bit for bit."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels.ops.adamw import foreach, naive, quantization
from gallop_kernels.ops.adamw.hyper import AdamWHyper

SIZES = [(37, 5), (1, 1), (64,), (300,), (0,), (12, 12)]


def _group(param_dtype, grad_dtype, master, compact, gen, state_bits=32):
    params, grads, states = [], [], []
    for j, shape in enumerate(SIZES):
        p = (torch.randn(shape, generator=gen) * 0.1).to(param_dtype)
        n = p.numel()
        k = [n, 1, n // 3, n // 2, 0, 0][j]  # all, one, some, none of a non-empty tensor
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32)
        st = {"indices": idx}
        m = torch.randn(k, generator=gen) * 1e-2
        v = torch.rand(k, generator=gen) * 1e-4
        if state_bits == 8:
            st["exp_avg"], st["exp_avg_absmax"] = quantization.quantize_blockwise(m, True)
            st["exp_avg_sq"], st["exp_avg_sq_absmax"] = quantization.quantize_blockwise(v, False)
        else:
            st["exp_avg"], st["exp_avg_sq"] = m, v
        if master:
            st["master"] = p.reshape(-1)[idx.long()].float() + 1e-4
        g = torch.randn(shape, generator=gen).to(grad_dtype)
        g.reshape(-1)[: n // 4] = 0.0
        if compact:
            g = g.reshape(-1)[idx.long()].contiguous()
        params.append(p)
        grads.append(g)
        states.append(st)
    return params, grads, states


def _copy(states):
    return [{k: v.clone() for k, v in st.items()} for st in states]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("state_bits", [32, 8])
def test_foreach_step_is_the_naive_step_bit_for_bit(param_dtype, grad_dtype, compact, state_bits):
    gen = torch.Generator().manual_seed(7)
    master = param_dtype != torch.float32
    params, grads, states = _group(param_dtype, grad_dtype, master, compact, gen, state_bits)
    ref_params, ref_states = [p.clone() for p in params], _copy(states)
    for step in range(1, 5):
        hyper = AdamWHyper(step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        foreach.sparse_adamw(params, grads, states, hyper)
        for p, g, st in zip(ref_params, grads, ref_states):
            if state_bits == 8:
                naive.sparse_adamw_step_8bit(p, g, st["indices"], st["exp_avg"], st["exp_avg_absmax"],
                                             st["exp_avg_sq"], st["exp_avg_sq_absmax"],
                                             st.get("master"), hyper)
            else:
                naive.sparse_adamw_step(p, g, st["indices"], st["exp_avg"], st["exp_avg_sq"],
                                        st.get("master"), hyper)
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), step
        for st, ref in zip(states, ref_states):
            for key in st:
                assert torch.equal(st[key], ref[key]), (step, key)


def test_foreach_step_touches_only_selected_entries():
    gen = torch.Generator().manual_seed(8)
    params, grads, states = _group(torch.bfloat16, torch.bfloat16, True, False, gen)
    before = [p.clone() for p in params]
    foreach.sparse_adamw(params, grads, states, AdamWHyper(1, 1e-2, 0.9, 0.999, 1e-8, 0.0))
    for p, b, st in zip(params, before, states):
        keep = torch.ones(p.numel(), dtype=torch.bool)
        keep[st["indices"].long()] = False
        assert torch.equal(p.reshape(-1)[keep], b.reshape(-1)[keep])
