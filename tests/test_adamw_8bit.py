"""8-bit blockwise m, v (bitsandbytes' dynamic maps, built without bitsandbytes): the maps, the
rounding rule, state size, accuracy, checkpoints. Comparisons with bitsandbytes itself run where
it is installed."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from gallop_kernels import SparseAdamW
from gallop_kernels.ops.adamw import naive as adamw_naive
from gallop_kernels.ops.adamw import quantization
from gallop_kernels.ops.adamw.hyper import AdamWHyper

# sha256 of the maps' float32 bytes (bitsandbytes 0.50 create_dynamic_map), so that a change of
# the maps shows up where bitsandbytes is not installed too
MAP_DIGESTS = {True: "e732639a65f497b4", False: "305f002cc11278fb"}


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_dynamic_maps(signed) -> None:
    """The project's own maps: 256 sorted values in [-1, 1] with 0 and 1, pinned by digest, and
    equal to bitsandbytes' `create_dynamic_map` where it is installed."""
    ours = quantization.dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.numel() == 256
    assert bool((ours[1:] >= ours[:-1]).all()) and float(ours[-1]) == 1.0 and 0.0 in ours.tolist()
    assert float(ours.min()) == (-ours[-2] if signed else 0.0)
    digest = hashlib.sha256(ours.numpy().tobytes()).hexdigest()[:16]
    assert digest == MAP_DIGESTS[signed]
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed).to(torch.float32))


@pytest.fixture(autouse=True)
def small_8bit_threshold(monkeypatch):
    """Quantize tensors from 256 selected entries so interpreter-sized tests exercise 8 bits
    (the default of the ``min_8bit_entries`` option, lowered for every optimizer built here)."""
    monkeypatch.setitem(SparseAdamW.__init__.__kwdefaults__, "min_8bit_entries", 256)


def _nearest_codes_brute_force(x: torch.Tensor, signed: bool):
    """The documented rule, by exhaustive search: per block absmax, s = x / absmax clamped to
    [-1, 1], the code minimising the float32 |map - s| (the lowest such code)."""
    code = quantization.quantization_map(signed)
    blocks = x.split(quantization.QUANT_BLOCK)
    codes, maxes = [], []
    for b in blocks:
        amax = (b.abs() if signed else b).max().clamp(min=0.0)
        s = (b / amax if amax > 0 else torch.zeros_like(b)).clamp(-1.0, 1.0)
        dist = (code[None, :] - s[:, None]).abs()  # float32, as the kernel computes it
        codes.append(dist.argmin(dim=1))  # argmin returns the first (lowest) minimum
        maxes.append(amax.reshape(1))
    return torch.cat(codes).to(torch.uint8), torch.cat(maxes)


@pytest.mark.parametrize("kind", ["gauss", "uniform", "squared", "ties_and_zeros"])
def test_quantization_rule_is_nearest_code_and_bitsandbytes_compatible(kind) -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")

    gen = torch.Generator().manual_seed(11)
    n = 5 * 256 + 77
    x = {
        "gauss": torch.randn(n, generator=gen) * 1e-2,
        "uniform": torch.rand(n, generator=gen) * 1e-4,
        "squared": (torch.randn(n, generator=gen) * 1e-2) ** 2,
        "ties_and_zeros": torch.tensor([0.0, 1.0, -1.0, 0.5, 0.25])[
            torch.randint(5, (n,), generator=gen)],
    }[kind]
    x[256:512] = 0.0  # an all-zero block: absmax 0, every code the map's zero
    signed = kind in ("gauss", "ties_and_zeros")
    if not signed:
        x = x.abs()
    codes, absmax = quantization.quantize_blockwise(x, signed)
    want_codes, want_max = _nearest_codes_brute_force(x, signed)
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_max)
    # bitsandbytes: same absmaxes, reads our codes back identically, and where its own CPU
    # quantizer picks another code that code is never nearer to the value than ours
    theirs, state = bnbf.quantize_blockwise(x, code=quantization.quantization_map(signed), blocksize=256)
    assert torch.equal(absmax, state.absmax)
    ours_back = quantization.dequantize_blockwise(codes, absmax, signed)
    state.absmax = absmax
    assert torch.equal(ours_back, bnbf.dequantize_blockwise(codes, state))
    theirs_back = quantization.dequantize_blockwise(theirs, absmax, signed)
    assert bool(((ours_back - x).abs() <= (theirs_back - x).abs()).all())


