"""The oracles (ops/select/naive.py, ops/adamw/naive.py) against the definitions of the
selection semantics and the sparse update, written out independently here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gallop_kernels import rules
from gallop_kernels.ops.adamw import naive as adamw_naive
from gallop_kernels.ops.adamw.hyper import AdamWHyper
from gallop_kernels.ops.select import naive as select_naive

# ---------------------------------------------------------------------------------------------
# An independent oracle: plain Python, no torch sorting.
# ---------------------------------------------------------------------------------------------


def brute_force_select(scores: list[list[float]], k: int) -> list[list[int]]:
    flat = [(s, t, i) for t, tensor in enumerate(scores) for i, s in enumerate(tensor)]
    # Flat index order is (tensor, position); the key sorts by score descending, then that order.
    order = sorted(range(len(flat)), key=lambda j: (-flat[j][0], j))[:k]
    out: list[list[int]] = [[] for _ in scores]
    for j in order:
        out[flat[j][1]].append(flat[j][2])
    return [sorted(x) for x in out]


def lowbias32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hash_uniform_py(index: int, seed: int) -> float:
    high = lowbias32_py(((index >> 32) + lowbias32_py(seed & 0xFFFFFFFF)) & 0xFFFFFFFF)
    return (lowbias32_py((index & 0xFFFFFFFF) ^ high) >> 8) * 2.0**-24


# ---------------------------------------------------------------------------------------------
# k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numel, density, expected",
    [(10, 0.25, 3), (10, 0.24, 2), (3, 0.5, 2), (1, 0.01, 1), (1000, 1e-9, 1), (7, 1.0, 7),
     (200, 0.0125, 3), (0, 0.5, 0)],
)
def test_k_for_density(numel: int, density: float, expected: int) -> None:
    assert rules.k_for_density(numel, density) == expected


def test_index_dtype() -> None:
    assert rules.index_dtype(2**31 - 1) == torch.int32
    assert rules.index_dtype(2**31) == torch.int64


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def test_scores_match_definitions(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    theta = torch.randn(5, 7).to(dtype)
    theta[0, :3] = 0
    grad = torch.randn(5, 7).to(dtype)
    grad[1] = 0
    t, g = theta.float().flatten(), grad.float().flatten()
    eps = 1e-3
    torch.testing.assert_close(
        select_naive.compute_score(theta, grad, "gallop", eps), g.abs() / (t.abs() + eps),
        rtol=0, atol=0,
    )
    torch.testing.assert_close(
        select_naive.compute_score(theta, grad, "gradient", eps), g.abs(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        select_naive.compute_score(theta, grad, "magnitude", eps), 1 / (t.abs() + eps), rtol=0, atol=0
    )
    assert select_naive.compute_score(theta, grad, "gallop").dtype == torch.float32


def test_missing_gradient_scores_zero() -> None:
    theta = torch.randn(4)
    assert torch.equal(select_naive.compute_score(theta, None, "gallop"), torch.zeros(4))
    assert torch.equal(select_naive.compute_score(theta, None, "gradient"), torch.zeros(4))


def test_random_score_is_the_documented_hash() -> None:
    index = [0, 1, 2, 1000, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 7]
    for seed in (0, 1, 12345, -1):
        got = select_naive.hash_uniform(torch.tensor(index), seed)
        want = torch.tensor([hash_uniform_py(i, seed) for i in index], dtype=torch.float32)
        assert torch.equal(got, want)
    u = select_naive.compute_score(torch.zeros(10_000), None, "random", seed=3)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    other = select_naive.compute_score(torch.zeros(10_000), None, "random", seed=4)
    assert not torch.equal(u, other)


def test_random_score_depends_on_group_offset() -> None:
    a = select_naive.compute_score(torch.zeros(6), None, "random", seed=1, offset=0)
    whole = select_naive.compute_score(torch.zeros(10), None, "random", seed=1, offset=0)
    tail = select_naive.compute_score(torch.zeros(4), None, "random", seed=1, offset=6)
    assert torch.equal(torch.cat([a, tail]), whole)


def test_callable_score() -> None:
    theta, grad = torch.randn(3, 4), torch.randn(3, 4)
    s = select_naive.compute_score(theta, grad, lambda p, g: -(g * p))
    assert torch.equal(s, -(grad * theta).flatten() + 0.0)
    with pytest.raises(ValueError, match="shape"):
        select_naive.compute_score(theta, grad, lambda p, g: g.flatten())


def test_negative_zero_equals_zero() -> None:
    s = select_naive.compute_score(torch.zeros(4), None, lambda p, g: torch.tensor([0.0, -0.0, 0.0, -0.0]))
    assert torch.equal(s.view(torch.int32), torch.zeros(4, dtype=torch.int32))


def test_unknown_score() -> None:
    with pytest.raises(ValueError, match="unknown score"):
        select_naive.compute_score(torch.ones(2), torch.ones(2), "largest")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_score_names_the_parameter(bad: float) -> None:
    grad = torch.ones(5)
    grad[3] = bad
    with pytest.raises(ValueError, match="layers.0.weight"):
        select_naive.select([torch.ones(5)], [grad], 0.5, names=["layers.0.weight"])


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def _as_lists(indices: list[torch.Tensor]) -> list[list[int]]:
    return [i.tolist() for i in indices]


@pytest.mark.parametrize("seed", range(5))
def test_select_topk_matches_brute_force_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 17, 3, 64, 1, 9]
    # Four distinct levels: ties everywhere, across tensor boundaries too.
    scores = [torch.randint(0, 4, (n,), generator=gen).float() for n in sizes]
    total = sum(sizes)
    for k in (1, 2, 7, total // 2, total - 1, total):
        got = _as_lists(select_naive.select_topk(scores, k))
        assert got == brute_force_select([s.tolist() for s in scores], k)


def test_all_equal_scores_take_the_first_k() -> None:
    scores = [torch.zeros(5), torch.zeros(3), torch.zeros(4)]
    assert _as_lists(select_naive.select_topk(scores, 7)) == [[0, 1, 2, 3, 4], [0, 1], []]


def test_select_with_all_zero_gradients() -> None:
    params = [torch.randn(4, 4), torch.randn(6)]
    grads = [torch.zeros(4, 4), torch.zeros(6)]
    chosen = select_naive.select(params, grads, density=0.25)
    assert _as_lists(chosen) == [[0, 1, 2, 3, 4, 5], []]  # k = floor(0.25 * 22 + 0.5) = 6


def test_select_gallop_prefers_large_gradient_small_weight() -> None:
    theta = torch.tensor([1.0, 0.01, 1.0, 0.01])
    grad = torch.tensor([1.0, 1.0, 0.01, 0.01])
    (chosen,) = select_naive.select([theta], [grad], density=0.25)
    assert chosen.tolist() == [1]


score_lists = st.lists(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e-30, 3e38]), min_size=1, max_size=12),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(scores=score_lists, data=st.data())
def test_select_topk_properties(scores: list[list[float]], data) -> None:
    total = sum(len(s) for s in scores)
    k = data.draw(st.integers(min_value=1, max_value=total))
    tensors = [torch.tensor(s, dtype=torch.float32) for s in scores]
    chosen = select_naive.select_topk(tensors, k)
    # exactly k, sorted, unique
    assert sum(c.numel() for c in chosen) == k
    for c in chosen:
        assert bool((c[1:] > c[:-1]).all())
    flat = torch.cat(tensors)
    offsets = [0]
    for t in tensors[:-1]:
        offsets.append(offsets[-1] + t.numel())
    selected = torch.zeros(total, dtype=torch.bool)
    for off, c in zip(offsets, chosen):
        selected[c + off] = True
    if k < total:
        # every selected score >= every unselected score
        assert float(flat[selected].min()) >= float(flat[~selected].max())
        # ties at the threshold go to the lower flat index
        threshold = float(flat[selected].min())
        tied = (flat == threshold).nonzero().flatten()
        tied_selected = selected[tied]
        assert bool((tied_selected[1:] <= tied_selected[:-1]).all())
    assert _as_lists(chosen) == brute_force_select(scores, k)


# ---------------------------------------------------------------------------------------------
# Sparse AdamW
# ---------------------------------------------------------------------------------------------


def adamw_python(w, g, m, v, t, lr, b1, b2, eps, wd):
    """One entry of DESIGN §1's update in float64 Python."""
    w = w * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - (lr / (1 - b1**t)) * m / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps)
    return w, m, v


