"""Triton selection (score + radix select + compaction) against the oracle, ops/select/naive.py.

Runs on the CPU in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
small; the launcher's BLOCK (entries per tile) is shrunk so that even these shapes span many
tiles and several tiles per program of the persistent grid, with tensors that are not multiples
of it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gallop_kernels import rules  # noqa: E402
from gallop_kernels.ops.select import (
    bucket,  # noqa: E402
    naive,  # noqa: E402
)
from gallop_kernels.ops.select import launcher as S  # noqa: E402
from gallop_kernels.ops.select.launcher import select as triton_select  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    """Small chunks (many programs per tensor) and poisoned output/count buffers."""
    monkeypatch.setattr(S, "INTERPRETER_BLOCK", 64)
    # torch fills every torch.empty with NaN / the largest integer in deterministic mode: a
    # kernel that leaves part of an output or count buffer unwritten shows up as garbage.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference_select(params, grads, k, score, score_eps=1e-8, seed=0, precomputed=None):
    if score == "precomputed":
        scores = [s.reshape(-1) + 0.0 for s in precomputed]
    else:
        scores, off = [], 0
        for p, g in zip(params, grads):
            scores.append(naive.compute_score(p, g, score, score_eps, seed, off))
            off += p.numel()
    return naive.select_topk(scores, k)


def check(params, grads, k, score, **kw):
    out = triton_select(params, grads, k, score, **kw)
    ref = reference_select(
        params, grads, k, score, kw.get("score_eps", 1e-8), kw.get("seed", 0), kw.get("precomputed")
    )
    assert len(out) == len(params)
    for i, (o, r, p) in enumerate(zip(out, ref, params)):
        assert o.dtype == rules.index_dtype(p.numel()), (i, o.dtype)
        assert o.device == p.device
        assert torch.equal(o.cpu().long(), r.cpu()), f"tensor {i}: {o} != {r}"
    assert sum(o.numel() for o in out) == k
    return out


def _group(sizes, pdtypes, gdtypes, levels=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dev = _device()
    params, grads = [], []
    for j, n in enumerate(sizes):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-3
        if levels is not None:  # a few distinct values: many exact ties
            p = torch.tensor(levels)[torch.randint(len(levels), (n,), generator=gen)]
            g = torch.tensor(levels)[torch.randint(len(levels), (n,), generator=gen)]
        params.append(p.to(pdtypes[j % len(pdtypes)]).to(dev))
        gd = gdtypes[j % len(gdtypes)]
        grads.append(None if gd is None else g.to(gd).to(dev))
    return params, grads


SIZES = [300, 33, 1, 129, 128]  # BLOCK = 64: partial tiles, and whole ones


@pytest.mark.parametrize("score", ["gallop", "gradient", "magnitude", "random"])
def test_named_scores_mixed_dtypes(score):
    params, grads = _group(SIZES, DTYPES, [torch.bfloat16, torch.float32, None, torch.float16])
    n = sum(SIZES)
    for k in (1, 97, n - 1):
        check(params, grads, k, score, seed=3)


CAPACITIES = {"no-capture": lambda total, k: 0, "bucket-only": lambda total, k: max(k // 2, 40),
              "always-capture": lambda total, k: 10**9}


@pytest.mark.parametrize("capacity", list(CAPACITIES))
@pytest.mark.parametrize("score", ["gallop", "magnitude", "precomputed"])
def test_candidate_capture_modes(monkeypatch, capacity, score):
    """The candidate buffer (everything at/above the bucket, or the bucket only, re-read
    instead of θ, g) and the full re-read path select the same, with ties; and the capture
    really happens when allowed."""
    monkeypatch.setattr(S, "candidate_capacity", CAPACITIES[capacity])
    levels = [0.0, 0.5, -0.5, 2.0, 1e-9, -3.0, 7.0]
    params, grads = _group(SIZES, [torch.float32, torch.float16], [torch.bfloat16],
                           levels=levels, seed=8)
    gen = torch.Generator().manual_seed(9)
    pre = [torch.randn(p.numel(), generator=gen).to(p.device) for p in params]
    pre[0][:100] = 0.75  # a large tie
    kw = dict(precomputed=pre) if score == "precomputed" else {}
    n = sum(SIZES)
    for k in (1, 120, n - 3):
        check(params, grads, k, score, **kw)
    rnd = [torch.randn(p.numel(), generator=gen).to(p.device) for p in params]
    plan = S.SelectionPlan(params, [None] * len(params), "precomputed", 1e-8, 0, rnd, params[0].device)
    state, hist = plan.new_state(200)
    for level in range(3):
        plan.histogram_pass(level, state, hist[level])
        plan.choose_bucket(level, hist[level], state)
    captured = int(state[bucket.S_CAPTURE.value])
    want = {"no-capture": bucket.CAPTURE_NONE, "bucket-only": bucket.CAPTURED_EQ,
            "always-capture": bucket.CAPTURED_GE}[capacity]
    assert captured == want.value
    check(params, [None] * len(params), 200, "precomputed", precomputed=rnd)


@pytest.mark.parametrize("pdtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gdtype", DTYPES, ids=["g32", "gbf16", "g16"])
def test_every_dtype_pair(pdtype, gdtype):
    params, grads = _group([200, 77], [pdtype], [gdtype], seed=1)
    check(params, grads, 60, "gallop")


@pytest.mark.parametrize("score", ["gallop", "gradient", "magnitude"])
def test_exact_ties_from_few_levels(score):
    levels = [0.0, -0.0, 0.5, -0.5, 2.0, 1e-9, -3.0]
    params, grads = _group(SIZES, [torch.float32, torch.bfloat16], [torch.float16, torch.float32],
                           levels=levels, seed=2)
    n = sum(SIZES)
    for k in (5, 300, n):
        check(params, grads, k, score)


def test_tiny_weights_and_subnormal_bf16():
    """|θ| near ε (where float32 vs double rounding of |θ|+ε would differ) and subnormals."""
    gen = torch.Generator().manual_seed(4)
    dev = _device()
    theta = (torch.rand(300, generator=gen) * 3e-8) * torch.sign(torch.randn(300, generator=gen))
    theta[:50] = torch.tensor(1e-39)  # float32 subnormal (also bf16 subnormal)
    theta[50:60] = 0.0
    g = torch.randn(300, generator=gen)
    g[100:150] = 1e-40
    for pd in DTYPES:
        params = [theta.to(pd).to(dev), theta[:77].to(pd).to(dev)]
        grads = [g.to(torch.bfloat16).to(dev), g[:77].to(dev)]
        for score in ("gallop", "magnitude", "gradient"):
            check(params, grads, 201, score)


def test_all_equal_scores_hot_bin():
    dev = _device()
    params = [torch.full((n,), 0.25, device=dev) for n in (400, 3, 211)]
    grads = [torch.full((n,), 0.5, device=dev, dtype=torch.bfloat16) for n in (400, 3, 211)]
    n = 614
    for k in (1, 401, 613, n):
        out = check(params, grads, k, "gallop")
        # ties -> lowest flat indices: exactly the first k entries of the concatenation
        flat = torch.cat([o.cpu().long() + off for o, off in zip(out, (0, 400, 403))])
        assert torch.equal(flat, torch.arange(k))


def test_all_zero_gradients():
    params, _ = _group(SIZES, DTYPES, [None])
    n = sum(SIZES)
    zeros = [torch.zeros_like(p) for p in params]
    for grads in (zeros, [None] * len(params)):
        for score in ("gallop", "gradient"):
            for k in (123, n):
                check(params, grads, k, score)


def test_many_one_element_tensors():
    gen = torch.Generator().manual_seed(5)
    dev = _device()
    params = [torch.randn(1, generator=gen).to(DTYPES[i % 3]).to(dev) for i in range(40)]
    params.insert(21, torch.randn(150, generator=gen).to(dev))  # one larger tensor in between
    grads = [torch.randn(p.shape, generator=gen).to(dev) for p in params]
    grads[3] = None
    n = sum(p.numel() for p in params)
    for k in (1, 35, n):
        check(params, grads, k, "gallop")
    check(params, grads, 50, "random", seed=11)


def test_empty_tensor_in_group():
    params, grads = _group([50, 0, 40], [torch.float32], [torch.float32])
    check(params, grads, 30, "gallop")
    check(params, grads, 90, "magnitude")


def test_all_empty_group():
    dev = _device()
    out = triton_select([torch.empty(0, device=dev), torch.empty(0, 3, device=dev)], [None, None],
                        0, "gallop")
    assert [o.numel() for o in out] == [0, 0] and all(o.dtype == torch.int32 for o in out)


def test_single_tensor_larger(monkeypatch):
    monkeypatch.setattr(S, "INTERPRETER_BLOCK", 256)  # fewer, larger programs: the interpreter is slow
    params, grads = _group([5000], [torch.bfloat16], [torch.bfloat16], seed=6)
    for k in (1, 2500, 5000):
        check(params, grads, k, "gallop")


@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, -1])
def test_random_score_seeds(seed):
    params, grads = _group([300, 129], [torch.float16], [None])
    check(params, grads, 100, "random", seed=seed)


def test_precomputed_negative_and_signed_zero():
    gen = torch.Generator().manual_seed(7)
    dev = _device()
    sizes = [333, 1, 250]
    params = [torch.randn(n, generator=gen).to(dev) for n in sizes]
    levels = torch.tensor([-0.0, 0.0, -1.5, 1.5, -1e-30, 1e-30, -3.4e38, 3.4e38, -1e-45, 1e-45])
    pre = []
    for n in sizes:
        s = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 20)
        s[: n // 2] = levels[torch.randint(len(levels), (n // 2,), generator=gen)]
        pre.append(s.to(dev))
    n = sum(sizes)
    for k in (1, 290, 400, n):
        check(params, [None] * 3, k, "precomputed", precomputed=pre)
    # only signed zeros: -0.0 and +0.0 are the same score, so ties go by index
    zeros = [torch.where(torch.rand(m, generator=gen) < 0.5, -0.0, 0.0).to(dev) for m in sizes]
    out = check(params, [None] * 3, 300, "precomputed", precomputed=zeros)
    assert torch.equal(out[0].cpu().long(), torch.arange(300))


def test_precomputed_all_negative():
    dev = _device()
    params = [torch.zeros(200, device=dev)]
    pre = [-torch.arange(200, dtype=torch.float32, device=dev).flip(0) - 1.0]
    out = check(params, [None], 7, "precomputed", precomputed=pre)
    assert torch.equal(out[0].cpu().long(), torch.arange(193, 200))


def test_int64_output_path(monkeypatch):
    """Tensors at or above the int64 threshold get int64 indices (threshold lowered to test it)."""
    monkeypatch.setattr(rules, "INT32_LIMIT", 300)
    params, grads = _group([400, 100, 350], DTYPES, [torch.float32])
    out = triton_select(params, grads, 250, "gallop")
    ref = reference_select(params, grads, 250, "gallop")
    assert [o.dtype for o in out] == [torch.int64, torch.int32, torch.int64]
    for o, r in zip(out, ref):
        assert torch.equal(o.cpu().long(), r)


def test_matches_reference_select_end_to_end():
    params, grads = _group(SIZES, DTYPES, [torch.float32, torch.bfloat16])
    names = [f"layer{i}.weight" for i in range(len(params))]
    n = sum(SIZES)
    for density in (0.001, 0.3, 1.0):
        k = rules.k_for_density(n, density)
        out = triton_select(params, grads, k, "gallop", names=names)
        ref = naive.select(params, grads, density, "gallop", names=names)
        for o, r in zip(out, ref):
            assert torch.equal(o.cpu().long(), r.cpu())


@pytest.mark.parametrize("score,where,value", [
    ("gallop", "grad", float("nan")),
    ("gallop", "grad", float("inf")),
    ("gallop", "param", float("nan")),
    ("gradient", "grad", float("-inf")),
    ("magnitude", "param", float("nan")),
    ("precomputed", "pre", float("nan")),
    ("precomputed", "pre", float("-inf")),
])
def test_nan_inf_raises_with_name(score, where, value):
    params, grads = _group([100, 80, 60], DTYPES, [torch.float32])
    pre = [torch.randn(p.numel(), device=p.device) for p in params]
    target = {"grad": grads, "param": params, "pre": pre}[where][1]
    target.view(-1)[17] = value
    names = ["a.weight", "b.weight", "c.bias"]
    with pytest.raises(ValueError, match=r"b\.weight"):
        triton_select(params, grads, 20, score, names=names, precomputed=pre)
    with pytest.raises(ValueError):  # the reference agrees that this is bad input
        if score == "precomputed":
            naive.check_finite(pre[1], "b.weight")
        else:
            naive.select(params, grads, 0.1, score, names=names)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflowing_score_raises():
    """A finite θ, g whose gallop score overflows float32 is infinite: bad input, as in reference."""
    dev = _device()
    params = [torch.zeros(10, device=dev)]
    grads = [torch.full((10,), 3e38, device=dev)]
    with pytest.raises(ValueError, match="w0"):
        triton_select(params, grads, 2, "gallop", names=["w0"])


def test_bad_values_ignored_when_score_does_not_read_them():
    params, grads = _group([100, 50], [torch.float32], [torch.float32])
    grads[0][3] = float("nan")
    check(params, grads, 10, "magnitude")  # magnitude ignores g
    check(params, grads, 10, "random")
    params[1][4] = float("inf")  # gallop: |g| / inf = 0, finite
    grads[0][3] = 1.0
    check(params, grads, 10, "gallop")


def test_input_validation():
    dev = _device()
    p = torch.randn(10, device=dev)
    g = torch.randn(10, device=dev)
    with pytest.raises(ValueError, match="unknown score"):
        triton_select([p], [g], 1, "bogus")
    with pytest.raises(ValueError, match="k="):
        triton_select([p], [g], 0, "gallop")
    with pytest.raises(ValueError, match="k="):
        triton_select([p], [g], 11, "gallop")
    with pytest.raises(TypeError):
        triton_select([p.double()], [g], 1, "gallop")
    with pytest.raises(TypeError):
        triton_select([p], [g.to(torch.int32)], 1, "gallop")
    with pytest.raises(ValueError, match="contiguous"):
        triton_select([torch.randn(4, 5, device=dev).t()], [None], 1, "gallop")
    with pytest.raises(ValueError, match="shape"):
        triton_select([p], [torch.randn(11, device=dev)], 1, "gallop")
    with pytest.raises(ValueError, match="precomputed"):
        triton_select([p], [g], 1, "precomputed")
    with pytest.raises(TypeError):
        triton_select([p], [g], 1, "precomputed", precomputed=[torch.randn(10, dtype=torch.float64)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("score", ["gallop", "random", "gradient"])
def test_gpu_large_group_default_blocks(monkeypatch, score):
    """Millions of entries with the launcher's GPU block sizes (skipped without CUDA)."""
    params, grads = _group([3_000_000, 1_000_001, 17], [torch.bfloat16, torch.float16],
                           [torch.bfloat16, torch.float32], seed=10)
    params[1][:500_000] = 0.5  # a large block of exact ties
    grads[1][:500_000] = 0.25
    n = sum(p.numel() for p in params)
    for density in (0.01, 0.3):
        check(params, grads, rules.k_for_density(n, density), score, seed=1)


