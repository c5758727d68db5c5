"""Triton fused multi-tensor sparse AdamW step against adamw_naive.sparse_adamw_step.

On the CPU (Triton interpreter) the kernel reproduces torch's CPU arithmetic: m and v bit for bit
where torch's vectorised kernels fuse their multiply-adds (AVX2/AVX512 builds), w within float32
rounding (torch's CPU sqrt is not always correctly rounded, the kernel's is). bf16/fp16 params
must equal ``master.to(dtype)`` exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gallop_kernels.ops.adamw import launcher as A  # noqa: E402
from gallop_kernels.ops.adamw import naive as adamw_naive  # noqa: E402
from gallop_kernels.ops.adamw.hyper import AdamWHyper  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(A, "INTERPRETER_BLOCK", 64)  # several programs per tensor, partial last blocks


def triton_step(params, grads, indices, exp_avgs, exp_avg_sqs, masters, *hyper, **layout):
    """The launcher with the hyper-parameters spelled out: (step, lr, β1, β2, eps, weight decay)."""
    A.sparse_adamw(params, grads, indices, exp_avgs, exp_avg_sqs, masters, AdamWHyper(*hyper),
                   **layout)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _guarded(n, fill, gen, pad=5):
    """A float32 state vector of n entries inside a NaN-guarded buffer (catches stray writes)."""
    buf = torch.full((n + 2 * pad,), float("nan"), device=_device())
    view = buf[pad: pad + n]
    view.copy_(fill)
    return buf, view


def _make(shapes, pdtypes, with_master, density, gen, idx_dtype=torch.int32, compact=False):
    dev = _device()
    tensors = []
    for j, shape in enumerate(shapes):
        pd = pdtypes[j % len(pdtypes)]
        p = torch.randn(shape, generator=gen).to(pd).to(dev)
        n = p.numel()
        k = max(0, int(n * density)) if n > 1 else 1
        idx = torch.sort(torch.randperm(n, generator=gen)[:k]).values.to(idx_dtype).to(dev)
        m_buf, m = _guarded(k, torch.randn(k, generator=gen) * 1e-2, gen)
        v_buf, v = _guarded(k, torch.rand(k, generator=gen) * 1e-4, gen)
        master = None
        w_buf = None
        if with_master(pd):
            w_buf, master = _guarded(k, p.reshape(-1)[idx.long()].float().cpu(), gen)
        tensors.append(dict(p=p, idx=idx, m=m, v=v, master=master, bufs=(m_buf, v_buf, w_buf)))
    return tensors


def _clone(tensors):
    out = []
    for t in tensors:
        out.append(dict(
            p=t["p"].clone(), idx=t["idx"], m=t["m"].clone(), v=t["v"].clone(),
            master=None if t["master"] is None else t["master"].clone(),
        ))
    return out


def _run(tensors, ref, steps, gdtypes, gen, compact=False, **hp):
    hp = {**HP, **hp}
    for step in range(1, steps + 1):
        grads = []
        for j, t in enumerate(tensors):
            gd = gdtypes[j % len(gdtypes)]
            g = torch.randn(t["p"].shape, generator=gen).to(gd).to(_device())
            if compact:
                g = g.reshape(-1)[t["idx"].long()].contiguous()
            grads.append(g)
        before = [t["p"].clone() for t in tensors]
        triton_step(
            [t["p"] for t in tensors], grads, [t["idx"] for t in tensors],
            [t["m"] for t in tensors], [t["v"] for t in tensors], [t["master"] for t in tensors],
            step, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"],
        )
        for t, r, g, b in zip(tensors, ref, grads, before):
            adamw_naive.sparse_adamw_step(
                r["p"], g, r["idx"], r["m"], r["v"], r["master"],
                AdamWHyper(step, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]),
            )
            # unselected entries untouched, bit for bit
            keep = torch.ones(t["p"].numel(), dtype=torch.bool, device=t["p"].device)
            keep[t["idx"].long()] = False
            assert torch.equal(t["p"].reshape(-1)[keep], b.reshape(-1)[keep])
            _compare(t, r)


_FUSED_CPU = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compare(t, r):
    if t["m"].device.type == "cpu" and _FUSED_CPU:  # the same fused multiply-adds: exact
        assert torch.equal(t["m"], r["m"]) and torch.equal(t["v"], r["v"])
    torch.testing.assert_close(t["m"], r["m"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(t["v"], r["v"], rtol=1e-6, atol=1e-14)
    if t["master"] is not None:
        torch.testing.assert_close(t["master"], r["master"], rtol=2e-6, atol=1e-9)
        sel = t["p"].reshape(-1)[t["idx"].long()]
        assert torch.equal(sel, t["master"].to(t["p"].dtype)), "param != master rounded"
    else:
        torch.testing.assert_close(t["p"].float(), r["p"].float(), rtol=2e-6, atol=1e-9)
    for buf in t.get("bufs", ()):
        if buf is not None:  # guards around the state vectors still NaN: no stray writes
            assert buf[:5].isnan().all() and buf[-5:].isnan().all()


SHAPES = [(300,), (17, 5), (1,), (129,), (64,)]


@pytest.mark.parametrize("pdtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gdtype", DTYPES, ids=["g32", "gbf16", "g16"])
def test_every_dtype_pair_several_steps(pdtype, gdtype):
    gen = torch.Generator().manual_seed(0)
    tensors = _make(SHAPES, [pdtype], lambda pd: pd != torch.float32, 0.4, gen)
    ref = _clone(tensors)
    _run(tensors, ref, 3, [gdtype], gen)


def test_mixed_group_one_call():
    """fp32 without master, bf16/fp16 with master, fp32 with master, int32 and int64 indices."""
    gen = torch.Generator().manual_seed(1)
    tensors = _make(SHAPES + [(200,), (3, 7)], DTYPES, lambda pd: pd != torch.float32, 0.3, gen)
    tensors += _make([(150,)], [torch.float32], lambda pd: True, 0.5, gen, idx_dtype=torch.int64)
    ref = _clone(tensors)
    _run(tensors, ref, 4, [torch.float32, torch.bfloat16], gen)


def test_compact_gradients():
    gen = torch.Generator().manual_seed(2)
    tensors = _make(SHAPES, DTYPES, lambda pd: pd != torch.float32, 0.5, gen)
    ref = _clone(tensors)
    _run(tensors, ref, 2, [torch.float32, torch.float16], gen, compact=True)


def test_dense_density_one_and_no_weight_decay():
    gen = torch.Generator().manual_seed(3)
    tensors = _make([(100,), (40,)], [torch.float32, torch.bfloat16],
                    lambda pd: pd != torch.float32, 1.0, gen)
    ref = _clone(tensors)
    _run(tensors, ref, 3, [torch.float32], gen, weight_decay=0.0, lr=1e-3, beta2=0.99)


def test_bf16_param_without_master():
    """A low-precision param may hold its own weight (masters[i] None): rounded like torch."""
    gen = torch.Generator().manual_seed(4)
    tensors = _make([(200,), (33,)], [torch.bfloat16, torch.float16], lambda pd: False, 0.5, gen)
    ref = _clone(tensors)
    _run(tensors, ref, 2, [torch.float32], gen, lr=0.5)
    for t, r in zip(tensors, ref):
        # weights rounded to the param's dtype each step, like torch (on a GPU torch's scalar
        # division may differ in the last float32 bit, which can flip a rounding: allow one ulp)
        if t["p"].device.type == "cpu":
            assert torch.equal(t["p"], r["p"])
        else:
            torch.testing.assert_close(t["p"], r["p"], rtol=8e-3, atol=0)


def test_empty_selection_and_empty_list():
    gen = torch.Generator().manual_seed(5)
    tensors = _make([(50,), (30,)], [torch.float32], lambda pd: False, 0.0, gen)
    tensors += _make([(20,)], [torch.float32], lambda pd: False, 0.5, gen)
    ref = _clone(tensors)
    _run(tensors, ref, 1, [torch.float32], gen)
    triton_step([], [], [], [], [], [], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_matches_torch_adamw_at_density_one():
    """density=1 sparse AdamW == torch.optim.AdamW to float32 rounding."""
    gen = torch.Generator().manual_seed(6)
    dev = _device()
    p = torch.randn(257, generator=gen).to(dev)
    q = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    idx = torch.arange(257, dtype=torch.int32, device=dev)
    m = torch.zeros(257, device=dev)
    v = torch.zeros(257, device=dev)
    for step in range(1, 6):
        g = torch.randn(257, generator=gen).to(dev)
        q.grad = g.clone()
        opt.step()
        triton_step([p], [g], [idx], [m], [v], [None], step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_validation_errors():
    dev = _device()
    p = torch.randn(10, device=dev)
    g = torch.randn(10, device=dev)
    idx = torch.tensor([1, 4], dtype=torch.int32, device=dev)
    m = torch.zeros(2, device=dev)
    v = torch.zeros(2, device=dev)
    args = (1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(TypeError):
        triton_step([p], [g], [idx], [m.double()], [v], [None], *args)
    with pytest.raises(TypeError):
        triton_step([p], [g], [idx.float()], [m], [v], [None], *args)
    with pytest.raises(ValueError, match="contiguous"):
        triton_step([torch.randn(5, 2, device=dev).t()], [g.view(2, 5)], [idx], [m],
                                 [v], [None], *args)
    with pytest.raises(ValueError, match="contiguous"):
        big = torch.zeros(4, device=dev)
        triton_step([p], [g], [idx], [big[::2]], [v], [None], *args)
    with pytest.raises(ValueError, match="entries"):
        triton_step([p], [g], [idx], [torch.zeros(3, device=dev)], [v], [None], *args)
    with pytest.raises(ValueError, match="grad"):
        triton_step([p], [torch.randn(7, device=dev)], [idx], [m], [v], [None], *args)
    with pytest.raises(ValueError, match="length"):
        triton_step([p], [g], [idx], [m], [v], [], *args)
    with pytest.raises(ValueError, match="step"):
        triton_step([p], [g], [idx], [m], [v], [None], 0, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    # nothing was modified by the rejected calls
    assert torch.equal(m, torch.zeros(2, device=dev))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_gpu():
    gen = torch.Generator().manual_seed(7)
    tensors = _make(SHAPES, DTYPES, lambda pd: pd != torch.float32, 0.4, gen)
    grads = [torch.randn(t["p"].shape, device="cuda") for t in tensors]
    call = lambda: triton_step(  # noqa: E731
        [t["p"] for t in tensors], grads, [t["idx"] for t in tensors],
        [t["m"] for t in tensors], [t["v"] for t in tensors], [t["master"] for t in tensors],
        1, 1e-3, 0.9, 0.999, 1e-8, 0.0,
    )
    call()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
