"""8-bit blockwise m, v (bitsandbytes' dynamic maps): state size, accuracy, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("bitsandbytes")

from gallop_kernels import SparseAdamW, reference  # noqa: E402


@pytest.fixture(autouse=True)
def small_8bit_threshold(monkeypatch):
    """Quantize tensors from 256 selected entries so interpreter-sized tests exercise 8 bits
    (the default of the ``min_8bit_entries`` option, lowered for every optimizer built here)."""
    monkeypatch.setitem(SparseAdamW.__init__.__kwdefaults__, "min_8bit_entries", 256)


def test_blockwise_round_trip_is_bitsandbytes() -> None:
    import bitsandbytes.functional as bnbf

    x = torch.randn(1000)
    codes, absmax = reference.quantize_blockwise(x, signed=True)
    theirs, state = bnbf.quantize_blockwise(x, code=reference.quantization_map(True), blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(absmax, state.absmax)
    torch.testing.assert_close(reference.dequantize_blockwise(codes, absmax, True),
                               bnbf.dequantize_blockwise(theirs, state))


def train(params, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        opt.zero_grad()


def test_8bit_state_bytes_and_dtypes(backend) -> None:
    p = torch.randn(4000, dtype=torch.bfloat16, requires_grad=True)
    small = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    opt = SparseAdamW([p, small], lr=1e-3, density=0.25, score="random", state_bits=8,
                      backend=backend)
    train([p, small], opt, 2)
    st = opt.state[p]
    k = st["indices"].numel()
    assert k >= 256
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg_absmax"].shape == (-(-k // 256),)
    per_entry = sum(t.numel() * t.element_size() for key, t in st.items() if key != "step") / k
    # int32 index + 2 × uint8 + fp32 master, plus two fp32 absmax per (partial) block of 256
    assert per_entry == pytest.approx(10 + 2 * 4 * (-(-k // 256)) / k)
    assert opt.state[small]["exp_avg"].dtype == torch.float32  # too small to quantize


def test_8bit_tracks_32bit_closely(backend) -> None:
    torch.manual_seed(0)
    a = torch.randn(3000, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    opt32 = SparseAdamW([a], lr=1e-2, density=0.5, backend=backend)
    opt8 = SparseAdamW([b], lr=1e-2, density=0.5, state_bits=8, backend=backend)
    train([a], opt32, 5)
    train([b], opt8, 5)
    assert torch.equal(opt32.selected_indices(a), opt8.selected_indices(b))
    diff = (a.detach() - b.detach()).abs().max().item()
    assert diff < 0.1 * 5 * 1e-2  # within 10% of the largest possible movement (5 steps × lr)


def test_density_one_close_to_bitsandbytes_adamw8bit() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(1)
    a = torch.randn(4096, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ours = SparseAdamW([a], lr=1e-2, density=1.0, state_bits=8, backend="torch")
    theirs = bnb.optim.AdamW8bit([b], lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        g = torch.randn(4096, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert (a.detach() - b.detach()).abs().max().item() < 5e-3  # lr 1e-2, 5 steps


def test_8bit_checkpoint_keeps_uint8(backend) -> None:
    p = torch.randn(2000, dtype=torch.bfloat16, requires_grad=True)
    opt = SparseAdamW([p], lr=1e-3, density=0.5, state_bits=8, backend=backend)
    train([p], opt, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = SparseAdamW([p], lr=1e-3, density=0.5, state_bits=8, backend=backend)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state[p].items():
        assert fresh.state[p][key].dtype == value.dtype
        assert torch.equal(fresh.state[p][key], value)


def test_reselection_carries_8bit_moments(backend) -> None:
    p = torch.randn(2000, requires_grad=True)
    opt = SparseAdamW([p], lr=1e-3, density=0.5, score="magnitude", reselect_every=1,
                      state_bits=8, backend=backend)
    train([p], opt, 3)
    assert opt.state[p]["exp_avg"].dtype == torch.uint8


def test_bad_state_bits() -> None:
    with pytest.raises(ValueError, match="state_bits"):
        SparseAdamW([torch.zeros(3, requires_grad=True)], state_bits=4)


@pytest.mark.parametrize("compact", [False, True], ids=["dense_grad", "compact_grad"])
def test_triton_8bit_kernel_matches_bitsandbytes_reference(dtype, compact) -> None:
    pytest.importorskip("triton")
    from gallop_kernels.ops.sparse_adamw_8bit import triton_sparse_adamw_8bit_step

    gen = torch.Generator().manual_seed(3)
    sizes, counts = [700, 1, 300], [600, 1, 257]
    rows = []
    for n, k in zip(sizes, counts):
        p = torch.randn(n, generator=gen).to(dtype)
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32)
        m, m_max = reference.quantize_blockwise(torch.randn(k, generator=gen) * 0.1, True)
        v, v_max = reference.quantize_blockwise(torch.rand(k, generator=gen) * 0.01, False)
        g = torch.randn(k if compact else n, generator=gen).to(dtype)
        master = p[idx.long()].float() if dtype != torch.float32 else None
        rows.append([p, g, idx, m, m_max, v, v_max, master])
    ours = [[t.clone() if t is not None else None for t in row] for row in rows]
    hyper = (3, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    for row in rows:
        reference.sparse_adamw_step_8bit(*row, *hyper)
    columns = [list(c) for c in zip(*ours)]
    triton_sparse_adamw_8bit_step(*columns, *hyper)
    for want, got in zip(rows, ours):
        # the same fp32 math on the same dequantized moments, up to where torch's CPU kernels
        # fuse a multiply-add (vector body) or not (scalar tail): float32 rounding
        if want[7] is not None:
            torch.testing.assert_close(got[7], want[7], rtol=1e-6, atol=1e-7)
            idx = got[2].long()
            assert torch.equal(got[0][idx], got[7].to(dtype))  # param = rounded master
        else:
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
        for codes, absmax, signed in ((3, 4, True), (5, 6, False)):
            torch.testing.assert_close(got[absmax], want[absmax], rtol=1e-6, atol=0)
            agree = (got[codes] == want[codes]).float().mean().item()
            assert agree > 0.98, agree  # bitsandbytes' CPU search differs on rare near-ties
            deq_got = reference.dequantize_blockwise(got[codes], got[absmax], signed)
            deq_want = reference.dequantize_blockwise(want[codes], want[absmax], signed)
            step = want[absmax].repeat_interleave(256)[: deq_want.numel()] * 0.02
            assert bool(((deq_got - deq_want).abs() <= step).all())
