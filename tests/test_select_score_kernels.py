"""The shared score jit helpers: the counter hash of the "random" score and the radix keys."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gallop_kernels.ops.select import naive  # noqa: E402
from gallop_kernels.ops.select.score import hash_uniform, tile_key  # noqa: E402


@triton.jit
def _hash_kernel(idx_ptr, out_ptr, n, seed_mix, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    gidx = tl.load(idx_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + offs, hash_uniform(gidx, seed_mix), mask=m)


@triton.jit
def _key_kernel(s_ptr, key_ptr, bad_ptr, n, BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    offs = tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    key, bad = tile_key(s_ptr, s_ptr, offs, m, offs, 0.0, 0, 4, False, SIGNED, tl.float32, tl.float32)
    tl.store(key_ptr + offs, key.to(tl.int64), mask=m)
    tl.store(bad_ptr + offs, bad.to(tl.int32), mask=m)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**32 - 1, 2**40 + 3])
def test_hash_uniform_bit_exact_including_huge_indices(seed):
    idx = torch.cat([
        torch.arange(0, 100),
        torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**32 + 12345,
                      2**40 + 7, 2**62 + 1, 2**63 - 1]),
    ]).to(torch.int64).to(_device())
    out = torch.empty(idx.numel(), dtype=torch.float32, device=idx.device)
    _hash_kernel[(1,)](idx, out, idx.numel(), naive.seed_mix(seed), BLOCK=128)
    ref = naive.hash_uniform(idx, seed)
    assert torch.equal(out, ref)
    assert (out >= 0).all() and (out < 1).all()


def test_signed_keys_order_like_floats():
    vals = torch.tensor([
        float("-inf"), -3.4e38, -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 3.4e38,
        float("inf"), float("nan"),
    ])
    dev = _device()
    s = vals.to(dev)
    key = torch.empty(s.numel(), dtype=torch.int64, device=dev)
    bad = torch.empty(s.numel(), dtype=torch.int32, device=dev)
    _key_kernel[(1,)](s, key, bad, s.numel(), BLOCK=16, SIGNED=True)
    key, bad = key.cpu(), bad.cpu()
    finite = key[1:11]
    assert (finite[1:] >= finite[:-1]).all()
    assert key[5] == key[6]  # -0.0 and +0.0: one key
    assert (torch.diff(torch.cat([finite[:5], finite[6:]])) > 0).all()
    assert bad.tolist() == [1] + [0] * 10 + [1, 1]
