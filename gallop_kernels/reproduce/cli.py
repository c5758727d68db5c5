"""``gallop reproduce``: argparse wiring (``register``) and the handler.

Two protocols (docs/reproduction.md): ``paper`` (the default) is the GaLLoP paper's protocol on a
suite of same-format tasks (`reproduce/paper.py`); ``probes`` is the earlier study, one new task
against six unrelated probes (`reproduce/runner.py`), kept with its results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from gallop_kernels.argtypes import DefaultsFormatter, ints, positive_int


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


OUTPUTS = {"paper": os.path.join("results", "paper-protocol"), "probes": os.path.join("results", "reproduction")}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand; its handler is set as ``func``."""
    from gallop_kernels.reproduce.paper import METHODS

    p = subparsers.add_parser(
        "reproduce",
        help="the paper's comparison on SmolLM2-135M-Instruct: ID/OOD accuracy, forget ratio, collapse rate",
        description="The GaLLoP paper's protocol at CPU scale: fine-tune SmolLM2-135M-Instruct on one task of a "
                    "suite of generated multiple-choice tasks with full fine-tuning, LoRA, GaLLoP (plain and with "
                    "the quantization floor), SIFT, SAFT-like, PaFi and random selection, over a grid of learning "
                    "rates and budgets matched to LoRA ranks, and measure the forget ratio on the other tasks of "
                    "the suite against the zero-shot base. raw.json is written after every run (an interrupted "
                    "study continues, a finished one reruns nothing); table.md and plot.png are made from it. "
                    "--protocol probes runs the earlier study (one new task, six unrelated probes). "
                    "See docs/reproduction.md.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--protocol", choices=tuple(OUTPUTS), default="paper", help="which study")
    p.add_argument("--output", default=None,
                   help="folder of the results (default: results/paper-protocol, or results/reproduction "
                        "for --protocol probes)")
    p.add_argument("--model", default=None, help="a .gguf file, HF folder or hub id (default: the embedded model)")
    p.add_argument("--seeds", type=ints, default=None, help="comma-separated seeds")
    p.add_argument("--methods", type=_names, default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--ranks", type=ints, default=None,
                   help="paper: LoRA ranks defining the budgets, the first one run first (default 16,4,64)")
    p.add_argument("--id-tasks", type=_names, default=None, help="paper: the ID tasks, in turn")
    p.add_argument("--max-runs", type=positive_int, default=None,
                   help="paper: stop after this many new runs (one sitting; rerun to continue)")
    p.add_argument("--rank", type=positive_int, default=None, help="probes: LoRA rank defining the matched budget (4)")
    p.add_argument("--steps", type=positive_int, default=None, help="probes: fine-tuning steps per run (24)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch, per worker")
    p.add_argument("--jobs", type=positive_int, default=1, help="worker processes running fine-tunes side by side")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long CI setting on a random tiny chat model: exercises everything, learns nothing")
    p.add_argument("--pilot", action="store_true",
                   help="paper: only measure the base model on every candidate task (pilot.json)")
    p.add_argument("--selections", action="store_true",
                   help="paper: only record what GaLLoP selects, plain and floored, at every budget (selections.json)")
    p.add_argument("--estimate", action="store_true",
                   help="paper: write estimate.json, the plan's CPU time projected from the runs so far (nothing runs)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the table, plot and report from raw.json")
    p.add_argument("--no-plot", action="store_true", help="do not draw plot.png (needs matplotlib)")
    # gallop_kernels/cli.py calls handler(args, subparser); func(args) is the same without the parser
    p.set_defaults(func=reproduce_main, handler=lambda args, parser: reproduce_main(args), subparser=p)
    return p


def _error(message: str) -> int:
    print(f"gallop reproduce: error: {message}", file=sys.stderr)
    return 2


