"""The chunked pure-torch radix select picks exactly the reference's index set."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import reference
from gallop_kernels.ops.streaming_select import order_keys, streaming_select


def test_order_keys_order_like_floats() -> None:
    values = torch.tensor([-float("inf"), -3e38, -1.0, -1e-40, 0.0, 1e-45, 1e-30, 1.0, 2.0, 3e38,
                           float("inf")])
    keys = order_keys(values)
    assert keys.dtype == torch.int32
    assert bool((keys[1:] > keys[:-1]).all())
    # non-negative scores are their own bits
    assert torch.equal(keys[4:], values[4:].view(torch.int32))


def make_group(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(5, 3), (1,), (40,), (7, 2)]
    params = [(torch.randint(-2, 3, s, generator=gen) * 0.5).to(dtype) for s in sizes]
    grads = [(torch.randint(0, 3, s, generator=gen) * 0.25).to(dtype) for s in sizes]
    grads[1] = None
    return params, grads


@pytest.mark.parametrize("score", ["gallop", "gradient", "magnitude", "random"])
@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_matches_reference(dtype, score, chunk) -> None:
    for seed in range(3):
        params, grads = make_group(seed, dtype)
        total = sum(p.numel() for p in params)
        for k in (1, 5, total // 3, total - 1, total):
            want = reference.select_topk(
                [reference.compute_score(p, g, score, 1e-8, 0, off) for p, g, off in
                 zip(params, grads, [0, 15, 16, 56])], k)
            got = streaming_select(params, grads, k, score, chunk=chunk)
            assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_callable_with_negative_scores_and_signed_zeros() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randint(-3, 4, (13,), generator=gen).float(), torch.zeros(4)]
    grads = [None, None]

    def score(p, g):
        s = p.clone()
        if p.numel() == 4:
            s[:2] = -0.0
        return s

    for k in range(1, 18):
        want = reference.select_topk([reference.compute_score(p, None, score) for p in params], k)
        got = streaming_select(params, grads, k, score, chunk=3)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_non_finite_names_the_parameter() -> None:
    g = torch.ones(6)
    g[4] = float("nan")
    with pytest.raises(ValueError, match="mlp.up"):
        streaming_select([torch.ones(6)], [g], 2, names=["mlp.up"])
