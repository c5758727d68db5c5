"""``gallop reproduce``: argparse wiring (``register``) and the handler."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand; its handler is set as ``func``."""
    from gallop_kernels.reproduce.runner import METHODS

    p = subparsers.add_parser(
        "reproduce",
        help="small-scale reproduction of the paper's comparison (tiny Llama, generated tasks, CPU)",
        description="Pretrain a tiny Llama on a mixture of generated tasks, fine-tune it on a new task with "
                    "full fine-tuning, LoRA, GaLLoP, gradient (SIFT/SAFT), magnitude (PaFi) and random "
                    "selection at matched budgets over several seeds, and write raw.json, table.md and plot.png "
                    "(ID accuracy, OOD accuracy, forget ratio, collapse rate).",
    )
    p.add_argument("--output", default=os.path.join("results", "reproduction"), help="default: %(default)s")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--ranks", type=_ints, default=None,
                   help="LoRA ranks defining the matched budgets (default: 1,4,16)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: 2 or the CPU count if fewer)")
    p.add_argument("--smoke", action="store_true", help="seconds-long CI setting: exercises everything, learns nothing")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--cache", default=None, help="directory to keep/reuse the pretrained models (optional)")
    # gallop_kernels/cli.py calls handler(args, subparser); func(args) is the same without the parser
    p.set_defaults(func=reproduce_main, handler=lambda args, parser: reproduce_main(args), subparser=p)
    return p


def reproduce_main(args: argparse.Namespace) -> int:
    from gallop_kernels.reproduce.report import markdown_table, write_outputs
    from gallop_kernels.reproduce.runner import SMOKE, ReproConfig, run_reproduction
    from gallop_kernels.finetune.rundir import check_writable_folder

    # Before the (long) run: the results folder can be written (a UserError: one line, exit 2).
    check_writable_folder(args.output, "--output", files=("raw.json", "table.md", "plot.png"))

    cfg = SMOKE if args.smoke else ReproConfig(jobs=max(1, min(2, os.cpu_count() or 1)))
    changes = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.ranks is not None:
        changes["lora_ranks"] = args.ranks
    if args.methods is not None:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.cache is not None:
        changes["cache_dir"] = args.cache
    if args.jobs is not None:
        changes["jobs"] = args.jobs
    try:
        cfg = replace(cfg, **changes)
        cfg.check()
    except ValueError as e:
        print(f"gallop reproduce: error: {e}", file=sys.stderr)
        return 2
    raw = run_reproduction(cfg)
    paths = write_outputs(raw, args.output, make_plot=not args.no_plot)
    print(markdown_table(raw))
    print(f"wall time {raw['wall_seconds']:.0f} s; wrote " + ", ".join(paths))
    return 0
