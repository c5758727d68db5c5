"""The chunked pure-torch radix select picks exactly the reference's index set."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import rules
from gallop_kernels.ops.select import naive as select_naive
from gallop_kernels.ops.select import streaming
from gallop_kernels.ops.select.streaming import order_keys


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
@pytest.mark.parametrize("chunk,keep_keys", [(5, 0), (5, 1 << 20), (1 << 20, 0)])
def test_matches_reference(dtype, score, chunk, keep_keys) -> None:
    for seed in range(3):
        params, grads = make_group(seed, dtype)
        total = sum(p.numel() for p in params)
        for k in (1, 5, total // 3, total - 1, total):
            want = select_naive.select_topk(
                [select_naive.compute_score(p, g, score, 1e-8, 0, off) for p, g, off in
                 zip(params, grads, [0, 15, 16, 56])], k)
            got = streaming.select(params, grads, k, score, chunk=chunk, keep_keys=keep_keys)
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
        want = select_naive.select_topk([select_naive.compute_score(p, None, score) for p in params], k)
        got = streaming.select(params, grads, k, score, chunk=3)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_non_finite_names_the_parameter() -> None:
    g = torch.ones(6)
    g[4] = float("nan")
    with pytest.raises(ValueError, match="mlp.up"):
        streaming.select([torch.ones(6)], [g], 2, names=["mlp.up"])


@pytest.mark.parametrize("score", ["gallop", "random", "callable"])
@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_many_ties_path_matches_reference(monkeypatch, score, chunk) -> None:
    """With no room for candidates, the bucket's low digit is histogrammed in a pass of its own
    and a third pass keeps the ties still needed: the same index set."""
    from gallop_kernels.ops.select import streaming as ss

    monkeypatch.setattr(ss, "MAX_CANDIDATES", 0)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randint(-2, 3, s, generator=gen).float() * 0.5 for s in [(9, 4), (5,), (30,)]]
    grads = [torch.randint(-1, 2, p.shape, generator=gen).float() for p in params]
    fn = (lambda p, g: g * p) if score == "callable" else score
    total = sum(p.numel() for p in params)
    offsets = [0, 36, 41]
    want_scores = [select_naive.compute_score(p, g, fn, 1e-8, 0, o)
                   for p, g, o in zip(params, grads, offsets)]
    for k in (1, 2, 17, total // 2, total - 1, total):
        want = select_naive.select_topk(want_scores, k)
        got = ss.select(params, grads, k, fn, chunk=chunk, keep_keys=0)
        assert [g.tolist() for g in got] == [w.tolist() for w in want], k


def test_all_scores_tied_and_empty_tensors() -> None:
    params = [torch.ones(0), torch.ones(6, 2), torch.ones(0, 3), torch.ones(5)]
    grads = [None, torch.ones(6, 2), None, torch.ones(5)]
    for k in (1, 7, 17):
        got = streaming.select(params, grads, k, "gallop", chunk=4)
        flat = torch.arange(17)[:k]
        assert [g.tolist() for g in got] == [[], flat[flat < 12].tolist(), [],
                                              (flat[flat >= 12] - 12).tolist()]


class _OneRank:
    """A collective of one rank: the sharded code path without other processes."""

    world_size, rank = 1, 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        self.calls.append("all_reduce")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_gather")
        return tensor.unsqueeze(0)


@pytest.mark.parametrize("score", ["gallop", "random"])
def test_one_rank_layout_equals_no_layout(score) -> None:
    from gallop_kernels.ops.collective import ShardLayout

    params, grads = make_group(5, torch.float32)
    total = sum(p.numel() for p in params)
    layout = ShardLayout(_OneRank(), total, (0, 15, 16, 56))
    for k in (1, 9, total):
        want = streaming.select(params, grads, k, score)
        got = streaming.select(params, grads, k, score, layout=layout)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]


@pytest.mark.parametrize("score", ["random", "gallop"])
def test_layout_offsets_order_hashes_and_ties(score) -> None:
    """Local tensors listed out of global order: the random score hashes, and ties follow, the
    layout's offsets, not the local order."""
    from gallop_kernels.ops.collective import ShardLayout

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 3, (30,), generator=gen).float(), torch.randint(1, 3, (45,), generator=gen).float()
    ga, gb = torch.ones(30), torch.ones(45)
    for k in (1, 20, 75):
        want_a, want_b = streaming.select([a, b], [ga, gb], k, score, seed=3)
        got_b, got_a = streaming.select([b, a], [gb, ga], k, score, seed=3,
                                        layout=ShardLayout(_OneRank(), 75, (30, 0)))
        assert got_a.tolist() == want_a.tolist() and got_b.tolist() == want_b.tolist()


def test_sharded_collectives_are_issued_in_a_fixed_order() -> None:
    """Every rank must issue the same collectives whatever its data: check, reduce, reduce, gather."""
    from gallop_kernels.ops.collective import ShardLayout

    seen = []
    for params, grads in ([[torch.ones(8)], [torch.ones(8)]], [[torch.randn(8)], [torch.randn(8)]],
                          [[torch.zeros(8)], [None]]):
        one = _OneRank()
        streaming.select(params, grads, 3, "gallop", layout=ShardLayout(one, 8, (0,)))
        seen.append(one.calls)
    # check, pass A, one per remaining digit (23 bits below an 8-bit top digit: 3), tie quota
    assert seen[0] == ["all_gather"] + ["all_reduce"] * 4 + ["all_gather"]
    assert seen[1] == seen[0] and seen[2] == seen[0]


