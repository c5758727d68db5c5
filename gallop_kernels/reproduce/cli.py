"""``gallop reproduce``: argparse wiring (``register``) and the handler."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from gallop_kernels.argtypes import DefaultsFormatter, ints


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand; its handler is set as ``func``."""
    from gallop_kernels.reproduce.runner import METHODS, ReproConfig

    d = ReproConfig()
    p = subparsers.add_parser(
        "reproduce",
        help="the paper's comparison on SmolLM2-135M-Instruct: ID/OOD accuracy, forget ratio, collapse rate",
        description="Fine-tune SmolLM2-135M-Instruct on a skill it lacks (the category of a word, in one word, "
                    "measured on words never trained on) "
                    "with full fine-tuning, LoRA, GaLLoP, SIFT, SAFT-like, PaFi and random selection at a budget "
                    "matched to LoRA, each at its own learning rate tuned on a validation split, over several "
                    "seeds; measure the new task (ID) and tasks the model already answers (OOD), and write "
                    "raw.json (after every run: an interrupted run resumes), table.md and plot.png. "
                    "See docs/reproduction.md.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--output", default=os.path.join("results", "reproduction"), help="folder of the results")
    p.add_argument("--model", default=None, help="a .gguf file, HF folder or hub id (default: the embedded model)")
    p.add_argument("--seeds", type=ints, default=",".join(map(str, d.seeds)), help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--rank", type=int, default=d.lora_rank, help="LoRA rank defining the matched budget")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per run")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch, per worker")
    p.add_argument("--jobs", type=int, default=d.jobs, help="worker processes running fine-tunes side by side")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long CI setting on a random tiny chat model: exercises everything, learns nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite table.md and plot.png from raw.json")
    p.add_argument("--no-plot", action="store_true", help="do not draw plot.png (needs matplotlib)")
    # gallop_kernels/cli.py calls handler(args, subparser); func(args) is the same without the parser
    p.set_defaults(func=reproduce_main, handler=lambda args, parser: reproduce_main(args), subparser=p)
    return p


def reproduce_main(args: argparse.Namespace) -> int:
    from gallop_kernels.finetune.rundir import check_writable_folder
    from gallop_kernels.models import ModelUnavailable
    from gallop_kernels.reproduce.report import markdown_table, write_outputs
    from gallop_kernels.reproduce.runner import SMOKE, ReproConfig, run_reproduction

    # Before the (long) run: the results folder can be written (a UserError: one line, exit 2).
    check_writable_folder(args.output, "--output", files=("raw.json", "table.md", "plot.png"))

    raw_path = os.path.join(args.output, "raw.json")
    if args.report_only:
        try:
            with open(raw_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            print(f"gallop reproduce: error: cannot read {raw_path}: {e}", file=sys.stderr)
            return 2
    else:
        base = SMOKE if args.smoke else ReproConfig()
        changes = {"methods": tuple(m.strip() for m in args.methods.split(",") if m.strip()), "threads": args.threads,
                   "jobs": args.jobs}
        if not args.smoke:
            changes.update(model=args.model, seeds=args.seeds, lora_rank=args.rank, steps=args.steps)
        try:
            cfg = replace(base, **changes)
            cfg.check()
        except ValueError as e:
            print(f"gallop reproduce: error: {e}", file=sys.stderr)
            return 2
        try:
            raw = run_reproduction(cfg, raw_path=raw_path)
        except ModelUnavailable as e:
            print(f"gallop reproduce: {e}", file=sys.stderr)
            return 2
    paths = write_outputs(raw, args.output, make_plot=not args.no_plot)
    print(markdown_table(raw))
    print("wrote " + ", ".join(paths))
    return 0