class _RecordingCollective:
    """A stand-in for ``world_size`` ranks in one process: sums and gathers as if every rank
    held this rank's tensor, and records the sequence of collectives issued."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank, self.calls = world_size, rank, []

    def all_reduce_sum_(self, tensor):
        self.calls.append(("all_reduce", tuple(tensor.shape), tensor.dtype))
        tensor.mul_(self.world_size)

    def all_gather(self, tensor):
        self.calls.append(("all_gather", tuple(tensor.shape), tensor.dtype))
        return torch.stack([tensor] * self.world_size)


def test_one_rank_layout_is_the_single_process_selection():
    from gallop_kernels.ops.collective import ShardLayout

    params, grads = _group(SIZES, DTYPES, [torch.bfloat16, None])
    offsets = tuple(sum(SIZES[:i]) for i in range(len(SIZES)))
    for score, k in (("gallop", 1), ("gallop", sum(SIZES)), ("random", 97)):
        coll = _RecordingCollective(1, 0)
        layout = ShardLayout(coll, sum(SIZES), offsets)
        with_layout = triton_select(params, grads, k, score, seed=5, layout=layout)
        without = triton_select(params, grads, k, score, seed=5)
        for a, b in zip(with_layout, without):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert [c[0] for c in coll.calls][:2] == ["all_gather", "all_reduce"]


def test_same_collectives_whatever_the_local_data():
    """A rank with data and a rank whose shards are all empty issue the same collectives, in
    the same order, with the same shapes (else a real process group would hang)."""
    from gallop_kernels.ops.collective import ShardLayout

    params, grads = _group([90, 7, 40], [torch.float32], [torch.bfloat16])
    empty = [p[:0] for p in params]
    total = 2 * sum(p.numel() for p in params)
    sequences = []
    for rank, (ps, gs) in enumerate([(params, grads), (empty, [g[:0] for g in grads])]):
        coll = _RecordingCollective(2, rank)
        layout = ShardLayout(coll, total, (0, 90, 97))
        triton_select(ps, gs, 20, "gallop", layout=layout)
        sequences.append(coll.calls)
    assert sequences[0] == sequences[1] and len(sequences[0]) >= 4