def _fma_exact(a: float, b: float, c: float) -> float:
    """Correctly rounded float32 a*b + c, from exact rational arithmetic (ties to even)."""
    from fractions import Fraction

    import numpy as np

    exact = Fraction(a) * Fraction(b) + Fraction(c)
    guess = np.float32(float(exact))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    def key(r):
        even = int(np.array(r, dtype=np.float32).view(np.uint32)) & 1
        return (abs(Fraction(float(r)) - exact), even)
    return float(min(cands, key=key))


def test_fma_f32_is_correctly_rounded() -> None:
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(300, generator=gen)
    b = torch.randn(300, generator=gen) * torch.exp(torch.randn(300, generator=gen) * 5)
    c = torch.randn(300, generator=gen) * 1e-3
    # the double-rounding traps: a*b exactly halfway between two float32 values, c tiny
    half = torch.tensor([1 + 2**-12, -(1 + 2**-12), 1 + 2**-12, 1 + 2**-12, 3 * (1 + 2**-12)])
    a = torch.cat([a, half])
    b = torch.cat([b, torch.tensor([1 + 2**-12, 1 + 2**-12, 1 + 2**-12, 1 + 2**-12, 1 + 2**-12])])
    c = torch.cat([c, torch.tensor([2**-60, 2**-60, -(2**-60), 0.0, -(2**-58)])])
    got = adamw_naive.fma_f32(a, b, c)
    want = torch.tensor([_fma_exact(*map(float, t)) for t in zip(a, b, c)], dtype=torch.float32)
    assert torch.equal(got, want)
    naive = (a.double() * b.double() + c.double()).float()
    assert not torch.equal(naive, want)  # the traps are real: plain float64 rounds them wrongly


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
    bnb = pytest.importorskip("bitsandbytes")

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


def test_triton_8bit_kernel_is_the_reference_bit_for_bit(dtype) -> None:
    """Codes, absmaxes, master and param equal `adamw_naive.sparse_adamw_step_8bit`'s exactly,
    step after step (the state feeds back, so any rounding difference would compound), with
    dense and gathered (compact) gradients on alternate steps."""
    pytest.importorskip("triton")
    from gallop_kernels.ops.adamw import launcher

    gen = torch.Generator().manual_seed(3)
    sizes, counts = [700, 1, 300], [600, 1, 257]
    rows = []
    for n, k in zip(sizes, counts):
        p = torch.randn(n, generator=gen).to(dtype)
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32)
        m, m_max = quantization.quantize_blockwise(torch.randn(k, generator=gen) * 0.1, True)
        v, v_max = quantization.quantize_blockwise(torch.rand(k, generator=gen) * 0.01, False)
        master = p[idx.long()].float() if dtype != torch.float32 else None
        rows.append([p, None, idx, m, m_max, v, v_max, master])
    ours = [[t.clone() if t is not None else None for t in row] for row in rows]
    for step in range(1, 11):
        hyper = AdamWHyper(step, 1e-2, 0.9, 0.999, 1e-8, 0.01)
        compact = step % 2 == 0
        for row, mine in zip(rows, ours):
            n = row[0].numel()
            g = torch.randn(n, generator=gen).to(dtype)
            g[: n // 7] = 0.0  # zero gradients: v decays, m may hit the map's zero exactly
            g = g[row[2].long()].contiguous() if compact else g
            row[1] = mine[1] = g
            adamw_naive.sparse_adamw_step_8bit(*row, hyper)
        p, g, idx, m, m_max, v, v_max, master = (list(c) for c in zip(*ours))
        launcher.sparse_adamw(p, g, idx, m, v, master, hyper, state_layout="8bit",
                              exp_avg_absmaxes=m_max, exp_avg_sq_absmaxes=v_max)
        for want, got in zip(rows, ours):
            for j in (0, 3, 4, 5, 6, 7):
                if want[j] is not None:
                    assert torch.equal(got[j], want[j]), (step, j)


def test_8bit_backends_identical_through_the_optimizer() -> None:
    """SparseAdamW(state_bits=8): torch and Triton backends hold identical state after many
    steps (the issue that motivated the shared rule: they used to drift apart)."""
    pytest.importorskip("triton")
    torch.manual_seed(4)
    init = torch.randn(2000).to(torch.bfloat16)
    params = {b: init.clone().requires_grad_() for b in ("torch", "triton")}
    opts = {b: SparseAdamW([params[b]], lr=1e-2, density=0.3, state_bits=8, backend=b)
            for b in params}
    for b in params:
        train([params[b]], opts[b], 16, seed=5)
    st_t, st_k = opts["torch"].state[params["torch"]], opts["triton"].state[params["triton"]]
    for key, value in st_t.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(st_k[key], value), key
    assert torch.equal(params["torch"].detach(), params["triton"].detach())