def test_layout_validation() -> None:
    from gallop_kernels.ops.collective import ShardLayout

    with pytest.raises(ValueError, match="offsets"):
        streaming.select([torch.ones(4)], [None], 1, layout=ShardLayout(_OneRank(), 4, (0, 4)))
    with pytest.raises(ValueError, match="outside"):
        streaming.select([torch.ones(4)], [None], 1, layout=ShardLayout(_OneRank(), 4, (2,)))
    with pytest.raises(ValueError, match="non-negative"):
        ShardLayout(_OneRank(), 4, (-1,))
    with pytest.raises(TypeError, match="total"):
        ShardLayout(_OneRank(), 4.0, (0,))
    assert ShardLayout(_OneRank(), torch.tensor(4).item(), [0]).offsets == (0,)
    with pytest.raises(TypeError, match="layout"):
        streaming.select([torch.ones(4)], [None], 1, layout=(0,))


@pytest.mark.parametrize("small_group,keep_keys,walks", [(0, 0, 3), (0, 1 << 20, 2), (1 << 16, 0, 2)])
def test_lazy_params_are_walked_once_per_pass(monkeypatch, small_group, keep_keys, walks) -> None:
    """Callers may pass a sequence that builds each tensor when iterated (4-bit bases): sizes
    and devices take one walk, then one walk per read of θ and g (two for a typical group; one
    when the group's keys are kept between reads, or when a small group skips the radix passes)."""
    monkeypatch.setattr(streaming, "SMALL_GROUP", small_group)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, generator=gen), torch.randn(70, generator=gen)]
    grads = [torch.randn(50, generator=gen), torch.randn(70, generator=gen)]

    class Lazy:
        walks = 0

        def __len__(self):
            return len(tensors)

        def __iter__(self):
            Lazy.walks += 1
            return iter([t.clone() for t in tensors])

    got = streaming.select(Lazy(), grads, 12, "gallop", chunk=16, keep_keys=keep_keys)
    want = select_naive.select_topk([select_naive.compute_score(p, g) for p, g in zip(tensors, grads)], 12)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert Lazy.walks == walks


def test_nan_count_is_summed_per_parameter() -> None:
    g = torch.ones(10)
    g[[1, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"mlp.down has 2 NaN"):
        streaming.select([torch.ones(3), torch.ones(10)], [None, g], 2, names=["a", "mlp.down"],
                         chunk=4)


@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_extreme_scores_at_both_ends_of_the_key_range(chunk) -> None:
    """Scores near ±float max and subnormals land in the first and last buckets of the digits."""
    values = torch.tensor([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 3.3e38, -3.3e38, 3.4e38, 1.0, -1.0])
    for k in range(1, values.numel() + 1):
        want = select_naive.select_topk([select_naive.compute_score(values, None, lambda p, g: p)], k)
        got = streaming.select([values], [None], k, lambda p, g: p, chunk=chunk)
        assert got[0].tolist() == want[0].tolist(), k


@pytest.mark.parametrize("max_candidates,chunk", [(0, 1 << 10), (1 << 24, 1 << 16)])
def test_large_group_uses_the_wide_top_digit(monkeypatch, max_candidates, chunk) -> None:
    """At 2^20 entries the top digit is 16 bits; with no room for candidates the rest is found
    by reads of its own. bf16 inputs: many exact ties, as in real models."""
    from gallop_kernels.ops.select import streaming as ss

    monkeypatch.setattr(ss, "MAX_CANDIDATES", max_candidates)
    gen = torch.Generator().manual_seed(7)
    sizes = [(1 << 20) - 5, 9]
    params = [(torch.randn(n, generator=gen) * 0.02).bfloat16() for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 1e-3).bfloat16() for n in sizes]
    want = select_naive.select(params, grads, 0.2)
    k = rules.k_for_density(sum(sizes), 0.2)
    got = ss.select(params, grads, k, "gallop", chunk=chunk, keep_keys=0)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("keep_keys", [0, 1 << 20])
def test_every_kind_of_non_finite_score_raises(keep_keys) -> None:
    """+inf, -inf, NaN of either sign (inf/inf gives the CPU's negative default NaN)."""
    inf = float("inf")
    cases = [
        ("gallop", [torch.full((3,), inf)], [torch.full((3,), inf)]),  # inf / inf = NaN
        ("gradient", [torch.ones(3)], [torch.tensor([1.0, -inf, 2.0])]),  # |g| = +inf
        (lambda p, g: p, [torch.tensor([1.0, -inf, 0.0])], [None]),
        (lambda p, g: p, [torch.tensor([1.0, -float("nan"), 0.0])], [None]),
        (lambda p, g: p, [torch.tensor([1.0, float("nan"), 0.0])], [None]),
    ]
    for score, params, grads in cases:
        with pytest.raises(ValueError, match=r"w0 has 1 NaN|w0 has 3 NaN"):
            streaming.select(params, grads, 1, score, names=["w0"], keep_keys=keep_keys)
