"""One prepared GPU run: build, test, time and measure on one H100/H200 in under 8 minutes.

    python -m benchmarks.gpu_check --out DIR          # on the GPU machine
    python -m benchmarks.gpu_check --out DIR --dry    # the same stages on a CPU at tiny sizes (CI)

Stages, in order, each with its own time budget (a stage that overruns is stopped or cut short
and recorded as such; later stages still get theirs, within the global ``--budget-s``):

=========  ======  ==========================================================================
stage      budget  what it does
=========  ======  ==========================================================================
env          10 s  device (name, driver, memory), software, measured copy bandwidth
build        75 s  ``cmake`` + build of the native baselines (``kernels/``: CUB threshold, plain
                   sparse AdamW) for this GPU's architecture only
tests       120 s  pytest (a wall-clock limit on each run): the CUDA-only tests (``-m gpu``),
                   then the kernel test files, compiled for this GPU
selection    75 s  exact top-k at N = 1e6, 1e7, 1e8, 1e9, 4e9 (bf16 θ and g, ρ = 1 %): ours
                   (``ops.select_indices``, Triton on CUDA) beside the exact torch compositions
                   (score + topk threshold + ties, score + kthvalue + ties, score + stable sort)
                   and the CUB baseline (CUDA score + CUB threshold + ties)
step         40 s  sparse AdamW at the same N, ρ = 1 % (``ops.sparse_adamw_update``) beside dense
                   ``torch.optim.AdamW(fused=True)`` and bitsandbytes ``AdamW8bit``
memory      110 s  ``gallop memory``'s measure mode on the Llama-3-8B shape (seq 2048, batch 1),
                   most telling rows first (SparseAdamW lean, 4-bit base + delta, dense AdamW,
                   then the rest), only rows predicted to fit in 85 % of the device memory,
                   as many as the budget allows
=========  ======  ==========================================================================

Then the targets of issue 9 are checked against the numbers of this run: selection >= 60 % of the
copy bandwidth for N >= 1e9 (bytes: the floor, two reads of θ and g + 4k), >= 3x faster than the
best exact torch composition, within 1.2x of the CUB baseline; the step >= 10x faster than dense
fused AdamW at ρ = 1 %. ``DIR`` gets ``gpu-check-<device>-<date>.json`` and ``.md`` (target,
measured, pass/fail) and the logs of the build and test stages, every file naming the device.

Time estimate (why the budgets fit 8 minutes): the bandwidth floor (``docs/design.md#kernels``)
is one read of bf16 θ and g = 4 B/entry per pass. At N = 4e9 that is 16 GB per pass: 3.3 ms on an H200
(~4.8 TB/s), 4.8 ms on an H100 (~3.35 TB/s). Our selection makes up to 5 reads (~25 ms); the
torch compositions materialise fp32 scores (write + read 32 GB) and then make several passes over
them (topk: ~4 passes of 16 GB): ~50-100 ms a call. With 2 warm-up calls and at most 10 timed
calls per case, the sizes from 1e6 to 4e9 take ~15 s of timing plus data generation (~2 s per
4e9 pair) and Triton compilation (~30 s, first calls); kthvalue and sort are skipped where they
cannot take the size. The step at N = 4e9: dense fused AdamW moves 14 B/param = 56 GB (~12-17 ms
a step), the sparse step ~1.4 GB at ρ = 1 % (< 1 ms): ~10 s in all. Memory: H200 139 GiB holds
4e9 bf16 θ, g (16 GB) plus the fp32 scores (16 GB) and the baselines' temporaries (< 40 GB); the
dense AdamW step at 4e9 needs p, g, m, v in bf16 (32 GB). The 8B memory rows each build the
model in a fresh process (random weights, ~30-60 s a row): two to three rows fit the budget.
Sum of budgets: 430 s, leaving ~50 s of the 8 minutes for process start-up and imports.

``--dry`` runs every stage on the CPU at tiny sizes (N = 2^10, 2^12; ``llama-tiny`` memory row;
one small test; cmake without nvcc builds nothing and says so), so the script is known to work
before a GPU minute is spent; its numbers are CPU numbers and its target checks say so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
DENSITY = 0.01
GPU_SIZES = (10**6, 10**7, 10**8, 10**9, 4 * 10**9)
DRY_SIZES = (2**10, 2**12)
BUDGETS_S = {"env": 10, "build": 75, "tests": 120, "selection": 75, "step": 40, "memory": 110}
DRY_BUDGETS_S = {"env": 10, "build": 30, "tests": 60, "selection": 20, "step": 20, "memory": 90}
GLOBAL_BUDGET_S = 470
# CUDA-only tests first, then the kernel test files (compiled for this GPU instead of interpreted).
GPU_TEST_FILES = ("tests/test_triton_select.py", "tests/test_triton_score.py",
                  "tests/test_triton_sparse_adamw.py", "tests/test_state_8bit.py",
                  "tests/test_sparse_adamw.py", "tests/test_streaming_select.py",
                  "tests/test_state_dict.py", "tests/test_lean.py")
DRY_TESTS = ("tests/test_streaming_select.py", "-k", "order_keys")
MEMORY_METHODS = ("sparse-lean", "sparse-4bit-delta", "adamw", "sparse-lean-8bit", "sparse",
                  "adamw8bit", "lora")
CASE_SINGLE_CALL_S = 5.0  # a case whose first call takes longer is timed by that call alone
KTHVALUE_MAX_N = 10**8  # torch.kthvalue runs one thread block per slice (see ANCHORS in docs)
TORCH_FLAT_LIMIT = 2**31 - 1
TARGETS = {
    "selection_copy_bw": "selection >= 60 % of copy bandwidth (N >= 1e9; bytes: 2 reads of θ, g + 4k)",
    "selection_vs_torch": "selection >= 3x faster than the best exact torch composition",
    "selection_vs_cub": "selection within 1.2x of the CUB baseline (ours / CUB <= 1.2)",
    "step_vs_fused_adamw": "sparse step (ρ = 1 %) >= 10x faster than dense fused AdamW",
}


# --------------------------------------------------------------------------------------------------
# Running stages under budgets
# --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    budget_s: float
    status: str = "not run"  # ok | failed | timed out | cut short | skipped | not run
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Run:
    """What every stage needs: options, device, deadlines, the output folder and the log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = args.dry
        self.out: Path = args.out
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.sizes = tuple(args.sizes) if args.sizes else (DRY_SIZES if self.dry else GPU_SIZES)
        self.budgets = dict(DRY_BUDGETS_S if self.dry else BUDGETS_S)
        self.t0 = time.perf_counter()
        self.global_budget = args.budget_s
        self.stage_deadline = float("inf")
        self.device_name = "?"
        self.log_path = self.out / "gpu-check.log"
        self.native = None
        self.copy_gbps: float | None = None

    def log(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        """Seconds left in the current stage (its budget, and the global budget)."""
        now = time.perf_counter()
        return min(self.stage_deadline - now, self.t0 + self.global_budget - now)

    def run_stage(self, stage: Stage, fn: Callable[["Run", Stage], None]) -> Stage:
        left = self.t0 + self.global_budget - time.perf_counter()
        if left < 5:
            stage.status = "skipped"
            stage.detail["reason"] = "global time budget spent"
            return stage
        budget = min(stage.budget_s, left)
        self.stage_deadline = time.perf_counter() + budget
        self.log(f"stage {stage.name}: budget {budget:.0f} s")
        start = time.perf_counter()
        try:
            stage.status = "ok"
            fn(self, stage)
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not end the run
            stage.status = "failed"
            stage.detail["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            self.log(f"stage {stage.name} failed: {stage.detail['error']}")
        stage.seconds = round(time.perf_counter() - start, 1)
        self.log(f"stage {stage.name}: {stage.status} in {stage.seconds} s")
        return stage

    def subprocess(self, cmd: list[str], log_name: str, env: dict | None = None) -> dict[str, Any]:
        """Run ``cmd`` within the stage's remaining time; its output goes to ``DIR/log_name``."""
        timeout = max(1.0, self.remaining())
        path = self.out / log_name
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"# device: {self.device_name}\n# $ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout)
                rc, timed_out = proc.returncode, False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
                f.write(f"\n# timed out after {timeout:.0f} s\n")
        text = path.read_text(encoding="utf-8", errors="replace")
        return {"cmd": " ".join(cmd), "returncode": rc, "timed_out": timed_out, "log": log_name,
                "tail": text[-1500:]}


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


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
    else:  # dry: one architecture, configured only
        cmd.append("-DCMAKE_CUDA_ARCHITECTURES=90")
    configure = run.subprocess(cmd, "build.log")
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
    from gallop_kernels import ops

    backend = ops.resolve_backend("auto", run.device)
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
    from gallop_kernels import ops, reference

    k = reference.k_for_density(n, DENSITY)
    floor = selection_floor_bytes(n, k, 2, 2)
    theta, grad = make_pair(n, torch.bfloat16, run.device, seed=11)

    def scores():
        return reference.compute_score(theta, grad, "gallop", EPS)

    impls: dict[str, tuple[Callable[[], Any], str | None]] = {
        f"ours: ops.select_indices ({backend})": (lambda: ops.select_indices(
            [theta], [grad], density=DENSITY, score="gallop", score_eps=EPS, seed=0,
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
            if ours_idx is None:
                ours_idx = got
            else:  # every exact implementation selects the same set
                row["same_indices_as_ours"] = bool(torch.equal(got, ours_idx))
            del got
            row.update(_timed(run, lambda _: fn(), [None]))
            row["gbps"] = floor / row["median_s"] / 1e9
            if run.copy_gbps:
                row["frac_copy_bw"] = row["gbps"] / run.copy_gbps
            run.log(f"selection N={n:.0e} {impl}: {row['median_s'] * 1e3:.3f} ms")
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as exc:
            row["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        _free(run.device)
    return rows


def stage_step(run: Run, stage: Stage) -> None:
    from benchmarks import baselines as bl
    from gallop_kernels import ops

    backend = ops.resolve_backend("auto", run.device)
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
    from benchmarks.cases import (ADAM_EPS, BETA1, BETA2, LR, WD, dense_adamw_bytes, make_pair,
                                  sparse_state, sparse_step_bytes)
    from gallop_kernels import ops, reference

    k = reference.k_for_density(n, DENSITY)
    theta, grad = make_pair(n, torch.bfloat16, run.device, seed=12)
    state = sparse_state(n, k, run.device, 12, theta)  # indices, m, v, master
    ours = f"ours: ops.sparse_adamw_update ({backend})"
    rows = [{"n": n, "k": k, "impl": ours, "role": "ours",
             "bytes_model": sparse_step_bytes(n, k, 2, 2, True)}]
    count = [0]

    def sparse_step(_):
        count[0] += 1
        ops.sparse_adamw_update([theta], [grad], *([x] for x in state), step=count[0], lr=LR,
                                beta1=BETA1, beta2=BETA2, eps=ADAM_EPS, weight_decay=WD,
                                backend=backend)

    rows[0].update(_timed(run, sparse_step, [None]))
    run.log(f"step N={n:.0e} {ours}: {rows[0]['median_s'] * 1e3:.3f} ms")
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
        except (RuntimeError, ValueError, TypeError, torch.cuda.OutOfMemoryError) as exc:
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


# --------------------------------------------------------------------------------------------------
# Targets and output
# --------------------------------------------------------------------------------------------------


def check_targets(stages: dict[str, Stage], dry: bool) -> list[dict[str, Any]]:
    """One row per target and N: the measured value and pass/fail (n/a where not measured)."""
    out: list[dict[str, Any]] = []
    sel = [r for r in stages["selection"].detail.get("rows", []) if "median_s" in r]
    step = [r for r in stages["step"].detail.get("rows", []) if "median_s" in r]

    def add(target, n, measured, ok, note=""):
        out.append({"target": target, "description": TARGETS[target], "n": n,
                    "measured": measured, "pass": ok, "dry": dry, "note": note})

    for n in sorted({r["n"] for r in sel}):
        rows = [r for r in sel if r["n"] == n]
        ours = next((r for r in rows if r["role"] == "ours"), None)
        if ours is None:
            continue
        if n >= 10**9 or dry:
            frac = ours.get("frac_copy_bw")
            add("selection_copy_bw", n, None if frac is None else f"{100 * frac:.1f} % of copy",
                None if frac is None else frac >= 0.6)
        torch_rows = [r for r in rows if r["impl"].startswith("torch:")]
        if torch_rows:
            best = min(torch_rows, key=lambda r: r["median_s"])
            speedup = best["median_s"] / ours["median_s"]
            add("selection_vs_torch", n, f"{speedup:.2f}x vs {best['impl']}", speedup >= 3)
        cub = [r for r in rows if r["impl"].startswith("CUB")]
        if cub:
            ratio = ours["median_s"] / cub[0]["median_s"]
            add("selection_vs_cub", n, f"ours / CUB = {ratio:.2f}", ratio <= 1.2)
        else:
            add("selection_vs_cub", n, None, None, "CUB baseline not run (build stage)")
    for n in sorted({r["n"] for r in step}):
        ours = next((r for r in step if r["n"] == n and r["role"] == "ours"), None)
        fused = next((r for r in step if r["n"] == n and "fused=True" in r["impl"]), None)
        if ours and fused:
            speedup = fused["median_s"] / ours["median_s"]
            add("step_vs_fused_adamw", n, f"{speedup:.1f}x", speedup >= 10)
    return out


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def render_markdown(data: dict[str, Any]) -> str:
    dev = data["device"]
    title = "GPU check" if not data["dry"] else "GPU check — DRY RUN on CPU"
    lines = [f"# {title}: {dev.get('name')} ({data['date']})", ""]
    if data["dry"]:
        lines += ["**Dry run**: every stage ran on the CPU at tiny sizes to prove the script works. "
                  "These are CPU numbers; they say nothing about any GPU target.", ""]
    lines += [f"- device: {dev.get('name')} ({dev.get('kind')}, driver {dev.get('driver')}, "
              f"CUDA {dev.get('cuda_runtime')}, capability {dev.get('capability')}, memory "
              f"{(dev.get('memory_bytes') or 0) / 2**30:.0f} GiB)",
              f"- software: {data['software']}",
              f"- copy bandwidth: {data.get('copy_gbps') or 0:.1f} GB/s; total "
              f"{data['elapsed_s']} s of a {data['budget_s']} s budget", "",
              "## Targets", "", "| target | N | measured | result |", "|---|---|---|---|"]
    for t in data["targets"]:
        res = {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]]
        if data["dry"] and t["pass"] is not None:
            res = f"dry run: would {'pass' if t['pass'] else 'fail'}"
        lines.append(f"| {t['description']} | {t['n']:.0e} | {t['measured'] or '—'} | {res}"
                     f"{(' — ' + t['note'].strip()) if t['note'] else ''} |")
    lines += ["", "## Stages", "", "| stage | status | seconds | budget | detail |",
              "|---|---|---|---|---|"]
    for s in data["stages"].values():
        detail = s["detail"].get("error") or s["detail"].get("reason") or ""
        if s["name"] == "tests":
            detail = "; ".join(f"{k}: {v.get('summary', v.get('skipped', ''))}"
                               for k, v in s["detail"].items() if isinstance(v, dict))
        if s["name"] == "build":
            detail = s["detail"].get("native_status", detail)
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget_s']} | "
                     f"{str(detail)[:300].replace('|', '/')} |")
    for name in ("selection", "step"):
        rows = data["stages"][name]["detail"].get("rows", [])
        lines += ["", f"## {name} (bf16 θ and g, ρ = {DENSITY:g})", "",
                  "| N | implementation | median | GB/s | % copy | note |", "|---|---|---|---|---|---|"]
        for r in rows:
            if "median_s" in r:
                gbps = r.get("gbps") or (r["bytes_model"] / r["median_s"] / 1e9)
                frac = r.get("frac_copy_bw")
                note = "" if r.get("same_indices_as_ours", True) else "DIFFERENT INDEX SET"
                lines.append(f"| {r['n']:.0e} | {r['impl']} | {_fmt_s(r['median_s'])} | "
                             f"{gbps:.1f} | {'' if frac is None else f'{100 * frac:.1f} %'} | {note} |")
            else:
                lines.append(f"| {r['n']:.0e} | {r['impl']} | skipped | | | {r.get('skipped')} |")
    mem = data["stages"]["memory"]["detail"]
    lines += ["", f"## Memory ({mem.get('config')}, seq {mem.get('seq')}, {mem.get('device')})", "",
              "| method | predicted | measured | error |", "|---|---|---|---|"]
    for r in mem.get("rows", []):
        meas = f"{r['measured'] / 2**30:.2f} GiB" if r.get("measured") else r.get("reason", "")
        err = f"{r['error_pct']:+.1f} %" if r.get("error_pct") is not None else ""
        lines.append(f"| {r['label']} | {r['predicted'] / 2**30:.2f} GiB | {meas} | {err} |")
    for s in mem.get("skipped", []):
        lines.append(f"| {s['method']} | | skipped: {s['reason']} | |")
    lines.append("")
    return "\n".join(lines)


def _version(module: str) -> str | None:
    """Installed version without importing (bitsandbytes' import alone takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown, logs")
    parser.add_argument("--dry", action="store_true",
                        help="run every stage on the CPU at tiny sizes (CI): proves the script works")
    parser.add_argument("--budget-s", type=float, default=GLOBAL_BUDGET_S,
                        help=f"global time budget in seconds (default {GLOBAL_BUDGET_S})")
    parser.add_argument("--sizes", type=lambda t: [int(float(x)) for x in t.split(",") if x],
                        default=None, help="comma-separated N instead of the default sweep")
    parser.add_argument("--stages", default=",".join(BUDGETS_S),
                        help="comma-separated subset of: " + ", ".join(BUDGETS_S))
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; use --dry to check the script on a CPU",
              file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(BUDGETS_S)
    if unknown:
        print(f"benchmarks.gpu_check: unknown stage(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry:
        torch.set_num_threads(1)
    run = Run(args)
    fns = {"env": stage_env, "build": stage_build, "tests": stage_tests,
           "selection": stage_selection, "step": stage_step, "memory": stage_memory}
    stages: dict[str, Stage] = {}
    for name, fn in fns.items():
        stage = Stage(name, run.budgets[name])
        if name in wanted or name == "env":  # env names the device in every file
            run.run_stage(stage, fn)
        else:
            stage.status = "skipped"
            stage.detail["reason"] = "not in --stages"
        stages[name] = stage
    now = _dt.datetime.now(_dt.timezone.utc)
    env = stages["env"].detail
    data = {
        "schema": 1, "dry": args.dry, "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": env.get("device", {"name": run.device_name}),
        "software": env.get("software", {}), "copy_gbps": run.copy_gbps,
        "elapsed_s": round(time.perf_counter() - run.t0, 1), "budget_s": args.budget_s,
        "sizes": list(run.sizes), "density": DENSITY,
        "stages": {n: {"name": s.name, "status": s.status, "seconds": s.seconds,
                       "budget_s": s.budget_s, "detail": s.detail} for n, s in stages.items()},
        "targets": check_targets(stages, args.dry),
    }
    from benchmarks.environment import device_slug

    slug = device_slug(data["device"]) if "kind" in data["device"] else "unknown-device"
    stem = f"gpu-check-{slug}-{data['date']}" + ("-dry" if args.dry else "")
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(render_markdown(data))
    run.log(f"wrote {args.out / stem}.json and .md")
    bad = [s.name for s in stages.values() if s.status in ("failed", "timed out")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
