"""The ``gallop`` command. One subcommand per job; each registers its own parser and handler.

``demo`` runs the offline demo, ``finetune`` fine-tunes a local model, ``reproduce`` runs the
small-scale comparison and ``memory`` prints the memory report. (The benchmarks are not part of
the installed package: run ``python -m benchmarks.report`` in a source checkout.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gallop_kernels import __version__


def _density(text: str) -> float:
    """argparse type for a fraction in (0, 1], so a bad density fails at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.demo.run import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="offline demo: a tiny Llama learns a new task with SparseAdamW and keeps the old one",
        description=(
            "Build a small Llama from a transformers config (no download), pretrain it on generated "
            "task A (copy digits) with torch.optim.AdamW, then fine-tune it on generated task B "
            "(decode letters to digits) with SparseAdamW: gradients of B are accumulated over a few "
            "calibration batches, the top entries by score are selected once, and only they are "
            "trained. Prints held-out accuracy on B (learned) and A (retained) before and after, "
            "the number of trained entries, and optimizer-state bytes against torch.optim.AdamW."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the model init and the data")
    p.add_argument("--density", type=_density, default=d.density,
                   help="fraction of parameter entries SparseAdamW trains, in (0, 1]")
    p.add_argument("--score", choices=("gallop", "gradient", "magnitude", "random"), default=d.score,
                   help="selection rule: gallop |g|/(|w|+eps), gradient |g|, magnitude 1/(|w|+eps), random")
    p.add_argument("--pretrain-steps", type=_non_negative_int, default=d.pretrain_steps,
                   help="AdamW steps on task A")
    p.add_argument("--finetune-steps", type=_non_negative_int, default=d.finetune_steps,
                   help="SparseAdamW steps on task B")
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help="peak learning rate of pretraining")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate of fine-tuning (decays linearly to 0)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="examples per step")
    p.add_argument("--calibration-batches", type=_positive_int, default=d.calibration_batches,
                   help="task-B batches whose gradients are accumulated before selecting")
    p.add_argument("--eval-examples", type=_positive_int, default=d.eval_examples,
                   help="held-out examples per task for the accuracies")
    p.add_argument("--device", default=d.device, help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=d.backend,
                   help="SparseAdamW backend: auto is Triton on CUDA, torch elsewhere")
    p.add_argument("--threads", type=_positive_int, default=d.threads,
                   help="CPU threads for torch (the model is tiny: more threads rarely help)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_demo, subparser=p)


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the demo; a bad option the optimizer rejects becomes a usage error (exit 2), not a traceback."""
    from gallop_kernels.demo.run import DemoConfig, print_result, run_demo

    config = DemoConfig(
        seed=args.seed, density=args.density, score=args.score, pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps, pretrain_lr=args.pretrain_lr, lr=args.lr,
        batch_size=args.batch_size, calibration_batches=args.calibration_batches,
        eval_examples=args.eval_examples, device=args.device, backend=args.backend,
        threads=args.threads,
    )
    try:
        result = run_demo(config, progress=not args.quiet)
    except (ValueError, TypeError) as err:  # the optimizer's and the demo's validation
        parser.error(str(err))
    print_result(result)
    return 0


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.finetune.cli import register

    register(subparsers)


def _add_reproduce(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.reproduce.cli import register

    register(subparsers)


def _add_memory(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.memory.report import register, run

    parser = register(subparsers)
    parser.set_defaults(handler=lambda args, _parser: run(args), subparser=parser)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo, _add_finetune, _add_reproduce, _add_memory,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``gallop`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="gallop", description="GaLLoP sparse fine-tuning: Triton-accelerated sparse AdamW.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gallop`` and ``python -m gallop_kernels``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
