"""Rendering: the Markdown report and the PNG plots of a results dict (``benchmarks.collect``).

Both are functions of the JSON alone, so ``python -m benchmarks.report --render FILE.json``
re-renders an old run without timing anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
              "Formula rows (`gallop_kernels/memory/methods.py`, the one state formula): bf16 parameters; SparseAdamW keeps an int32 index and fp32 m, v and "
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


def rerender(path: Path, no_plots: bool = False) -> int:
    """Markdown and plots again from a results JSON (they are functions of it)."""
    data = json.loads(Path(path).read_text())
    out_dir, stem = Path(path).parent, Path(path).stem
    plots = data.get("plots", {}) if no_plots else render_plots(data, out_dir, stem)
    (out_dir / f"{stem}.md").write_text(render_markdown(data, plots))
    print(f"re-rendered {out_dir / (stem + '.md')}" + (f" and {len(plots)} plots" if plots else ""))
    return 0
