"""The sampled shape of the Triton selection against the naive oracle (`ops/select/launcher.py`).

Where ``tl.histogram`` costs instructions in proportion to its bins (triton 3.6 and 3.7 lower it
through warp ballots), each radix level first histograms a sample of the tiles, captures (or only
counts) the range of prefixes that estimate points at in one full pass, and checks the guess with
that pass's exact counts; a wrong guess falls back to the level's exact histogram. Runs in the
interpreter with tiny tiles and a dense sample, so the sample is small and every outcome of the
check (capture kept, one digit committed, miss) happens on these groups.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from gallop_kernels.ops.select import bucket as B  # noqa: E402
from gallop_kernels.ops.select import launcher as S  # noqa: E402
from gallop_kernels.ops.select import naive  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def sampled_shape(monkeypatch):
    monkeypatch.setattr(S, "SHAPE", "sampled")
    monkeypatch.setattr(S, "SAMPLE_MIN_TILES", 1)
    monkeypatch.setattr(S, "INTERPRETER_BLOCK", 32)


@pytest.fixture
def outcomes(monkeypatch):
    """Counts the window checks' outcomes (kept, committed, missed) of every selection."""
    seen = {"kept": 0, "committed": 0, "missed": 0}
    run_steps = S.SelectionPlan.histogram_pass

    def traced(self, level, state, hist_out, reduce=None):
        run_steps(self, level, state, hist_out, reduce)
        capture = int(state[B.S_CAPTURE.value])
        if int(self.wcount[level, B.W_IN.value]) + int(self.wcount[level, B.W_GT.value]) == 0:
            return  # no window pass ran at this level (or it found nothing)
        if int(state[B.S_MISS.value]):
            seen["missed"] += 1
        elif int(state[B.S_SKIP.value]):
            seen["committed"] += 1
        elif capture in (B.CAPTURED_EQ.value, B.CAPTURED_GE.value):
            seen["kept"] += 1

    monkeypatch.setattr(S.SelectionPlan, "histogram_pass", traced)
    return seen


def reference(params, grads, k, score, seed, precomputed):
    if score == "precomputed":
        scores = [s.reshape(-1) + 0.0 for s in precomputed]
    else:
        scores, off = [], 0
        for p, g in zip(params, grads):
            scores.append(naive.compute_score(p, g, score, 1e-8, seed, off))
            off += p.numel()
    return naive.select_topk(scores, k)


def _values(n, kind, gen):
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "heavy":  # (bounded: fp16 holds it)
        return (torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)).clamp(-6e4, 6e4)
    if kind == "levels":  # many exact ties
        return torch.tensor([0.0, 0.5, -0.5, 2.0, 1e-9])[torch.randint(5, (n,), generator=gen)]
    if kind == "sorted":  # grows along the group: a sample of tiles is a poor guess
        return torch.sort(torch.randn(n, generator=gen).abs()).values
    if kind == "equal":
        return torch.full((n,), 0.25)
    return torch.zeros(n)


def test_random_groups_match_the_oracle(monkeypatch, outcomes):
    """Random groups (sizes, dtypes, scores, distributions, k, sample strides): the same index
    sets as the oracle, and every outcome of the window check occurs."""
    rng = random.Random(20)
    for case in range(24):
        monkeypatch.setattr(S, "SAMPLE_STRIDE", rng.choice([2, 3, 5]))
        gen = torch.Generator().manual_seed(case)
        sizes = [rng.choice([1, 17, 64, 100, 300, 700]) for _ in range(rng.randint(1, 3))]
        kind_t = rng.choice(["normal", "heavy", "levels", "sorted", "equal"])
        kind_g = rng.choice(["normal", "heavy", "levels", "sorted", "zeros"])
        params = [_values(n, kind_t, gen).to(rng.choice(DTYPES)) for n in sizes]
        grads = [(_values(n, kind_g, gen) * 1e-3).to(rng.choice(DTYPES)) for n in sizes]
        score = rng.choice(["gallop", "gallop", "gradient", "magnitude", "random", "precomputed"])
        pre = [_values(n, kind_g, gen) for n in sizes] if score == "precomputed" else None
        n = sum(sizes)
        k = rng.choice([1, max(1, n // 100), max(1, n // 10), max(1, n // 2), max(1, n - 1), n])
        got = S.select(params, grads, k, score, seed=case, precomputed=pre)
        want = reference(params, grads, k, score, case, pre)
        for t, (o, w) in enumerate(zip(got, want)):
            assert torch.equal(o.long(), w), (case, t, sizes, kind_t, kind_g, score, k)
    if S.interpreter_enabled():  # (tiles of 32 entries: every group spans many)
        assert all(outcomes.values()), outcomes


@pytest.mark.parametrize("where", ["top", "middle"])
def test_nan_raises_whatever_the_window(where):
    """A NaN score is found by the level-0 window pass whichever range it captures."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(500, generator=gen), torch.randn(300, generator=gen)]
    grads = [torch.randn(500, generator=gen), torch.randn(300, generator=gen)]
    grads[1][17] = float("nan")
    k = 5 if where == "top" else 400  # a small k captures the top; a large one a middle range
    with pytest.raises(ValueError, match="#1"):
        S.select(params, grads, k, "gallop")


def test_a_full_sample_chooses_what_the_radix_shape_chooses():
    """With every tile sampled the estimate is exact: the window check never misses, and the
    capture the selection ends with is the radix shape's."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(n, generator=gen) for n in (300, 33, 129)]
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (300, 33, 129)]
    for capacity in (lambda total, k: 0, lambda total, k: max(k // 2, 40), lambda total, k: 10**9):
        S.candidate_capacity, saved = capacity, S.candidate_capacity
        try:
            final = {}
            for shape in S.SHAPES:
                plan = S.SelectionPlan(params, grads, "gallop", 1e-8, 0, None, params[0].device,
                                       shape=shape)
                plan.stride = 1
                state, hist = plan.new_state(200)
                for level in range(len(plan.digits)):
                    plan.histogram_pass(level, state, hist[level])
                    assert int(state[B.S_MISS.value]) == 0
                    plan.choose_bucket(level, hist[level], state)
                final[shape] = [int(state[f.value]) for f in (B.S_PREFIX, B.S_MASK, B.S_KREM,
                                                             B.S_CAPTURE)]
            assert final["sampled"] == final["radix"]
        finally:
            S.candidate_capacity = saved


def test_shape_names():
    assert S.resolve_shape("radix") == "radix" and S.resolve_shape("sampled") == "sampled"
    with pytest.raises(ValueError, match="unknown selection shape"):
        S.resolve_shape("fast")
