"""The benchmark suite: every case of every kernel, beside its baselines, in one place.

Both the pytest-benchmark files (``benchmarks/test_bench_*.py``) and the report
(``benchmarks/collect.py``) take their cases from here, so the two never measure different things.

A *case* is (kernel, implementation, N, dtype, density). It builds its own inputs (random, never
zeros; several independent copies where a copy is smaller than 2× the cache, see
``timing.copies_needed``) and a function that runs the op once on one copy. ``role`` is "ours"
(gallop_kernels: the Triton kernels on CUDA, the torch backend on CPU) or "baseline" (what a user
would pick instead).

Bytes: every case states ``bytes_model``, the memory traffic an ideal implementation of the op
moves (documented per kernel in ``KERNELS``); achieved GB/s = bytes_model / median time, so GB/s
over the measured copy bandwidth is the fraction of the floor reached. Baselines are charged the
same bytes as our op (the work is the same), so their GB/s compare directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from benchmarks import baselines as bl
from benchmarks.timing import copies_needed

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
SECTOR = 32  # bytes per DRAM sector (the unit a gather pays for)
GEN_CHUNK = 2**26  # entries generated at a time
EPS = 1e-8
LR, BETA1, BETA2, ADAM_EPS, WD = 1e-5, 0.9, 0.999, 1e-8, 0.01

KERNELS: dict[str, str] = {
    "score_histogram": (
        "Kernel 1, fused score + histogram (pass 0). Bytes: one read of θ and g, N·(bθ+bg)."),
    "radix_select": (
        "Kernel 2, exact k-th largest score (threshold). Ours recomputes scores in 2 refining passes "
        "after pass 0; baselines take materialised fp32 scores. Bytes: 2 reads of θ and g."),
    "compaction": (
        "Kernel 3, ordered compaction of the k selected indices given the threshold. Ours: count + "
        "write passes over θ, g; baseline: torch.nonzero on materialised scores. Bytes: 2 reads of "
        "θ and g + 4k written."),
    "selection": (
        "Whole selection: θ, g → sorted indices of the exact top-k. Baselines materialise the "
        "fp32 scores first. Bytes: the DESIGN §4 floor, 2 reads of θ and g + 4k written."),
    "sparse_step": (
        "Kernel 4, sparse AdamW step on the k selected entries of one tensor (dense gradient). "
        "Bytes: 4 (int32 index) + 8 (m r/w) + 8 (v r/w) [+ 8 master r/w] per selected entry, plus "
        "the 32-byte sectors the gathers of θ (read + write) and g (read) touch. Dense rows are the alternative a user "
        "would run instead, on the same parameters, charged their own traffic: AdamW p r/w + g + "
        "m, v r/w in the param dtype; AdamW8bit p r/w + g + uint8 m, v r/w."),
    "optimizer_select_step": (
        "SparseAdamW.select() + step() on a multi-tensor model (the selection step). Bytes: "
        "selection floor + sparse step bytes. Baselines: a dense AdamW step on the same params."),
    "optimizer_steady_step": (
        "SparseAdamW.step() after selection (the steady step), multi-tensor. Bytes: as sparse_step, "
        "summed over tensors. Baselines: dense AdamW / AdamW8bit steps on the same params."),
}


# --------------------------------------------------------------------------------------------------
# Traffic models
# --------------------------------------------------------------------------------------------------


def gather_bytes(n: int, elem: int, density: float) -> float:
    """Expected bytes of the 32-byte sectors touched by gathering a uniformly random ``density``
    fraction of an ``n``-entry array of ``elem``-byte entries."""
    per_sector = max(1, SECTOR // elem)
    touched = 1.0 - (1.0 - density) ** per_sector
    return math.ceil(n * elem / SECTOR) * touched * SECTOR


def sparse_step_bytes(n: int, k: int, p_bytes: int, g_bytes: int, master: bool) -> float:
    density = k / n if n else 0.0
    contiguous = k * (4 + 8 + 8 + (8 if master else 0))
    return contiguous + 2 * gather_bytes(n, p_bytes, density) + gather_bytes(n, g_bytes, density)


def dense_adamw_bytes(n: int, p_bytes: int, g_bytes: int, state_bytes: int) -> float:
    """p read + write, g read, m and v read + write (torch keeps m, v in the param dtype)."""
    return n * (2 * p_bytes + g_bytes + 4 * state_bytes)


def selection_floor_bytes(n: int, k: int, t_bytes: int, g_bytes: int) -> float:
    return 2 * n * (t_bytes + g_bytes) + 4 * k


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def make_pair(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-trained-like weights and a gradient: normal, never zero (ties occur as in real bf16).

    Generated on the device in chunks, so N = 4e9 needs no float32 copy of the whole tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for scale in (0.02, 1e-3):
        t = torch.empty(n, dtype=dtype, device=device)
        for start in range(0, n, GEN_CHUNK):
            c = min(GEN_CHUNK, n - start)
            t[start:start + c] = torch.randn(c, generator=gen, device=device) * scale
        out.append(t)
    return out[0], out[1]


def split_sizes(n: int) -> list[int]:
    """A transformer-block-like split of n entries into 7 tensors (attention 4×, MLP 3×)."""
    fracs = [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2]
    sizes = [max(1, int(n * f)) for f in fracs]
    sizes[-1] += n - sum(sizes)
    return sizes


def make_model(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    params = []
    for i, size in enumerate(split_sizes(n)):
        theta, grad = make_pair(size, dtype, device, seed * 100 + i)
        p = torch.nn.Parameter(theta)
        p.grad = grad
        params.append(p)
    return params


def sparse_state(n: int, k: int, device: torch.device, seed: int, master_of: torch.Tensor | None):
    """Sorted random indices of k distinct entries and random fp32 m, v (v > 0) [and master]."""
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    if n <= 2**26:
        idx = torch.randperm(n, generator=gen, device=device)[:k]
    else:  # no N-length permutation: draw with replacement, dedupe, keep k at random
        idx = torch.unique(torch.randint(0, n, (k + k // 8 + 64,), generator=gen, device=device))
        while idx.numel() < k:
            more = torch.randint(0, n, (k,), generator=gen, device=device)
            idx = torch.unique(torch.cat([idx, more]))
        idx = idx[torch.randperm(idx.numel(), generator=gen, device=device)[:k]]
    idx = torch.sort(idx).values
    idx_t = idx.to(torch.int32 if n < 2**31 else torch.int64)
    m = torch.randn(k, generator=gen, device=device) * 1e-4
    v = torch.rand(k, generator=gen, device=device) * 1e-6 + 1e-9
    master = master_of.reshape(-1)[idx].float() if master_of is not None else None
    return idx_t, m, v, master


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    kernel: str
    impl: str
    role: str  # "ours" | "baseline"
    n: int
    dtype: torch.dtype
    density: float
    k: int
    bytes_model: float
    setup: Callable[[int], Any] | None = None  # copy index -> inputs of one call
    fn: Callable[[Any], Any] | None = None
    bytes_per_copy: int = 0
    mem_estimate: int = 0  # device bytes the case needs beyond one input copy (for skipping)
    skip: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.kernel, self.n, str(self.dtype), self.density)

    def describe(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "impl": self.impl,
            "role": self.role,
            "n": self.n,
            "dtype": str(self.dtype).replace("torch.", ""),
            "density": self.density,
            "k": self.k,
            "bytes_model": self.bytes_model,
            "note": self.note,
            **self.extra,
        }


class Env:
    """What a run has: device, backend label, native baselines, bitsandbytes, memory budget."""

    def __init__(self, device: torch.device, try_bnb: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.native, self.native_status = bl.load_native(device)
        if try_bnb:
            self.bnb_cls, self.bnb_status = bl.bnb_status(device)
        else:
            self.bnb_cls, self.bnb_status = None, "not tried in quick mode (its import alone takes seconds)"
        self.ours_label = "gallop_kernels (Triton)" if self.cuda else "gallop_kernels (torch backend)"

    def free_bytes(self) -> int:
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 8 * 2**30

    def copies(self, bytes_per_copy: int) -> int:
        want = copies_needed(bytes_per_copy, self.device)
        budget = self.free_bytes() // 3
        return max(1, min(want, budget // max(1, bytes_per_copy)))


def _pair_setup(env: Env, n: int, dtype: torch.dtype):
    return lambda i: make_pair(n, dtype, env.device, seed=1000 + i)


def _scores_setup(env: Env, n: int, dtype: torch.dtype):
    from gallop_kernels.ops.select import naive as select_naive

    def setup(i):
        theta, grad = make_pair(n, dtype, env.device, seed=1000 + i)
        return select_naive.compute_score(theta, grad, "gallop", EPS)

    return setup


def selection_cases(env: Env, n: int, dtype: torch.dtype, density: float) -> list[Case]:
    from gallop_kernels import rules
    from gallop_kernels.ops.select import naive as select_naive
    from gallop_kernels.ops.select import streaming as ss

    k = rules.k_for_density(n, density)
    b = BYTES[dtype]
    pair_bytes = 2 * n * b
    floor = selection_floor_bytes(n, k, b, b)
    one_pass = n * 2 * b
    cases: list[Case] = []
    common = dict(n=n, dtype=dtype, density=density, k=k)

    def add(kernel, impl, role, bytes_model, setup, fn, bytes_per_copy, mem=0, note="", skip=None):
        cases.append(Case(kernel, impl, role, bytes_model=bytes_model, setup=setup, fn=fn,
                          bytes_per_copy=bytes_per_copy, mem_estimate=mem, note=note, skip=skip,
                          **common))

    # ---- ours -------------------------------------------------------------------------------
    if env.cuda:
        from gallop_kernels.ops.select.launcher import select as triton_select

        add("selection", "Triton select (ops/select/launcher.py)", "ours", floor, _pair_setup(env, n, dtype),
            lambda x: triton_select([x[0]], [x[1]], k, "gallop", score_eps=EPS), pair_bytes,
            mem=4 * k, note="3 histogram passes + count + write (5 reads of θ, g); one host sync")
        from benchmarks.stages import TritonStages

        def stage_setup(i, _n=n):
            theta, grad = make_pair(_n, dtype, env.device, seed=1000 + i)
            st = TritonStages(theta, grad, k, EPS)
            st.run_all()  # leaves the state each stage needs
            return st

        add("score_histogram", "Triton score_histogram_kernel (pass 0)", "ours", one_pass,
            stage_setup, lambda st: st.score_histogram(), pair_bytes)
        add("radix_select", "Triton radix passes 1-2 + choose_bucket", "ours", 2 * one_pass,
            stage_setup, lambda st: st.radix_select(), pair_bytes)
        add("compaction", "Triton count + scan + write", "ours", 2 * one_pass + 4 * k,
            stage_setup, lambda st: st.compaction(), pair_bytes, mem=4 * k)
    else:
        add("selection", "torch backend (select_naive.select: score + stable sort)", "ours", floor,
            _pair_setup(env, n, dtype),
            lambda x: select_naive.select([x[0]], [x[1]], density, "gallop", EPS), pair_bytes,
            mem=24 * n)
        add("selection", "torch backend: streaming radix select (ops/select/streaming.py)", "ours", floor,
            _pair_setup(env, n, dtype),
            lambda x: ss.select([x[0]], [x[1]], k, "gallop", EPS), pair_bytes,
            mem=16 * min(n, ss.DEFAULT_CHUNK))
        for kern in ("score_histogram", "radix_select", "compaction"):
            cases.append(Case(kern, "Triton kernel", "ours", bytes_model=0, skip=(
                "GPU only: on CPU the Triton kernels run in the interpreter, used for correctness "
                "checks, never timed"), **common))

    # ---- baselines: whole selection (what a user writes) ------------------------------------
    def score_of(x):
        return select_naive.compute_score(x[0], x[1], "gallop", EPS)

    add("selection", "torch: score + topk + sort indices", "baseline", floor, _pair_setup(env, n, dtype),
        lambda x: bl.topk_select_indices(score_of(x), k), pair_bytes, mem=4 * n + 12 * k,
        note="ties broken arbitrarily (not the exact rule)" +
             ("; chunked top-k then merge" if n > bl.TORCH_FLAT_LIMIT else ""))
    add("selection", "torch: score + kthvalue + nonzero", "baseline", floor, _pair_setup(env, n, dtype),
        lambda x: bl.threshold_compact(s := score_of(x), bl.kthvalue_threshold(s, k)), pair_bytes,
        mem=16 * n, note="ties: all entries equal to the threshold",
        skip=None if n <= bl.TORCH_FLAT_LIMIT else "torch.kthvalue cannot take this size")
    add("selection", "torch: score + stable sort", "baseline", floor, _pair_setup(env, n, dtype),
        lambda x: torch.sort(torch.sort(score_of(x), descending=True, stable=True).indices[:k]).values,
        pair_bytes, mem=24 * n,
        skip=None if n <= bl.TORCH_FLAT_LIMIT else "torch.sort cannot take this size")
    if env.native is not None:
        nat = env.native
        temp = None

        def native_select(x, _n=n):
            theta, grad, scores, thr = x
            nat.gallop_score(theta, grad, EPS, scores)
            nat.topk_threshold(scores, k, temp, thr)
            return bl.threshold_compact(scores, thr)

        def native_setup(i, _n=n):
            nonlocal temp
            theta, grad = make_pair(_n, dtype, env.device, seed=1000 + i)
            if temp is None:
                temp = nat.threshold_temp(_n, k, env.device)
            return (theta, grad, torch.empty(_n, device=env.device),
                    torch.empty(1, device=env.device))

        add("selection", f"CUDA score + CUB threshold ({nat.topk_method}) + torch.nonzero", "baseline",
            floor, native_setup, native_select, pair_bytes + 4 * n, mem=12 * n)
    elif env.cuda:
        cases.append(Case("selection", "CUDA score + CUB threshold", "baseline", bytes_model=floor,
                          skip=env.native_status, **common))

    # ---- baselines: threshold alone, on materialised scores ---------------------------------
    thr_bytes = 2 * one_pass
    add("radix_select", "torch.topk (values) on fp32 scores", "baseline", thr_bytes,
        _scores_setup(env, n, dtype), lambda s: bl.topk_threshold(s, k), 4 * n, mem=8 * k,
        note="chunked top-k then merge" if n > bl.TORCH_FLAT_LIMIT else "")
    add("radix_select", "torch.kthvalue on fp32 scores", "baseline", thr_bytes,
        _scores_setup(env, n, dtype), lambda s: bl.kthvalue_threshold(s, k), 4 * n, mem=12 * n,
        skip=None if n <= bl.TORCH_FLAT_LIMIT else "torch.kthvalue cannot take this size")
    add("radix_select", "torch.sort on fp32 scores", "baseline", thr_bytes,
        _scores_setup(env, n, dtype), lambda s: bl.sort_threshold(s, k), 4 * n, mem=12 * n,
        skip=None if n <= bl.TORCH_FLAT_LIMIT else "torch.sort cannot take this size")
    if env.native is not None:
        nat = env.native
        holder: dict[str, Any] = {}

        def cub_setup(i, _n=n, _k=k):
            if "temp" not in holder:
                holder["temp"] = nat.threshold_temp(_n, _k, env.device)
                holder["out"] = torch.empty(1, device=env.device)
            return _scores_setup(env, _n, dtype)(i)

        add("radix_select", f"CUB threshold on fp32 scores ({nat.topk_method})", "baseline", thr_bytes,
            cub_setup, lambda s: nat.topk_threshold(s, k, holder["temp"], holder["out"]), 4 * n,
            mem=8 * n)

    # ---- baselines: compaction ----------------------------------------------------------------
    def compact_setup(i, _n=n):
        s = _scores_setup(env, _n, dtype)(i)
        return s, bl.topk_threshold(s, k)

    add("compaction", "torch.nonzero(scores >= threshold) on fp32 scores", "baseline",
        2 * one_pass + 4 * k, compact_setup, lambda x: bl.threshold_compact(x[0], x[1]), 4 * n,
        mem=n + 8 * k, note="no tie rule: a lower bound for an exact torch compaction")
    return cases


def sparse_step_cases(env: Env, n: int, dtype: torch.dtype, density: float) -> list[Case]:
    from gallop_kernels import rules
    from gallop_kernels.ops.adamw import AdamWHyper, sparse_adamw
    from gallop_kernels.ops.adamw import naive as adamw_naive

    k = rules.k_for_density(n, density)
    b = BYTES[dtype]
    master = dtype != torch.float32
    sbytes = sparse_step_bytes(n, k, b, b, master)
    common = dict(n=n, dtype=dtype, density=density, k=k)
    cases: list[Case] = []
    state_bytes = 16 * k

    def setup(i, _n=n):
        theta, grad = make_pair(_n, dtype, env.device, seed=2000 + i)
        idx, m, v, w = sparse_state(_n, k, env.device, 2000 + i, theta if master else None)
        return theta, grad, idx, m, v, w

    hyper = AdamWHyper(1, LR, BETA1, BETA2, ADAM_EPS, WD)

    def run_ours(x):
        theta, grad, idx, m, v, w = x
        state = {"indices": idx, "exp_avg": m, "exp_avg_sq": v, "master": w}
        sparse_adamw([theta], [grad], [state], hyper)  # Triton on CUDA, the torch backend on CPU

    cases.append(Case("sparse_step", "ops.adamw.sparse_adamw (Triton)" if env.cuda else
                      "ops.adamw.sparse_adamw (torch backend)", "ours", bytes_model=sbytes,
                      setup=setup, fn=run_ours, bytes_per_copy=2 * n * b + state_bytes, **common))
    if env.cuda:
        cases.append(Case("sparse_step", "torch indexing (adamw_naive.sparse_adamw_step on CUDA)",
                          "baseline", bytes_model=sbytes, setup=setup,
                          fn=lambda x: adamw_naive.sparse_adamw_step(*x, hyper),
                          bytes_per_copy=2 * n * b + state_bytes, **common))
        if env.native is not None:
            nat = env.native
            cases.append(Case("sparse_step", "plain CUDA sparse AdamW (kernels/)", "baseline",
                              bytes_model=sbytes, setup=setup,
                              fn=lambda x: nat.sparse_adamw(*x, 1, LR, BETA1, BETA2, ADAM_EPS, WD),
                              bytes_per_copy=2 * n * b + state_bytes, **common))
        else:
            cases.append(Case("sparse_step", "plain CUDA sparse AdamW (kernels/)", "baseline",
                              bytes_model=sbytes, skip=env.native_status, **common))
    # Dense alternatives on the same parameter (one tensor of n entries).
    cases += dense_optimizer_cases(env, "sparse_step", n, dtype, density, k, split=False)
    return cases


def dense_optimizer_cases(env: Env, kernel: str, n: int, dtype: torch.dtype, density: float, k: int,
                          split: bool) -> list[Case]:
    """torch AdamW fused / foreach and bitsandbytes AdamW8bit steps on the same parameters: the
    dense alternatives. Their ``bytes_model`` is their own (dense) traffic, so their GB/s say how
    close *they* are to the copy bandwidth; compare times with "vs ours"."""
    b = BYTES[dtype]
    common = dict(n=n, dtype=dtype, density=density, k=k)
    out: list[Case] = []

    def opt_setup(factory):
        def setup(i, _n=n):
            params = make_model(_n, dtype, env.device, 3000 + i) if split else \
                [_single_param(_n, dtype, env.device, 3000 + i)]
            opt = factory(params)
            opt.step()  # creates the state
            return opt
        return setup

    for label, kw in (("fused=True", dict(fused=True)), ("foreach=True", dict(foreach=True))):
        out.append(Case(kernel, f"torch.optim.AdamW({label}) dense", "baseline",
                        bytes_model=dense_adamw_bytes(n, b, b, b),
                        setup=opt_setup(lambda ps, kw=kw: torch.optim.AdamW(
                            ps, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS, weight_decay=WD, **kw)),
                        fn=lambda opt: opt.step(), bytes_per_copy=4 * n * b,
                        note=f"dense: every entry, m and v in {str(dtype).replace('torch.', '')}",
                        **common))
    if env.bnb_cls is not None:
        cls = env.bnb_cls
        out.append(Case(kernel, "bitsandbytes AdamW8bit dense", "baseline",
                        bytes_model=n * (3 * b + 4),
                        setup=opt_setup(lambda ps: cls(ps, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS,
                                                       weight_decay=WD)),
                        fn=lambda opt: opt.step(), bytes_per_copy=2 * n * b + 2 * n,
                        note="dense: every entry, uint8 blockwise m and v", **common))
    else:
        out.append(Case(kernel, "bitsandbytes AdamW8bit dense", "baseline", bytes_model=0,
                        skip=env.bnb_status, **common))
    return out


def _single_param(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Parameter:
    theta, grad = make_pair(n, dtype, device, seed)
    p = torch.nn.Parameter(theta)
    p.grad = grad
    return p


def optimizer_cases(env: Env, n: int, dtype: torch.dtype, density: float, steady_only: bool = False) -> list[Case]:
    from gallop_kernels import SparseAdamW, rules

    b = BYTES[dtype]
    master = dtype != torch.float32
    sizes = split_sizes(n)
    ks = [rules.k_for_density(s, density) for s in sizes]  # approx. per-tensor share
    k = rules.k_for_density(n, density)
    steady = sum(sparse_step_bytes(s, kk, b, b, master) for s, kk in zip(sizes, ks))
    select_bytes = selection_floor_bytes(n, k, b, b) + steady
    common = dict(n=n, dtype=dtype, density=density, k=k)
    cases: list[Case] = []

    def setup(i, _n=n):
        params = make_model(_n, dtype, env.device, 4000 + i)
        opt = SparseAdamW(params, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS, weight_decay=WD,
                          density=density)
        opt.step()  # selects
        return opt

    def select_step(opt):
        opt.select()
        opt.step()

    label = env.ours_label
    if not steady_only:
        cases.append(Case("optimizer_select_step", f"SparseAdamW select()+step() [{label}]", "ours",
                          bytes_model=select_bytes, setup=setup, fn=select_step,
                          bytes_per_copy=2 * n * b + 16 * k, **common))
        cases += dense_optimizer_cases(env, "optimizer_select_step", n, dtype, density, k, split=True)
    cases.append(Case("optimizer_steady_step", f"SparseAdamW step() [{label}]", "ours",
                      bytes_model=steady, setup=setup, fn=lambda opt: opt.step(),
                      bytes_per_copy=2 * n * b + 16 * k, **common))
    cases += dense_optimizer_cases(env, "optimizer_steady_step", n, dtype, density, k, split=True)
    return cases


# --------------------------------------------------------------------------------------------------
# State memory
# --------------------------------------------------------------------------------------------------

# Parameter counts of public models (embeddings included), for the memory table and plot.
MODEL_SIZES = {
    "Qwen2.5-0.5B": 494_032_768,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3-70B": 70_553_706_496,
}


# Rows of the state table -> the memory registry's method (gallop_kernels/memory/methods.py).
STATE_METHODS = {
    "torch AdamW (state in param dtype, bf16)": "adamw",
    "AdamW fp32 m, v + fp32 master (mixed precision)": "adamw-mixed",
    "bitsandbytes AdamW8bit": "adamw8bit",
}


def state_bytes_formula(optimizer: str, n_params: int, density: float | None = None,
                        tensors: list[int] | None = None) -> float:
    """Optimizer state bytes for bf16 parameters: the memory registry's one formula
    (`memory.methods.state_bytes`), over ``tensors`` (their sizes) or one flat tensor."""
    from gallop_kernels.memory import methods

    if optimizer.startswith("SparseAdamW"):
        # k is chosen over the whole group, so the group counts as one flat tensor
        return methods.state_bytes(methods.get("sparse"), [(n_params, 1)], param_bytes=2,
                                   density=density)
    if optimizer not in STATE_METHODS:
        raise ValueError(optimizer)
    shape = [(n, 1) for n in tensors] if tensors else [(n_params, 1)]
    return methods.state_bytes(methods.get(STATE_METHODS[optimizer]), shape, param_bytes=2)


def measured_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # not the 0-d step counters
                total += v.numel() * v.element_size()
    return total
