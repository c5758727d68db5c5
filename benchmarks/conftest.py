"""pytest-benchmark configuration for the microbenchmarks (``python -m pytest benchmarks``).

Not collected by the default test run (``testpaths = ["tests"]``). Every ``case`` parameter is a
``benchmarks.cases.Case``: the same cases the report runs. Sizes come from ``GALLOP_BENCH_N``
(comma-separated, e.g. ``1e6,1e8``; default 2^16 on CPU, 1e6 and 1e8 on a GPU) and densities
for the sparse step from ``GALLOP_BENCH_DENSITY`` (default ``0.01``).
"""

import os

import torch

# The Triton interpreter must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(int(os.environ.get("GALLOP_BENCH_THREADS", "1")))

import pytest  # noqa: E402

from benchmarks import cases as C  # noqa: E402

_ENV = None


def bench_env() -> "C.Env":
    global _ENV
    if _ENV is None:
        _ENV = C.Env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return _ENV


def _sizes() -> list[int]:
    text = os.environ.get("GALLOP_BENCH_N")
    if text:
        return [int(float(s)) for s in text.split(",") if s.strip()]
    return [10**6, 10**8] if torch.cuda.is_available() else [2**16]


def _densities() -> list[float]:
    return [float(s) for s in os.environ.get("GALLOP_BENCH_DENSITY", "0.01").split(",") if s.strip()]


def _dtype() -> torch.dtype:
    return getattr(torch, os.environ.get("GALLOP_BENCH_DTYPE", "bfloat16"))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("cases")
    if marker is None:
        return
    group = marker.args[0]
    env = bench_env()
    found = []
    for n in _sizes():
        for rho in _densities() if group != "selection" else [0.01]:
            if group == "selection":
                found += C.selection_cases(env, n, _dtype(), rho)
            elif group == "sparse_step":
                found += C.sparse_step_cases(env, n, _dtype(), rho)
            elif group == "optimizer":
                found += C.optimizer_cases(env, n, _dtype(), rho)
    kernels = marker.kwargs.get("kernels")
    if kernels:
        found = [c for c in found if c.kernel in kernels]
    ids = [f"{c.kernel}-{c.impl}-N{c.n}-rho{c.density:g}".replace(" ", "_") for c in found]
    metafunc.parametrize("case", found, ids=ids)


def pytest_configure(config):
    config.addinivalue_line("markers", "cases(group, kernels=None): parametrize with suite cases")


@pytest.fixture
def run_case(benchmark):
    """Time a case with pytest-benchmark (synchronised wall clock) and, beside it, the device
    timer of the report (CUDA events / perf_counter median) in ``extra_info``."""
    from benchmarks.timing import measure

    def run(case):
        if case.skip:
            pytest.skip(case.skip)
        env = bench_env()
        copies = min(env.copies(case.bytes_per_copy), 8)
        inputs = [case.setup(i) for i in range(copies)]
        m = measure(case.fn, inputs, env.device, warmup=2, min_reps=3, max_reps=50, target_s=0.3)
        counter = iter(range(10**9))

        def once():
            case.fn(inputs[next(counter) % copies])
            if env.cuda:
                torch.cuda.synchronize()

        benchmark.extra_info.update(case.describe())
        benchmark.extra_info.update({"device_median_s": m.median_s, "device_timer": m.timer,
                                     "copies": copies})
        if case.bytes_model:
            benchmark.extra_info["gbps"] = case.bytes_model / m.median_s / 1e9
        benchmark.pedantic(once, rounds=max(3, min(m.reps, 20)), warmup_rounds=1, iterations=1)

    return run
