"""One prepared GPU run: build, compile, test, time and measure on one H200 in under 8 minutes.

    python -m benchmarks.gpu_check --out DIR          # on the GPU machine
    python -m benchmarks.gpu_check --out DIR --dry    # every stage on a CPU, at tiny sizes (CI)

It runs on the lent image as it is (torch 2.11 + triton 3.6.0, Python 3.12; no bitsandbytes, gguf
or trl; nothing installed): baselines and memory rows whose package is missing are skipped with
the reason. Each stage runs in its own process with a hard timeout (`benchmarks.gpu_run`): a stage
that crashes or hangs loses only itself, and ``DIR/gpu-check-<device>-<date>.json`` and ``.md``
are rewritten after every stage, so a run stopped at any point still leaves its report.

=========  ======  ==========================================================================
stage      budget  what it does
=========  ======  ==========================================================================
env          15 s  device (name, driver, memory), software, measured copy bandwidth
build        40 s  ``cmake`` + build of the native baselines (``kernels/``: CUB threshold, plain
                   sparse AdamW) for this GPU's architecture only
compile     120 s  every kernel variant the launchers emit (both selection shapes, ~1400;
                   the magnitude-floor ones last), compiled for this GPU on all its cores into
                   Triton's cache
tests        85 s  pytest of the kernel test files, compiled for this GPU (warm: the compile
                   stage compiled every variant they launch), the CUDA-only tests among them
selection    75 s  exact top-k at N = 1e6, 1e7, 1e8, 1e9, 4e9 (bf16 θ and g, ρ = 1 %): ours
                   (``ops.select.select``, Triton on CUDA; and the other selection shape)
                   beside the exact torch compositions (score + topk threshold + ties, score +
                   kthvalue + ties, score + stable sort) and the CUB baseline
step         35 s  sparse AdamW at the same N, ρ = 1 % (``ops.adamw.sparse_adamw``) beside dense
                   ``torch.optim.AdamW(fused=True)`` and bitsandbytes ``AdamW8bit`` (where it is
                   installed, and only below 2^31 entries: its kernels count in an int32)
memory       90 s  ``gallop memory``'s measure mode on the Llama-3-8B shape (seq 2048, batch 1),
                   most telling rows first, only rows whose package is there and that are
                   predicted to fit in 85 % of the device memory, as many as the budget allows
=========  ======  ==========================================================================

Then the targets of issue 9 are checked against the numbers of this run: selection >= 60 % of the
copy bandwidth for N >= 1e9 (bytes: the floor, two reads of θ and g + 4k), >= 3x faster than the
best exact torch composition, within 1.2x of the CUB baseline; the step >= 10x faster than dense
fused AdamW at ρ = 1 %. ``DIR`` gets ``gpu-check-<device>-<date>.json`` and ``.md`` (target,
measured, pass/fail) and a log per stage, every file naming the device.

Time estimate on one H200 (why the budgets fit 8 minutes; each budget includes its process's
start-up, ~3-5 s of Python and torch imports, and is a hard limit). env: the copy of 1 GiB and
device queries, < 5 s. build: nvcc for one architecture, ~25 s (measured on a 2-core CPU: 27 s).
compile: ~1400 variants at ~1-2 s of one core each (measured here: ~1.4 s on a loaded 2-core
VM) over the image's 16 cores: 90-170 s; the ~500 floored variants come last and the kernel tests
launch none of them, so a compile cut at its budget leaves the tests warm all the same. tests: the
kernel files with warm kernels: mostly small launches, ~30-60 s. selection: the bandwidth floor
(`docs/design.md#kernels`) is one read of bf16 θ and g = 4 B/entry per pass; at N = 4e9 that is
16 GB per pass, 3.3 ms on an H200 (~4.8 TB/s); our selection makes ~1-2 reads (~7 ms); the torch
compositions materialise fp32 scores (write + read 32 GB) and make several passes over them
(topk: ~4 passes of 16 GB): ~50-100 ms a call. With 2 warm-up calls and at most 10 timed calls per
case, the sizes from 1e6 to 4e9 take ~15 s of timing plus data generation (~2 s per 4e9 pair);
kthvalue and sort are skipped where they cannot take the size. step: dense fused AdamW at 4e9
moves 14 B/param = 56 GB (~12 ms a step), the sparse step ~1.4 GB (< 1 ms): ~10 s. memory: each
8B row builds the model in a fresh process (random weights, ~30-60 s a row): one to three rows
fit. Sum of budgets: 460 s; the global budget (``--budget-s``, 470 s) leaves the rest of the
8 minutes for the parent process.

``--dry`` runs every stage on the CPU: the Triton launch path in the interpreter
(``TRITON_INTERPRET=1``; selection and step through the Triton backend) at N = 2^10 and 2^12,
the compile gate's subset for sm_90, one small interpreted test of each op, the ``llama-tiny``
memory row, and the native build for sm_90 where nvcc is (CI: a broken ``.cu`` fails it); its
numbers are CPU numbers and its target checks say so. CI runs it in a venv shaped like the
image (`.ci/toolchains.sh`: triton 3.6.0, no bitsandbytes, gguf or trl).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.gpu_run import Stage, run_stage_process
from benchmarks.gpu_stages import DENSITY, STAGES

GPU_SIZES = (10**6, 10**7, 10**8, 10**9, 4 * 10**9)
DRY_SIZES = (2**10, 2**12)
BUDGETS_S = {"env": 15, "build": 40, "compile": 120, "tests": 85, "selection": 75, "step": 35,
             "memory": 90}
DRY_BUDGETS_S = {"env": 30, "build": 150, "compile": 150, "tests": 150, "selection": 150,
                 "step": 90, "memory": 120}
GLOBAL_BUDGET_S = 470
TARGETS = {
    "selection_copy_bw": "selection >= 60 % of copy bandwidth (N >= 1e9; bytes: 2 reads of θ, g + 4k)",
    "selection_vs_torch": "selection >= 3x faster than the best exact torch composition",
    "selection_vs_cub": "selection within 1.2x of the CUB baseline (ours / CUB <= 1.2)",
    "step_vs_fused_adamw": "sparse step (ρ = 1 %) >= 10x faster than dense fused AdamW",
}


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
            detail = s["detail"].get("native_status") or s["detail"].get("library") or detail
        if s["name"] == "compile" and "compiled" in s["detail"]:
            d = s["detail"]
            detail = (f"{d['compiled']} variants for {d['arch']} on {d['jobs']} cores; "
                      f"{d.get('toolchain', {})}" + (f"; FAILED: {d['failed']}" if d["failed"] else "")
                      + (f"; {detail}" if detail else ""))
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget_s']} | "
                     f"{str(detail)[:300].replace('|', '/')} |")
    for name in ("selection", "step"):
        detail = data["stages"][name]["detail"]
        rows = detail.get("rows", [])
        shape = f"; selection shape {detail['shape']}" if detail.get("shape") else ""
        lines += ["", f"## {name} (bf16 θ and g, ρ = {DENSITY:g}; ours: backend "
                  f"{detail.get('backend', '?')}{shape})", "",
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown, logs")
    parser.add_argument("--dry", action="store_true",
                        help="run every stage on the CPU at tiny sizes (CI): proves the script works")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's budget and the global one (a slow or shared "
                             "machine; the tests use it so that they never depend on its speed)")
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
    budgets = {name: b * args.budget_scale
               for name, b in (DRY_BUDGETS_S if args.dry else BUDGETS_S).items()}
    sizes = tuple(args.sizes) if args.sizes else (DRY_SIZES if args.dry else GPU_SIZES)
    global_budget = args.budget_s * args.budget_scale
    t0 = time.perf_counter()
    context: dict[str, Any] = {}
    stages = {name: Stage(name, round(budgets[name], 1)) for name in STAGES}
    for name in STAGES:
        stage = stages[name]
        left = global_budget - (time.perf_counter() - t0)
        if name not in wanted and name != "env":  # env names the device in every file
            stage.status, stage.detail["reason"] = "skipped", "not in --stages"
        elif left < 5:
            stage.status, stage.detail["reason"] = "skipped", "global time budget spent"
        else:
            stages[name], context = run_stage_process(
                name, min(budgets[name], left), dry=args.dry, out=args.out, sizes=sizes,
                context=context)
            stages[name].budget_s = round(budgets[name], 1)
        path = write_report(args, stages, context, sizes, t0)  # after every stage
    print(f"benchmarks.gpu_check: wrote {path} and .md", flush=True)
    bad = [s.name for s in stages.values() if s.status in ("failed", "timed out")]
    return 1 if bad else 0


def write_report(args, stages: dict[str, Stage], context: dict, sizes, t0: float) -> Path:
    """The JSON and Markdown report of the stages so far (rewritten after every stage)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    env = stages["env"].detail
    data = {
        "schema": 2, "dry": args.dry, "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": env.get("device", {"name": context.get("device_name", "?")}),
        "software": env.get("software", {}), "copy_gbps": context.get("copy_gbps"),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "budget_s": round(args.budget_s * args.budget_scale, 1),
        "sizes": list(sizes), "density": DENSITY,
        "stages": {n: {"name": s.name, "status": s.status, "seconds": s.seconds,
                       "budget_s": s.budget_s, "detail": s.detail} for n, s in stages.items()},
        "targets": check_targets(stages, args.dry),
    }
    from benchmarks.environment import device_slug

    slug = device_slug(data["device"]) if "kind" in data["device"] else "unknown-device"
    stem = f"gpu-check-{slug}-{data['date']}" + ("-dry" if args.dry else "")
    for old in args.out.glob("gpu-check-unknown-device-*"):  # named before env knew the device
        old.unlink()
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(render_markdown(data))
    return args.out / f"{stem}.json"

if __name__ == "__main__":
    sys.exit(main())