def test_sparse_adamw_step_matches_the_formula() -> None:
    torch.manual_seed(0)
    param = torch.randn(50)
    before = param.clone()
    idx = torch.tensor([0, 3, 4, 17, 49], dtype=torch.int32)
    m, v = torch.zeros(5), torch.zeros(5)
    w64 = param[idx.long()].double().tolist()
    m64, v64 = [0.0] * 5, [0.0] * 5
    hp = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
    for t in range(1, 5):
        grad = torch.randn(50)
        adamw_naive.sparse_adamw_step(param, grad, idx, m, v, None,
                                      AdamWHyper(t, hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["wd"]))
        for j, i in enumerate(idx.tolist()):
            w64[j], m64[j], v64[j] = adamw_python(w64[j], float(grad[i]), m64[j], v64[j], t, **hp)
    torch.testing.assert_close(param[idx.long()].double(), torch.tensor(w64, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), torch.tensor(m64, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(param[untouched], before[untouched])


def test_sparse_adamw_step_bf16_through_master() -> None:
    torch.manual_seed(1)
    param = torch.randn(40).to(torch.bfloat16)
    idx = torch.arange(0, 40, 3, dtype=torch.int32)
    master = param[idx.long()].float()
    m, v = torch.zeros(idx.numel()), torch.zeros(idx.numel())
    for t in range(1, 4):
        grad = torch.randn(40).to(torch.bfloat16)
        adamw_naive.sparse_adamw_step(param, grad, idx, m, v, master,
                                      AdamWHyper(t, 1e-3, 0.9, 0.999, 1e-8, 0.0))
        assert torch.equal(param[idx.long()], master.to(torch.bfloat16))