def reproduce_main(args: argparse.Namespace) -> int:
    from gallop_kernels.finetune.rundir import check_writable_folder
    from gallop_kernels.models import ModelUnavailable

    output = args.output or OUTPUTS[args.protocol]
    check_writable_folder(output, "--output", files=("raw.json", "table.md", "plot.png"))
    raw_path = os.path.join(output, "raw.json")
    try:
        if args.protocol == "probes":
            return _probes(args, output, raw_path)
        return _paper(args, output, raw_path)
    except ModelUnavailable as e:
        print(f"gallop reproduce: {e}", file=sys.stderr)
        return 2


def _read_raw(raw_path: str) -> dict | None:
    try:
        with open(raw_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        _error(f"cannot read {raw_path}: {e}")
        return None


def _paper(args: argparse.Namespace, output: str, raw_path: str) -> int:
    from gallop_kernels.reproduce import paper, paper_report

    for name in ("rank", "steps"):
        if getattr(args, name) is not None:
            return _error(f"--{name} belongs to --protocol probes; the paper protocol takes --ranks")
    if args.report_only or args.estimate:
        raw = _read_raw(raw_path)
        if raw is None:
            return 2
        if args.estimate:
            import time

            path = os.path.join(output, "estimate.json")
            paper.save(paper_report.estimate(raw, time.strftime("%Y-%m-%d %H:%M")), path)
            print(f"wrote {path}")
    else:
        base = paper.SMOKE if args.smoke else paper.PaperConfig()
        changes = {"threads": args.threads, "jobs": args.jobs}
        for name, field in (("model", "model"), ("seeds", "seeds"), ("methods", "methods"), ("ranks", "ranks"),
                            ("id_tasks", "id_tasks")):
            if getattr(args, name) is not None:
                if args.smoke and name == "model":
                    return _error("--smoke runs the tiny random model; it takes no --model")
                changes[field] = getattr(args, name)
        cfg = _checked(base, changes)
        if cfg is None:
            return 2
        for flag, make, name in ((args.pilot, paper.pilot, "pilot.json"),
                                 (args.selections, paper.selections, "selections.json")):
            if flag:
                path = os.path.join(output, name)
                paper.save(make(cfg), path)
                print(f"wrote {path}")
                return 0
        try:
            raw = paper.run_study(cfg, raw_path=raw_path, max_runs=args.max_runs)
        except ValueError as e:
            return _error(str(e))
    paths = paper_report.write_outputs(raw, output, make_plot=not args.no_plot)
    print(paper_report.summary(raw))
    print("wrote " + ", ".join(paths))
    return 0


def _checked(base: Any, changes: dict[str, Any]) -> Any:
    """``base`` with the command line's ``changes``, checked; None (after one message) when refused."""
    try:
        cfg = replace(base, **changes)
        cfg.check()
    except ValueError as e:
        _error(str(e))
        return None
    return cfg


def _probes(args: argparse.Namespace, output: str, raw_path: str) -> int:
    from gallop_kernels.reproduce.report import markdown_table, write_outputs
    from gallop_kernels.reproduce.runner import METHODS, SMOKE, ReproConfig, run_reproduction

    for name in ("ranks", "id_tasks", "max_runs"):
        if getattr(args, name) is not None:
            return _error(f"--{name.replace('_', '-')} belongs to the paper protocol")
    if args.pilot or args.selections or args.estimate:
        return _error("--pilot, --selections and --estimate belong to the paper protocol")
    if args.report_only:
        raw = _read_raw(raw_path)
        if raw is None:
            return 2
    else:
        base = SMOKE if args.smoke else ReproConfig()
        changes = {"methods": args.methods or METHODS, "threads": args.threads, "jobs": args.jobs}
        if not args.smoke:
            for name, field in (("model", "model"), ("seeds", "seeds"), ("rank", "lora_rank"), ("steps", "steps")):
                if getattr(args, name) is not None:
                    changes[field] = getattr(args, name)
        cfg = _checked(base, changes)
        if cfg is None:
            return 2
        raw = run_reproduction(cfg, raw_path=raw_path)
    paths = write_outputs(raw, output, make_plot=not args.no_plot)
    print(markdown_table(raw))
    print("wrote " + ", ".join(paths))
    return 0
