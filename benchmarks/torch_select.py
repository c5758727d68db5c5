"""The torch backend's selection against the plain exact composition, in one run on the same data.

    python -m benchmarks.torch_select                     # N = 1e6, 4e6, 1.6e7; 1 thread
    python -m benchmarks.torch_select --sizes 1.35e8 --out benchmarks/results

The composition is what a user writes for the exact rule with torch alone: the scores of every
tensor of the group (``select_naive.compute_score``), concatenated; ``torch.kthvalue`` for the k-th
largest; the entries above it plus the lowest-index ties; split back per tensor. Ours is
``SparseAdamW(backend="torch").select()`` on the same parameters and gradients (it also installs
the optimizer state of the selection), and ``ops.select.streaming.select`` alone. Both select the same
index set (checked before timing). The ratio (ours / composition, median of interleaved rounds)
is what issue 9 bounds at 1.5.

Writes ``torch-select-<device>-<date>.json`` and ``.md`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.baselines import exact_compact, kthvalue_threshold
from benchmarks.cases import make_model
from benchmarks.environment import device_info, device_slug
from benchmarks.timing import measure_interleaved

DENSITY = 0.01
DEFAULT_SIZES = (10**6, 4 * 10**6, 16 * 10**6)


def composition(params: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Score, kthvalue, above + lowest-index ties, split per tensor (exact, whole group in memory)."""
    from gallop_kernels import rules
    from gallop_kernels.ops.select import naive as select_naive

    scores, offset = [], 0
    for p in params:
        scores.append(select_naive.compute_score(p, p.grad, "gallop", 1e-8, 0, offset))
        offset += p.numel()
    flat = torch.cat(scores)
    k = rules.k_for_density(flat.numel(), density)
    chosen = exact_compact(flat, kthvalue_threshold(flat, k), k)
    out, start = [], 0
    for p in params:
        lo, hi = torch.searchsorted(chosen, start), torch.searchsorted(chosen, start + p.numel())
        out.append(chosen[lo:hi] - start)
        start += p.numel()
    return out


def run_size(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict[str, Any]:
    from gallop_kernels import SparseAdamW, rules
    from gallop_kernels.ops.select import streaming

    params = make_model(n, dtype, device, seed=5)
    opt = SparseAdamW(params, lr=1e-5, density=DENSITY, backend="torch")
    k = rules.k_for_density(n, DENSITY)
    grads = [p.grad for p in params]

    want = composition(params, DENSITY)
    opt.select()
    got = [opt.selected_indices(p) for p in params]
    if not all(torch.equal(a.cpu(), b.cpu().to(torch.int64)) for a, b in zip(want, got)):
        raise AssertionError(f"N={n}: SparseAdamW.select() and the composition disagree")

    fns = {
        "composition": lambda: composition(params, DENSITY),
        "select": opt.select,
        "streaming_select": lambda: streaming.select(params, grads, k, "gallop", 1e-8),
    }
    m = measure_interleaved(fns, device, reps=reps, target_s=2.0)
    base = m["composition"].median_s
    return {
        "n": n, "k": k, "tensors": len(params), "dtype": str(dtype).replace("torch.", ""),
        "density": DENSITY,
        "timings": {name: x.as_dict() for name, x in m.items()},
        "ratio_select_vs_composition": m["select"].median_s / base,
        "ratio_streaming_vs_composition": m["streaming_select"].median_s / base,
    }


def software_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def render(data: dict[str, Any]) -> str:
    dev = data["device"]
    tag = f" [{data['tag']}]" if data.get("tag") else ""
    lines = [
        f"# Torch backend selection vs the exact composition — {dev['name']} ({data['date']}){tag}",
        "",
        f"- gallop_kernels imported from {data.get('gallop_kernels_path')} (benchmarks at commit "
        f"{str(data.get('git_commit'))[:10]})",
        f"- device: {dev['name']} ({dev['kind']}, torch threads {data['threads']}, load average "
        f"{dev.get('load_average_at_start')})",
        f"- torch {torch.__version__}; θ, g {data['rows'][0]['dtype'] if data['rows'] else '?'}, "
        f"ρ = {DENSITY}, score gallop, 7 tensors per group (attention 4×, MLP 3×)",
        "- composition: score, cat, torch.kthvalue, above + lowest-index ties, split per tensor",
        "- median of interleaved rounds (one call of each per round; at least 7, more for small N); "
        "ratio = ours / composition",
        "",
        "| N | k | rounds | composition | SparseAdamW.select() | ratio | streaming_select | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        t = r["timings"]
        lines.append(
            f"| {r['n']:,} | {r['k']:,} | {t['composition']['reps']} | "
            f"{t['composition']['median_s'] * 1e3:.1f} ms | "
            f"{t['select']['median_s'] * 1e3:.1f} ms | {r['ratio_select_vs_composition']:.2f} | "
            f"{t['streaming_select']['median_s'] * 1e3:.1f} ms | "
            f"{r['ratio_streaming_vs_composition']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_select",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                        help="comma-separated N (e.g. 1e6,4e6)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--reps", type=int, default=7,
                        help="interleaved rounds at least (more for small N, up to 2 s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write JSON + Markdown here")
    parser.add_argument("--tag", default=None, help="suffix of the output names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    dev = device_info(device)
    rows = []
    for n in sizes:
        row = run_size(n, getattr(torch, args.dtype), device, args.reps)
        t = row["timings"]
        print(f"N={n:>12,d}  composition {t['composition']['median_s'] * 1e3:9.1f} ms  "
              f"select {t['select']['median_s'] * 1e3:9.1f} ms  ratio "
              f"{row['ratio_select_vs_composition']:.2f}  streaming_select "
              f"{t['streaming_select']['median_s'] * 1e3:9.1f} ms", flush=True)
        rows.append(row)
    now = _dt.datetime.now(_dt.timezone.utc)
    import gallop_kernels

    data = {"date": now.strftime("%Y-%m-%d"), "timestamp": now.isoformat(timespec="seconds"),
            "device": dev, "threads": torch.get_num_threads(), "tag": args.tag,
            "gallop_kernels_path": str(Path(gallop_kernels.__file__).parent),
            "git_commit": software_commit(), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"torch-select-{device_slug(dev)}-{data['date']}" + (f"-{args.tag}" if args.tag else "")
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(render(data))
        print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
