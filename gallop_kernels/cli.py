"""The ``gallop`` command. One subcommand per job; each registers its own parser and handler.

``demo`` runs the offline demo, ``finetune`` fine-tunes a local model, ``reproduce`` runs the
small-scale comparison, ``memory`` prints the memory report and ``bench`` the benchmark report.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from typing import Callable, Sequence

from gallop_kernels import __version__
from gallop_kernels.errors import USER_ERROR_EXIT, UserError, describe, exit_status, terminate_as_interrupt


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


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.bench import register

    register(subparsers)


def _add_memory(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.memory.report import register, run

    parser = register(subparsers)
    parser.set_defaults(handler=lambda args, _parser: run(args), subparser=parser)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo, _add_finetune, _add_reproduce, _add_memory, _add_bench,
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


ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
"""Errors of the machine a person fixes there (space, permissions, a failing disk): one line, exit 1."""


def report_user_error(command: str, error: BaseException) -> int:
    """Print a user error as ``gallop <command>: error: ...`` (its notes below it); returns 2.
    ``GALLOP_TRACEBACK=1`` prints the traceback too, for a bug report."""
    print(f"gallop {command}: error: {describe(error)}", file=sys.stderr)
    for note in getattr(error, "__notes__", ()):
        print(f"  {note}", file=sys.stderr)
    if os.environ.get("GALLOP_TRACEBACK"):
        traceback.print_exception(error)
    return USER_ERROR_EXIT


def check_finite_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse ``inf``/``nan`` for every number option of every subcommand (argparse's ``float``
    accepts them); a usage error, exit 2."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            parser.error(f"argument --{dest.replace('_', '-')}: must be a finite number, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gallop`` and ``python -m gallop_kernels``; returns the exit status.

    A user error (`gallop_kernels.errors.UserError`) is one message and exit 2; SIGINT and SIGTERM
    end the command with 130/143 after its cleanup ran; any other exception is a bug and keeps its
    traceback."""
    command = "command"
    try:
        with terminate_as_interrupt():
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            check_finite_numbers(args, args.subparser)
            return args.handler(args, args.subparser)
    except UserError as error:
        return report_user_error(command, error)
    except OSError as error:  # the machine's, not the input's: a full disk, a read-only folder
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"gallop {command}: error: {describe(error)}", file=sys.stderr)
        for note in getattr(error, "__notes__", ()):
            print(f"  {note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"gallop {command}: interrupted ({str(interrupt) or 'SIGINT'})", file=sys.stderr)
        for note in getattr(interrupt, "__notes__", ()):
            print(f"  {note}", file=sys.stderr)
        return exit_status(interrupt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
