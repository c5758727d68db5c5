"""Collection: run every case of the suite and gather the results into one dict (the JSON).

``collect`` builds the cases of ``benchmarks.cases`` for the mode's sizes, times each with
``benchmarks.timing`` (skipping, with the reason, what does not fit or cannot run), adds the
ratios between our rows and the baselines of the same run, the optimizer state memory, and in CPU
runs the Triton kernels' correctness checks in the interpreter. Rendering is ``benchmarks.render``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import time
from typing import Any, Sequence

import torch

from benchmarks.environment import device_info, software_info

SCHEMA_VERSION = 1

MODE_SETTINGS: dict[str, dict[str, Any]] = {
    # N sweep (density 1%), density sweep at one N, measured state memory at one N, timer effort.
    "quick": dict(sizes=[2**12], density_n=2**12, densities=[0.01, 0.1], memory_n=2**12,
                  target_s=0.005, max_reps=3, min_reps=2, warmup=1, optimizer_sizes=[2**12],
                  max_copies=2),
    "cpu": dict(sizes=[10**5, 10**6, 4 * 10**6], density_n=10**6, densities=[0.001, 0.01, 0.1],
                memory_n=10**6, target_s=0.5, max_reps=30, min_reps=5, warmup=2,
                optimizer_sizes=[10**5, 10**6, 4 * 10**6], max_copies=8),
    "gpu": dict(sizes=[10**6, 10**7, 10**8, 10**9, 4 * 10**9], density_n=10**9,
                densities=[0.001, 0.01, 0.1], memory_n=10**8, target_s=1.0, max_reps=100,
                min_reps=10, warmup=5, optimizer_sizes=[10**6, 10**7, 10**8, 10**9, 4 * 10**9],
                max_copies=8),
}
KERNEL_GROUPS = ("selection", "sparse_step", "optimizer")

OWED_GPU = [
    "The prepared GPU run (`python -m benchmarks.gpu_check --out DIR`, < 8 min on one H100/H200): "
    "build, GPU tests, selection and step against the targets of issue 9, 8B memory rows.",
    "Full GPU report (`python -m benchmarks.report --mode gpu`, N = 1e6 … 4e9, bf16) on an H100: "
    "Triton kernels (score+histogram, radix select, compaction, whole selection, sparse AdamW) beside "
    "torch.topk/kthvalue/sort (chunked where needed), the CUB threshold and plain CUDA sparse AdamW "
    "of kernels/ (build with CMake first), torch AdamW fused/foreach and bitsandbytes AdamW8bit.",
    "SparseAdamW.step() selection and steady steps against density (0.1 %, 1 %, 10 %) at N = 1e9.",
    "The native baselines in kernels/ compile with nvcc 13.0 (sm_80, sm_90) but have not been run.",
]



# --------------------------------------------------------------------------------------------------
# Correctness checks in the Triton interpreter (CPU mode) — never timed
# --------------------------------------------------------------------------------------------------


def interpreter_checks() -> dict[str, Any]:
    """Triton kernels against the reference on tiny inputs, in the interpreter (CPU runs).
    A failure is recorded in the report (and fails tests/test_benchmarks_quick.py), not raised."""
    try:
        return _interpreter_checks()
    except Exception as exc:  # noqa: BLE001 - the report still gets written
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:500]}"}


def _interpreter_checks() -> dict[str, Any]:
    from gallop_kernels.ops.backends import interpreter_enabled

    if not interpreter_enabled():
        return {"status": "skipped: TRITON_INTERPRET=1 was not set before the kernels were imported"}
    out: dict[str, Any] = {"status": "ran", "where": "Triton interpreter (CPU), not timed"}
    from benchmarks.cases import make_pair, sparse_state
    from benchmarks.stages import TritonStages
    from gallop_kernels import rules
    from gallop_kernels.ops.adamw import AdamWHyper, sparse_adamw
    from gallop_kernels.ops.adamw import naive as adamw_naive
    from gallop_kernels.ops.select import naive as select_naive
    from gallop_kernels.ops.select import select

    t0 = time.perf_counter()
    a = make_pair(1000, torch.bfloat16, torch.device("cpu"), 1)
    b = make_pair(2001, torch.float32, torch.device("cpu"), 2)
    params, grads = [a[0], b[0]], [a[1], b[1]]
    k = rules.k_for_density(3001, 0.01)
    ours = select(params, grads, k, score="gallop", backend="triton")
    ref = select_naive.select(params, grads, 0.01, "gallop")
    out["triton_select_equals_reference"] = all(
        torch.equal(o.to(torch.int64), r.to(torch.int64)) for o, r in zip(ours, ref))

    try:
        TritonStages(a[0], a[1], 10).check()
        out["staged_kernels_equal_triton_select"] = True
    except AssertionError as exc:
        out["staged_kernels_equal_triton_select"] = False
        out["staged_kernels_error"] = str(exc)

    theta, grad = make_pair(3000, torch.bfloat16, torch.device("cpu"), 3)
    idx, m, v, w = sparse_state(3000, 30, torch.device("cpu"), 3, theta)
    t2, m2, v2, w2 = theta.clone(), m.clone(), v.clone(), w.clone()
    hyper = AdamWHyper(3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    state = {"indices": idx, "exp_avg": m, "exp_avg_sq": v, "master": w}
    sparse_adamw([theta], [grad], [state], hyper, backend="triton")
    adamw_naive.sparse_adamw_step(t2, grad, idx, m2, v2, w2, hyper)
    diff = max(float((x - y).abs().max()) for x, y in ((m, m2), (v, v2), (w, w2)))
    out["sparse_adamw_max_abs_diff"] = diff
    out["sparse_adamw_params_equal"] = bool(torch.equal(theta, t2))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------------
# Running the suite
# --------------------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # (on CPU a full collection per case costs more than it frees)
        gc.collect()
        torch.cuda.empty_cache()


def run_case(case, env, settings: dict[str, Any], log) -> dict[str, Any]:
    from benchmarks.timing import measure

    row = case.describe()
    if case.skip:
        row["skipped"] = case.skip
        return row
    copies = min(env.copies(case.bytes_per_copy), settings["max_copies"])
    need = copies * case.bytes_per_copy + case.mem_estimate
    free = env.free_bytes()
    if need > 0.9 * free:
        row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return row
    inputs = []
    try:
        inputs = [case.setup(i) for i in range(copies)]
        m = measure(case.fn, inputs, env.device, warmup=settings["warmup"],
                    min_reps=settings["min_reps"], max_reps=settings["max_reps"],
                    target_s=settings["target_s"])
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of device memory"
        return row
    except (RuntimeError, ValueError, TypeError) as exc:
        if "out of memory" in str(exc).lower():
            row["skipped"] = "out of memory"
            return row
        row["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        return row
    finally:
        del inputs
        _free(env.device)
    row.update(m.as_dict())
    if case.bytes_model:
        row["gbps"] = case.bytes_model / m.median_s / 1e9
    log(f"  {case.kernel:22s} N={case.n:<11,d} rho={case.density:<6g} {case.impl[:58]:58s} "
        f"{m.median_s * 1e3:10.3f} ms")
    return row


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def collect(mode: str, device: torch.device, dtype: torch.dtype, sizes: list[int] | None,
            groups: Sequence[str], log=print) -> dict[str, Any]:
    from benchmarks import cases as C
    from benchmarks.timing import copy_bandwidth

    settings = dict(MODE_SETTINGS[mode])
    if sizes:
        settings["sizes"] = sizes
        settings["optimizer_sizes"] = sizes
        settings["density_n"] = sizes[-1] if mode != "gpu" else min(sizes[-1], settings["density_n"])
    env = C.Env(device, try_bnb=mode != "quick")
    dev = device_info(device)
    log(f"benchmarks.report: mode={mode} device={dev['name']} dtype={dtype}")
    copy_bw = copy_bandwidth(device, nbytes=(16 << 20) if mode == "quick" else None)
    log(f"  copy bandwidth {copy_bw['gbps']:.1f} GB/s")

    all_cases = []
    for n in settings["sizes"]:
        if "selection" in groups:
            all_cases += C.selection_cases(env, n, dtype, 0.01)
        if "sparse_step" in groups:
            all_cases += C.sparse_step_cases(env, n, dtype, 0.01)
    for n in settings["optimizer_sizes"]:
        if "optimizer" in groups:
            all_cases += C.optimizer_cases(env, n, dtype, 0.01)
    dn = settings["density_n"]
    for rho in settings["densities"]:  # the density sweep (ρ = 1 % at dn may already be in)
        if "sparse_step" in groups and not (rho == 0.01 and dn in settings["sizes"]):
            all_cases += C.sparse_step_cases(env, dn, dtype, rho)
        if "optimizer" in groups and not (rho == 0.01 and dn in settings["optimizer_sizes"]):
            all_cases += C.optimizer_cases(env, dn, dtype, rho)

    results = [run_case(c, env, settings, log) for c in all_cases]
    add_ratios(results)
    for r in results:
        if "gbps" in r:
            r["frac_copy_bw"] = r["gbps"] / copy_bw["gbps"]

    memory = memory_rows(env, settings["memory_n"], dtype)
    checks = interpreter_checks() if device.type == "cpu" else {
        "status": "GPU run: the kernels are timed on the device; correctness is the test suite's job"}
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema": SCHEMA_VERSION,
        "mode": mode,
        "label": ("CPU numbers (torch backend; Triton kernels not timed on CPU)"
                  if device.type == "cpu" else "GPU numbers (Triton kernels)"),
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": dev,
        "software": software_info(env),
        "copy_bandwidth": copy_bw,
        "settings": {
            "dtype": str(dtype).replace("torch.", ""),
            "sizes": settings["sizes"],
            "optimizer_sizes": settings["optimizer_sizes"],
            "densities": settings["densities"],
            "density_sweep_n": settings["density_n"],
            "default_density": 0.01,
            "timer": {k: settings[k] for k in ("warmup", "min_reps", "max_reps", "target_s")},
            "statistic": "median",
            "inputs": "random normal θ (σ 0.02) and g (σ 1e-3), never zeros; rotated copies > 2× cache",
            "hyperparameters": {"lr": C.LR, "betas": [C.BETA1, C.BETA2], "eps": C.ADAM_EPS,
                                "weight_decay": C.WD, "score": "gallop", "score_eps": C.EPS},
        },
        "kernels": C.KERNELS,
        "results": results,
        "memory": memory,
        "checks": checks,
        "owed": OWED_GPU if device.type == "cpu" else [],
    }


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Beside every timed row, the ratio of each baseline's median to ours (same kernel, N,
    dtype, density, same run): ``speedup_vs`` on our rows (>1: ours faster), ``vs_ours`` on
    baseline rows (their time over ours)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["kernel"], r["n"], r["dtype"], r["density"]), []).append(r)
    for rows in groups.values():
        ours = [r for r in rows if r["role"] == "ours" and "median_s" in r]
        base = [r for r in rows if r["role"] == "baseline" and "median_s" in r]
        for o in ours:
            o["speedup_vs"] = {b["impl"]: b["median_s"] / o["median_s"] for b in base}
        if ours:
            ref = ours[0]
            for b in base:
                b["vs_ours"] = b["median_s"] / ref["median_s"]
                b["vs_ours_impl"] = ref["impl"]


def memory_rows(env, n: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """State memory against model size: formulas for public model sizes, and the state actually
    allocated by each optimizer on an N-entry model in this run (bytes per parameter)."""
    from benchmarks import cases as C
    from gallop_kernels import SparseAdamW

    rows: list[dict[str, Any]] = []
    optimizers = ["torch AdamW (state in param dtype, bf16)",
                  "AdamW fp32 m, v + fp32 master (mixed precision)",
                  "bitsandbytes AdamW8bit"] + [f"SparseAdamW density={d:g}" for d in (0.001, 0.01, 0.1)]
    for model, count in C.MODEL_SIZES.items():
        for opt in optimizers:
            dens = float(opt.split("=")[1]) if "density=" in opt else None
            rows.append({"source": "formula", "model": model, "params": count, "optimizer": opt,
                         "state_bytes": C.state_bytes_formula(opt, count, dens)})
    # Measured on this device at size n (bf16 unless --dtype says otherwise).
    makers = {
        "torch AdamW (state in param dtype, bf16)": lambda ps: torch.optim.AdamW(ps, lr=C.LR),
    }
    if env.bnb_cls is not None:
        makers["bitsandbytes AdamW8bit"] = lambda ps: env.bnb_cls(ps, lr=C.LR)
    for d in (0.001, 0.01, 0.1):
        makers[f"SparseAdamW density={d:g}"] = lambda ps, d=d: SparseAdamW(ps, lr=C.LR, density=d)
    for name, make in makers.items():
        try:
            params = C.make_model(n, dtype, env.device, 5000)
            opt = make(params)
            opt.step()
            measured = C.measured_state_bytes(opt)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            rows.append({"source": "measured", "optimizer": name, "params": n,
                         "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        dens = float(name.split("=")[1]) if "density=" in name else None
        formula = C.state_bytes_formula(name, n, dens, tensors=C.split_sizes(n))
        rows.append({"source": "measured", "model": f"{len(C.split_sizes(n))}-tensor model", "params": n,
                     "dtype": str(dtype).replace("torch.", ""), "optimizer": name,
                     "state_bytes": measured, "formula_bytes": formula,
                     "bytes_per_param": measured / n})
        del opt, params
        _free(env.device)
    return rows
