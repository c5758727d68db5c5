"""Run the benchmark suite and write the report: JSON, Markdown and PNG plots.

    python -m benchmarks.report              # GPU mode on a CUDA machine, CPU mode elsewhere
    python -m benchmarks.report --quick      # tiny CPU sizes, seconds (what CI runs)
    gallop bench [same options]

Writes ``<out>/<device>-<date>[-<tag>].json`` and ``.md``, and ``...-<plot>.png``. Every timed row
names its device, size, dtype, density and the baselines measured in the same run (see
``benchmarks/README.md`` for every field).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
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
    "Full GPU report (`python -m benchmarks.report --mode gpu`, N = 1e6 … 4e9, bf16) on an H100: "
    "Triton kernels (score+histogram, radix select, compaction, whole selection, sparse AdamW) beside "
    "torch.topk/kthvalue/sort (chunked where needed), the CUB threshold and plain CUDA sparse AdamW "
    "of kernels/ (build with CMake first), torch AdamW fused/foreach and bitsandbytes AdamW8bit.",
    "SparseAdamW.step() selection and steady steps against density (0.1 %, 1 %, 10 %) at N = 1e9.",
    "The native baselines in kernels/ compile with nvcc 13.0 (sm_80, sm_90) but have not been run.",
]


# --------------------------------------------------------------------------------------------------
# Device and software description
# --------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = None
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        return {
            "kind": "cuda",
            "name": props.name,
            "driver": driver,
            "cuda_runtime": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
        }
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    return {
        "kind": "cpu",
        "name": _cpu_name(),
        "driver": None,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "platform": platform.platform(),
    }


def software_info(env) -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: no version
            return None

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "gallop_kernels": version("gallop_kernels"),
        "git_commit": commit,
        "native_baselines": env.native_status,
        "native_topk_method": getattr(env.native, "topk_method", None),
        "bitsandbytes_status": env.bnb_status,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def device_slug(info: dict[str, Any]) -> str:
    name = info["name"] if info["kind"] == "cuda" else f"cpu-{info['name']}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(r|tm|cpu-@.*|with-radeon.*)$", "", slug)
    return slug[:60]


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
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return {"status": "skipped: TRITON_INTERPRET=1 was not set before the kernels were imported"}
    out: dict[str, Any] = {"status": "ran", "where": "Triton interpreter (CPU), not timed"}
    from gallop_kernels import reference

    try:
        from gallop_kernels.ops.select import triton_select
        from gallop_kernels.ops.sparse_adamw import triton_sparse_adamw_step
    except ImportError as exc:
        return {"status": f"skipped: Triton launchers not importable ({exc})"}
    from benchmarks.cases import make_pair, sparse_state
    from benchmarks.stages import TritonStages

    t0 = time.perf_counter()
    a = make_pair(1000, torch.bfloat16, torch.device("cpu"), 1)
    b = make_pair(2001, torch.float32, torch.device("cpu"), 2)
    params, grads = [a[0], b[0]], [a[1], b[1]]
    k = reference.k_for_density(3001, 0.01)
    ours = triton_select(params, grads, k, "gallop")
    ref = reference.select(params, grads, 0.01, "gallop")
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
    triton_sparse_adamw_step([theta], [grad], [idx], [m], [v], [w], 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    reference.sparse_adamw_step(t2, grad, idx, m2, v2, w2, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
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
    log(f"gallop bench: mode={mode} device={dev['name']} dtype={dtype}")
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
        formula = C.state_bytes_formula(name, n, dens)
        rows.append({"source": "measured", "model": f"{len(C.split_sizes(n))}-tensor model", "params": n,
                     "dtype": str(dtype).replace("torch.", ""), "optimizer": name,
                     "state_bytes": measured, "formula_bytes": formula,
                     "bytes_per_param": measured / n})
        del opt, params
        _free(env.device)
    return rows


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_n(n: int) -> str:
    if n >= 10**9 and n % 10**8 == 0:
        return f"{n / 1e9:g}e9"
    if n >= 10**5 and n % 10**4 == 0:
        exp = len(str(n)) - 1
        return f"{n / 10**exp:g}e{exp}"
    if n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}"


def _fmt_bytes(b: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _load(dev: dict[str, Any]) -> str:
    a, b = dev.get("load_average_at_start"), dev.get("load_average_at_end")
    if not a:
        return "unknown"
    text = f"{a[0]:.1f} at start"
    if b:
        text += f", {b[0]:.1f} at end"
    busy = max(a[0], b[0] if b else 0) > (dev.get("cores") or 1)
    return text + (" — busy machine: other processes competed for the cores, numbers are noisy"
                   if busy else "")


def render_markdown(data: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    dev = data["device"]
    sw = data["software"]
    cpu = dev["kind"] == "cpu"
    lines = []
    title = f"# gallop_kernels benchmarks — {dev['name']} ({data['date']}, mode {data['mode']})"
    lines += [title, ""]
    if cpu:
        lines += ["**CPU numbers.** These were measured on a CPU with the torch backend; they say "
                  "nothing about the Triton kernels' GPU speed. The Triton kernels ran only in the "
                  "interpreter, as a correctness check (below). GPU numbers are owed (last section).", ""]
    lines += [
        f"- device: {dev['name']} ({dev['kind']}"
        + (f", driver {dev.get('driver')}, CUDA {dev.get('cuda_runtime')}, capability {dev.get('capability')}"
           if not cpu else f", {dev.get('cores')} cores, torch threads {dev.get('torch_threads')}, "
           f"load average {_load(dev)}")
        + ")",
        f"- software: torch {sw['torch']}, triton {sw['triton']}, bitsandbytes {sw['bitsandbytes']}, "
        f"Python {sw['python']}, commit {str(sw['git_commit'])[:10]}",
        f"- native baselines: {sw['native_baselines']}",
        f"- bitsandbytes: {sw['bitsandbytes_status']}",
        f"- measured copy bandwidth: **{data['copy_bandwidth']['gbps']:.1f} GB/s** "
        f"({data['copy_bandwidth']['method']})",
        f"- dtype of θ and g: {data['settings']['dtype']}; statistic: median; "
        f"inputs: {data['settings']['inputs']}",
        "",
        "GB/s is the op's modelled traffic (per kernel, below) over the median time; \"% copy\" is "
        "that over the measured copy bandwidth, i.e. how close the op is to its floor. "
        "\"vs ours\" is the row's time over our implementation's time in the same run "
        "(> 1: ours is faster).",
        "",
    ]
    if cpu:
        lines += ["On a CPU the small cases' working sets fit in the caches, so their GB/s can exceed "
                  "the copy bandwidth (measured on buffers far larger than the caches).", ""]
    by_kernel: dict[str, list[dict]] = {}
    for r in data["results"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, rows in by_kernel.items():
        lines += [f"## {kernel}", "", data["kernels"].get(kernel, ""), ""]
        lines += ["| N | ρ | k | implementation | median | GB/s | % copy | vs ours |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = sorted(rows, key=lambda r: (r["n"], r["density"], r["role"] != "ours"))
        for r in rows:
            impl = ("**" + r["impl"] + "**") if r["role"] == "ours" else r["impl"]
            if r.get("note"):
                impl += f" <br><sub>{r['note']}</sub>"
            if "median_s" not in r:
                lines.append(f"| {_fmt_n(r['n'])} | {r['density']:g} | {r['k']:,} | {impl} | "
                             f"skipped: {r.get('skipped', '?')} | | | |")
                continue
            gbps = f"{r['gbps']:.2f}" if "gbps" in r else ""
            frac = f"{100 * r['frac_copy_bw']:.1f} %" if "frac_copy_bw" in r else ""
            vs = f"{r['vs_ours']:.2f}×" if "vs_ours" in r else ("—" if r["role"] == "ours" else "")
            lines.append(f"| {_fmt_n(r['n'])} | {r['density']:g} | {r['k']:,} | {impl} | "
                         f"{_fmt_time(r['median_s'])} | {gbps} | {frac} | {vs} |")
        lines.append("")
    lines += ["## Optimizer state memory", "",
              "Formula rows: bf16 parameters; SparseAdamW keeps an int32 index and fp32 m, v and "
              "master per selected entry (16 B); torch AdamW keeps m, v in the param dtype; "
              "AdamW8bit keeps uint8 m, v and an fp32 absmax per 256-block of each.", ""]
    formula = [r for r in data["memory"] if r["source"] == "formula"]
    models = list(dict.fromkeys(r["model"] for r in formula))
    opts = list(dict.fromkeys(r["optimizer"] for r in formula))
    lines += ["| model (params) | " + " | ".join(opts) + " |",
              "|---|" + "---|" * len(opts)]
    for model in models:
        cells = []
        count = None
        for o in opts:
            r = next(x for x in formula if x["model"] == model and x["optimizer"] == o)
            count = r["params"]
            cells.append(_fmt_bytes(r["state_bytes"]))
        lines.append(f"| {model} ({count / 1e9:.2f} B) | " + " | ".join(cells) + " |")
    measured = [r for r in data["memory"] if r["source"] == "measured"]
    if measured:
        lines += ["", f"Measured on {dev['name']} (state tensors actually allocated after one step):", "",
                  "| optimizer | params | state | bytes/param | formula |", "|---|---|---|---|---|"]
        for r in measured:
            if "skipped" in r:
                lines.append(f"| {r['optimizer']} | {r['params']:,} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {r['optimizer']} | {r['params']:,} | {_fmt_bytes(r['state_bytes'])} | "
                             f"{r['bytes_per_param']:.3f} | {_fmt_bytes(r['formula_bytes'])} |")
    lines += ["", "## Checks", ""]
    for key, val in data["checks"].items():
        lines.append(f"- {key}: {val}")
    if plots:
        lines += ["", "## Plots", ""]
        for name, path in plots.items():
            lines.append(f"![{name}]({path})")
    lines += ["", "## Owed GPU runs", ""]
    if data["owed"]:
        lines += [f"- {o}" for o in data["owed"]]
    else:
        lines.append("- none for this device")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def render_plots(data: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """PNG plots beside the JSON; returns {name: file name}. Needs matplotlib (extra "bench")."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    dev = data["device"]
    tag = f"{dev['name']}" + (" — CPU numbers, torch backend" if dev["kind"] == "cpu" else "")
    timed = [r for r in data["results"] if "median_s" in r]
    files: dict[str, str] = {}

    def series(kernel, density=0.01):
        out: dict[str, list[tuple[int, dict]]] = {}
        for r in timed:
            if r["kernel"] == kernel and r["density"] == density:
                out.setdefault(r["impl"], []).append((r["n"], r))
        return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}

    kernels = [k for k in ("selection", "radix_select", "sparse_step", "optimizer_steady_step",
                           "optimizer_select_step", "score_histogram", "compaction")
               if any(r["kernel"] == k for r in timed)]
    for what in ("time", "gbps"):
        if not kernels:
            break
        cols = 2
        rows_n = (len(kernels) + 1) // 2
        fig, axes = plt.subplots(rows_n, cols, figsize=(13, 4.2 * rows_n), squeeze=False)
        for ax, kernel in zip(axes.flat, kernels):
            for impl, pts in series(kernel).items():
                if len(pts) < 1:
                    continue
                xs = [n for n, _ in pts]
                ys = [r["median_s"] * 1e3 if what == "time" else r.get("gbps", float("nan")) for _, r in pts]
                ours = pts[0][1]["role"] == "ours"
                ax.plot(xs, ys, marker="o", lw=2.5 if ours else 1.2, ls="-" if ours else "--",
                        label=impl[:55])
            if what == "gbps":
                ax.axhline(data["copy_bandwidth"]["gbps"], color="k", lw=0.8, ls=":",
                           label="measured copy bandwidth")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (entries)")
            ax.set_ylabel("median time (ms)" if what == "time" else "achieved GB/s (modelled bytes)")
            ax.set_title(f"{kernel}, ρ = 1 %", fontsize=10)
            ax.legend(fontsize=6.5)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(kernels):]:
            ax.axis("off")
        fig.suptitle(f"{'Time' if what == 'time' else 'Achieved bandwidth'} against N — {tag} "
                     f"({data['settings']['dtype']}, {data['date']})", fontsize=11)
        fig.tight_layout()
        name = f"{stem}-{what}-vs-n.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files[f"{what} against N"] = name

    dn = data["settings"]["density_sweep_n"]
    dk = [k for k in ("sparse_step", "optimizer_steady_step", "optimizer_select_step")
          if any(r["kernel"] == k and r["n"] == dn for r in timed)]
    if dk:
        fig, axes = plt.subplots(1, len(dk), figsize=(6 * len(dk), 4.2), squeeze=False)
        for ax, kernel in zip(axes.flat, dk):
            impls: dict[str, list] = {}
            for r in timed:
                if r["kernel"] == kernel and r["n"] == dn:
                    impls.setdefault(r["impl"], []).append((r["density"], r))
            for impl, pts in impls.items():
                pts.sort(key=lambda t: t[0])
                ours = pts[0][1]["role"] == "ours"
                ax.plot([d * 100 for d, _ in pts], [r["median_s"] * 1e3 for _, r in pts], marker="o",
                        lw=2.5 if ours else 1.2, ls="-" if ours else "--", label=impl[:55])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("density ρ (%)")
            ax.set_ylabel("median step time (ms)")
            ax.set_title(f"{kernel}, N = {_fmt_n(dn)}", fontsize=10)
            ax.legend(fontsize=6.5)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"Step time against density — {tag}", fontsize=11)
        fig.tight_layout()
        name = f"{stem}-step-vs-density.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files["step time against density"] = name

    formula = [r for r in data["memory"] if r["source"] == "formula"]
    if formula:
        fig, ax = plt.subplots(figsize=(8, 5))
        for opt in dict.fromkeys(r["optimizer"] for r in formula):
            pts = sorted((r["params"], r["state_bytes"]) for r in formula if r["optimizer"] == opt)
            ax.plot([p for p, _ in pts], [b / 2**30 for _, b in pts], marker="o", label=opt)
        ax.axhline(80, color="k", ls=":", lw=0.8, label="80 GiB (one H100)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters")
        ax.set_ylabel("optimizer state (GiB)")
        ax.set_title("Optimizer state against model size (bf16 params; formulas checked by the "
                     "measured table)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        name = f"{stem}-state-memory.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files["optimizer state against model size"] = name
    return files


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def rerender(path: Path, no_plots: bool = False) -> int:
    """Markdown and plots again from a results JSON (they are functions of it)."""
    data = json.loads(Path(path).read_text())
    out_dir, stem = Path(path).parent, Path(path).stem
    plots = data.get("plots", {}) if no_plots else render_plots(data, out_dir, stem)
    (out_dir / f"{stem}.md").write_text(render_markdown(data, plots))
    print(f"re-rendered {out_dir / (stem + '.md')}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "render", None):
        return rerender(args.render, args.no_plots)
    cuda = torch.cuda.is_available()
    mode = args.mode
    if mode == "auto":
        mode = "gpu" if cuda else "cpu"
    if mode == "gpu" and not cuda:
        print("gallop bench: --mode gpu needs a CUDA device; this machine has none "
              "(use --mode cpu or --quick for CPU numbers)", file=sys.stderr)
        return 2
    if not cuda:
        # The interpreter checks need it before any kernel module is imported (read at @jit time).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    threads = args.threads if args.threads else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    groups = [g.strip() for g in args.kernels.split(",")] if args.kernels else list(KERNEL_GROUPS)
    unknown = set(groups) - set(KERNEL_GROUPS)
    if unknown:
        print(f"gallop bench: unknown kernel group(s) {sorted(unknown)}; choose from {KERNEL_GROUPS}",
              file=sys.stderr)
        return 2
    sizes = _parse_sizes(args.sizes) if args.sizes else None
    t0 = time.perf_counter()
    data = collect(mode, device, dtype, sizes, groups)
    data["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        data["device"]["load_average_at_end"] = list(os.getloadavg())

    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag if args.tag else ("quick" if mode == "quick" else None)
    stem = f"{device_slug(data['device'])}-{data['date']}" + (f"-{tag}" if tag else "")
    plots = {} if args.no_plots else render_plots(data, out_dir, stem)
    data["plots"] = plots
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(render_markdown(data, plots))
    print(f"wrote {out_dir / (stem + '.json')}, {stem}.md" + (f" and {len(plots)} plots" if plots else "")
          + f" in {data['elapsed_s']} s")
    return 0


def register(subparsers):
    """Add the ``bench`` subcommand to a CLI (the same as gallop_kernels.bench.register)."""
    from gallop_kernels.bench import register as _register

    return _register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    from gallop_kernels.bench import add_arguments

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
