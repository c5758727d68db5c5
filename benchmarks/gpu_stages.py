"""The stages of the prepared GPU run (``benchmarks.gpu_check``), each ``(run, stage)``.

``env`` (device, software, copy bandwidth), ``build`` (the native baselines), ``tests`` (pytest,
compiled kernels), ``selection`` and ``step`` (ours beside the exact torch compositions, CUB,
fused AdamW, AdamW8bit, each exact baseline checked to select our index set before it is
timed), ``memory`` (``gallop memory``'s measure mode on the Llama-3-8B shape). The module
docstring of ``benchmarks.gpu_check`` has each stage's budget and time estimate.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import torch

from benchmarks.gpu_run import REPO, Run, Stage

DENSITY = 0.01
# CUDA-only tests first, then the kernel test files (compiled for this GPU instead of interpreted).
GPU_TEST_FILES = ("tests/test_select_triton.py", "tests/test_select_score_kernels.py",
                  "tests/test_adamw_triton.py", "tests/test_adamw_8bit.py",
                  "tests/test_sparse_adamw.py", "tests/test_select_streaming.py",
                  "tests/test_state_dict.py", "tests/test_lean.py")
DRY_TESTS = ("tests/test_select_streaming.py", "-k", "order_keys")
MEMORY_METHODS = ("sparse-lean", "sparse-4bit-delta", "adamw", "sparse-lean-8bit", "sparse",
                  "adamw8bit", "lora")
CASE_SINGLE_CALL_S = 5.0  # a case whose first call takes longer is timed by that call alone
KTHVALUE_MAX_N = 10**8  # torch.kthvalue runs one thread block per slice
TORCH_FLAT_LIMIT = 2**31 - 1


def stage_env(run: Run, stage: Stage) -> None:
    from benchmarks.environment import device_info
    from benchmarks.timing import copy_bandwidth

    info = device_info(run.device)
    run.device_name = info["name"]
    stage.detail["device"] = info
    stage.detail["software"] = {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
        "cuda_runtime": torch.version.cuda, "git_commit": _git_commit(),
    }
    bw = copy_bandwidth(run.device, nbytes=(16 << 20) if run.dry else None)
    run.copy_gbps = bw["gbps"]
    stage.detail["copy_bandwidth"] = bw
    run.log(f"device {run.device_name}; copy bandwidth {bw['gbps']:.1f} GB/s")


def stage_build(run: Run, stage: Stage) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        stage.status = "skipped"
        stage.detail["reason"] = "cmake is not installed"
        return
    build = run.out / "build"
    cmd = [cmake, "-S", str(REPO), "-B", str(build)]
    if run.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(run.device)
        cmd.append(f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}")
    env = None
    if run.dry:  # configured only, as on a machine without nvcc (detecting CUDA takes seconds)
        env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
        env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                      if d and not os.path.exists(os.path.join(d, "nvcc")))
    configure = run.subprocess(cmd, "build.log", env=env)
    stage.detail["configure"] = configure
    if configure["returncode"] != 0:
        stage.status = "timed out" if configure["timed_out"] else "failed"
        return
    if run.dry:
        stage.detail["reason"] = ("dry run: configured only (compiling CUB takes minutes on a small "
                                  "CPU; tests/test_benchmarks_quick.py compiles it where nvcc is)")
        return
    jobs = str(os.cpu_count() or 2)
    compile_ = run.subprocess([cmake, "--build", str(build), "-j", jobs], "build.log")
    stage.detail["build"] = compile_
    lib = build / "libgallop_baselines.so"
    if compile_["returncode"] != 0:
        stage.status = "timed out" if compile_["timed_out"] else "failed"
    elif lib.is_file():
        os.environ["GALLOP_BASELINES_LIB"] = str(lib)
        stage.detail["library"] = str(lib)
    else:
        stage.detail["library"] = None
        stage.detail["reason"] = ("configured and built, but no library: no CUDA compiler was "
                                  "found (see build.log)")
    from benchmarks.baselines import load_native

    run.native, stage.detail["native_status"] = load_native(run.device)


def _pytest_summary(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1].strip("= ") if lines else "no summary (see log)"


def stage_tests(run: Run, stage: Stage) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if run.dry:
        env["TRITON_INTERPRET"] = "1"
        runs = {"dry": ["-q", "-p", "no:cacheprovider", *DRY_TESTS]}
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
        files = [f for f in GPU_TEST_FILES if (REPO / f).is_file()]
        runs = {"cuda-only (-m gpu)": ["-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
                "kernel tests": ["-q", "-rs", "-p", "no:cacheprovider", "-x", *files]}
    failed = False
    for label, pytest_args in runs.items():
        if run.remaining() < 5:
            stage.detail[label] = {"skipped": "stage budget spent"}
            stage.status = "cut short"
            continue
        res = run.subprocess([sys.executable, "-m", "pytest", *pytest_args], "tests.log", env=env)
        res["summary"] = _pytest_summary(res["tail"])
        stage.detail[label] = res
        run.log(f"pytest {label}: {res['summary']}" + (" (timed out)" if res["timed_out"] else ""))
        if res["timed_out"]:
            stage.status = "timed out"
        elif res["returncode"] not in (0, 5):  # 5: nothing collected (no test of that kind)
            failed = True
    if failed:
        stage.status = "failed"


def _timed(run: Run, fn, inputs: list, warmup: int = 2) -> dict[str, Any]:
    """Median time of ``fn(x)``; a slow first call (over CASE_SINGLE_CALL_S) is the only one."""
    from benchmarks.timing import measure

    _sync(run.device)
    t = time.perf_counter()
    fn(inputs[0])
    _sync(run.device)
    first = time.perf_counter() - t
    if first > CASE_SINGLE_CALL_S or run.remaining() < 10 * first:
        return {"median_s": first, "reps": 1, "timer": "one call (slow case or budget)"}
    target = 0.02 if run.dry else min(1.0, max(0.05, run.remaining() / 20))
    m = measure(fn, inputs, run.device, warmup=1 if run.dry else warmup, min_reps=3, max_reps=10,
                target_s=target)
    return m.as_dict()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _free_bytes(run: Run) -> int:
    if run.device.type == "cuda":
        return int(torch.cuda.mem_get_info(run.device)[0])
    from benchmarks.cases import Env

    return Env(run.device, try_bnb=False).free_bytes()


def stage_selection(run: Run, stage: Stage) -> None:
    from gallop_kernels.ops import backends

    backend = backends.resolve("auto", [torch.empty(0, device=run.device)])
    rows: list[dict[str, Any]] = []
    stage.detail.update(rows=rows, backend=backend)
    for n in run.sizes:
        if run.remaining() < 5:
            rows.append({"n": n, "impl": "*", "skipped": "stage budget spent"})
            stage.status = "cut short"
        elif 12 * n > 0.85 * _free_bytes(run):  # θ, g bf16 + the fp32 scores of the baselines
            rows.append({"n": n, "impl": "*", "skipped": "does not fit in device memory"})
        else:
            rows += _selection_at(run, stage, n, backend)
        _free(run.device)
    if any(r.get("same_indices_as_ours") is False for r in rows):
        stage.status = "failed"
        stage.detail["error"] = "an exact baseline selected another index set than ours"


def _selection_at(run: Run, stage: Stage, n: int, backend: str) -> list[dict[str, Any]]:
    """Ours and every exact baseline at one N, each checked against ours, then timed."""
    from benchmarks import baselines as bl
    from benchmarks.cases import EPS, make_pair, selection_floor_bytes
    from gallop_kernels import rules
    from gallop_kernels.ops.select import naive as select_naive
    from gallop_kernels.ops.select import select

    k = rules.k_for_density(n, DENSITY)
    floor = selection_floor_bytes(n, k, 2, 2)
    theta, grad = make_pair(n, torch.bfloat16, run.device, seed=11)

    def scores():
        return select_naive.compute_score(theta, grad, "gallop", EPS)

    impls: dict[str, tuple[Callable[[], Any], str | None]] = {
        f"ours: ops.select.select ({backend})": (lambda: select(
            [theta], [grad], k, score="gallop", score_eps=EPS, seed=0,
            names=["w"], backend=backend)[0], None),
        "torch: score + topk threshold + ties": (
            lambda: bl.exact_compact(s := scores(), bl.topk_threshold(s, k), k), None),
        "torch: score + kthvalue + ties": (
            lambda: bl.exact_compact(s := scores(), bl.kthvalue_threshold(s, k), k),
            "one thread block per slice: minutes at this size" if n > KTHVALUE_MAX_N else None),
        "torch: score + stable sort": (
            lambda: bl.stable_sort_select(scores(), k),
            "torch.sort cannot take this size" if n > TORCH_FLAT_LIMIT else None),
    }
    rows: list[dict[str, Any]] = []
    if run.native is not None:
        nat = run.native
        temp = nat.threshold_temp(n, k, run.device)
        buf = torch.empty(n, device=run.device)
        thr = torch.empty(1, device=run.device)

        def cub():
            nat.gallop_score(theta, grad, EPS, buf)
            nat.topk_threshold(buf, k, temp, thr)
            return bl.exact_compact(buf, thr, k)

        impls[f"CUB: CUDA score + {nat.topk_method} threshold + ties"] = (cub, None)
    else:
        rows.append({"n": n, "impl": "CUB baseline", "role": "baseline",
                     "skipped": "native baselines not built (build stage)"})
    ours_idx = None
    for impl, (fn, skip) in impls.items():
        row = {"n": n, "k": k, "impl": impl, "bytes_model": floor,
               "role": "ours" if impl.startswith("ours") else "baseline"}
        rows.append(row)
        if skip:
            row["skipped"] = skip
            continue
        if run.remaining() < 3:
            row["skipped"] = "stage budget spent"
            stage.status = "cut short"
            continue
        try:
            got = fn().to(torch.int64)
            if row["role"] == "ours":
                ours_idx = got
            elif ours_idx is not None:  # every exact implementation selects the same set
                row["same_indices_as_ours"] = bool(torch.equal(got, ours_idx))
            del got
            row.update(_timed(run, lambda _: fn(), [None]))
            row["gbps"] = floor / row["median_s"] / 1e9
            if run.copy_gbps:
                row["frac_copy_bw"] = row["gbps"] / run.copy_gbps
            run.log(f"selection N={n:.0e} {impl}: {row['median_s'] * 1e3:.3f} ms")
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the other cases still run
            row["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        _free(run.device)
    return rows


def stage_step(run: Run, stage: Stage) -> None:
    from benchmarks import baselines as bl
    from gallop_kernels.ops import backends

    backend = backends.resolve("auto", [torch.empty(0, device=run.device)])
    if run.dry:
        bnb_cls, bnb_status = None, "dry run: not tried (its import alone takes seconds)"
    else:
        bnb_cls, bnb_status = bl.bnb_status(run.device)
    rows: list[dict[str, Any]] = []
    stage.detail.update(rows=rows, backend=backend, bitsandbytes=bnb_status)
    for n in run.sizes:
        if run.remaining() < 5:
            rows.append({"n": n, "impl": "*", "skipped": "stage budget spent"})
            stage.status = "cut short"
        elif 12 * n > 0.85 * _free_bytes(run):  # p, g, m, v in bf16 (dense AdamW)
            rows.append({"n": n, "impl": "*", "skipped": "does not fit in device memory"})
        else:
            rows += _step_at(run, stage, n, backend, bnb_cls)
        _free(run.device)


def _step_at(run: Run, stage: Stage, n: int, backend: str, bnb_cls) -> list[dict[str, Any]]:
    """The sparse step at ρ = 1 % and the dense optimizers' steps on the same parameter."""
    from benchmarks.cases import (
        ADAM_EPS,
        BETA1,
        BETA2,
        LR,
        WD,
        dense_adamw_bytes,
        make_pair,
        sparse_state,
        sparse_step_bytes,
    )
    from gallop_kernels import rules
    from gallop_kernels.ops.adamw import AdamWHyper, sparse_adamw

    k = rules.k_for_density(n, DENSITY)
    theta, grad = make_pair(n, torch.bfloat16, run.device, seed=12)
    state = dict(zip(("indices", "exp_avg", "exp_avg_sq", "master"),
                     sparse_state(n, k, run.device, 12, theta)))
    ours = f"ours: ops.adamw.sparse_adamw ({backend})"
    rows = [{"n": n, "k": k, "impl": ours, "role": "ours",
             "bytes_model": sparse_step_bytes(n, k, 2, 2, True)}]
    count = [0]

    def sparse_step(_):
        count[0] += 1
        sparse_adamw([theta], [grad], [state], AdamWHyper(count[0], LR, BETA1, BETA2, ADAM_EPS, WD),
                     backend=backend)

    try:
        rows[0].update(_timed(run, sparse_step, [None]))
        run.log(f"step N={n:.0e} {ours}: {rows[0]['median_s'] * 1e3:.3f} ms")
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the baselines still run
        rows[0]["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    state = None
    dense = {"torch.optim.AdamW(fused=True) dense": (
        lambda ps: torch.optim.AdamW(ps, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS,
                                     weight_decay=WD, fused=True), dense_adamw_bytes(n, 2, 2, 2))}
    if bnb_cls is not None:
        dense["bitsandbytes AdamW8bit dense"] = (
            lambda ps: bnb_cls(ps, lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS, weight_decay=WD),
            n * (3 * 2 + 4))
    for impl, (make, nbytes) in dense.items():
        row = {"n": n, "k": k, "impl": impl, "role": "baseline", "bytes_model": nbytes}
        rows.append(row)
        if run.remaining() < 3:
            row["skipped"] = "stage budget spent"
            stage.status = "cut short"
            continue
        try:
            p = torch.nn.Parameter(theta)
            p.grad = grad
            opt = make([p])
            opt.step()  # creates the state
            row.update(_timed(run, lambda _, opt=opt: opt.step(), [None]))
            run.log(f"step N={n:.0e} {impl}: {row['median_s'] * 1e3:.3f} ms")
            del opt, p
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the other cases still run
            row["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        _free(run.device)
    return rows


def stage_memory(run: Run, stage: Stage) -> None:
    from gallop_kernels.memory import model as mm
    from gallop_kernels.memory.presets import load_config
    from gallop_kernels.memory.report import compare, run_measurement

    if run.dry:
        config_name, seq, device, methods = "llama-tiny", 32, "cpu", ("sparse-lean",)
        capacity = None
    else:
        config_name, seq, device, methods = "llama3-8b", 2048, "cuda", MEMORY_METHODS
        capacity = torch.cuda.get_device_properties(run.device).total_memory
    config = load_config(config_name)
    setup = mm.Setup(batch=1, seq=seq, dtype="bf16", device=device, attn="sdpa", density=DENSITY)
    measurements, skipped = [], []
    for method in methods:
        predicted = mm.predict(config, method, setup).peak
        if capacity is not None and predicted > 0.85 * capacity:
            skipped.append({"method": method, "reason": f"predicted {predicted / 2**30:.1f} GiB "
                            f"does not fit 85 % of {capacity / 2**30:.0f} GiB"})
            continue
        if run.remaining() < 20:
            skipped.append({"method": method, "reason": "stage budget spent"})
            stage.status = "cut short"
            continue
        run.log(f"memory: measuring {method} on {config_name} (seq {seq}, {device})")
        meas = run_measurement(config_name, method, seq=seq, batch=1, dtype="bf16", attn="sdpa",
                               device=device, density=DENSITY, timeout=int(run.remaining()))
        measurements.append(meas)
    rows = compare(config_name, setup, measurements)
    stage.detail.update(config=config_name, seq=seq, device=device, rows=rows, skipped=skipped)
    for r in rows:
        run.log(f"memory {r['method']}: predicted {r['predicted'] / 2**30:.2f} GiB, measured "
                + (f"{r['measured'] / 2**30:.2f} GiB" if r.get("measured") else r.get("reason", "")))
    if not any(r.get("measured") for r in rows):
        stage.status = "failed" if measurements else stage.status


def _version(module: str) -> str | None:
    """Installed version without importing (bitsandbytes' import alone takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


STAGES: dict[str, Callable[[Run, Stage], None]] = {
    "env": stage_env, "build": stage_build, "tests": stage_tests,
    "selection": stage_selection, "step": stage_step, "memory": stage_memory,
}
