"""Run the benchmark suite and write the report: JSON, Markdown and PNG plots.

    python -m benchmarks.report              # GPU mode on a CUDA machine, CPU mode elsewhere
    python -m benchmarks.report --quick      # tiny CPU sizes, seconds (what CI runs)

Writes ``<out>/<device>-<date>[-<tag>].json`` and ``.md``, and ``...-<plot>.png``. Every timed row
names its device, size, dtype, density and the baselines measured in the same run (see
``benchmarks/README.md`` for every field). This module is the command line only: collection is
``benchmarks.collect``, the Markdown and plots ``benchmarks.render``. The benchmarks live in the
source checkout, not in the installed package, which never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.collect import KERNEL_GROUPS, collect
from benchmarks.environment import device_slug
from benchmarks.render import render_markdown, render_plots, rerender

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("auto", "quick", "cpu", "gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=MODES, default="auto",
        help="auto: gpu on a CUDA machine, else cpu. quick: tiny CPU sizes, seconds (CI). "
             "cpu: small sizes, torch backend. gpu: N from 1e6 to 4e9, Triton kernels.")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode",
                        help="same as --mode quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: benchmarks/results)")
    parser.add_argument("--sizes", type=str, default=None,
                        help="comma-separated N to run instead of the mode's (e.g. 1e6,1e7)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of θ and g (default bfloat16)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--kernels", type=str, default=None,
                        help="comma-separated subset of: " + ", ".join(KERNEL_GROUPS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 in CPU modes, so a shared machine gives "
                             "stable numbers; unchanged on GPU)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="re-render the Markdown and plots of an existing results JSON; runs nothing")
    parser.add_argument("--tag", type=str, default=None,
                        help="suffix of the output names (default: the mode for quick runs)")


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "render", None):
        return rerender(args.render, args.no_plots)
    cuda = torch.cuda.is_available()
    mode = args.mode
    if mode == "auto":
        mode = "gpu" if cuda else "cpu"
    if mode == "gpu" and not cuda:
        print("benchmarks.report: --mode gpu needs a CUDA device; this machine has none "
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
        print(f"benchmarks.report: unknown kernel group(s) {sorted(unknown)}; choose from "
              f"{KERNEL_GROUPS}", file=sys.stderr)
        return 2
    sizes = parse_sizes(args.sizes) if args.sizes else None
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
