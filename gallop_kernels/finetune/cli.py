"""``gallop finetune``: argparse wiring (``register``) and the handler."""

from __future__ import annotations

import argparse
import sys

from gallop_kernels.reference import SCORE_NAMES


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand; its handler is set as ``func``."""
    p = subparsers.add_parser(
        "finetune",
        help="sparse GaLLoP fine-tuning of a causal LM on a JSONL file",
        description="Fine-tune a causal language model with GaLLoP (Hugging Face Trainer + SparseAdamW): "
                    "phase one selects the entries with the largest |gradient| / |weight| on a calibration "
                    "fraction of the data, phase two trains only those. Writes the sparse delta "
                    "(gallop_delta.safetensors), the loss log and the selection summary to --output.",
    )
    p.add_argument("--model", required=True, help="local model directory (save_pretrained), or a hub id when online")
    p.add_argument("--data", required=True,
                   help='JSONL file of {"prompt", "response"} or {"text"} lines, or a `datasets` name when online')
    p.add_argument("--output", default="gallop-finetune", help="output directory (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of trainable entries to train (0, 1]")
    p.add_argument("--score", default="gallop", help=f"selection score: {', '.join(SCORE_NAMES)} (default: gallop)")
    p.add_argument("--calibration-fraction", type=float, default=0.05,
                   help="fraction d_s of the training data whose mean gradient selects (default: %(default)s)")
    p.add_argument("--lean", action="store_true", help="memory-lean gradients: keep only the selected entries of each gradient and "
                        "freeze tensors with none (gradient clipping and the logged grad_norm use the kept entries); refused with --bits 4, "
                        "which is lean already")
    p.add_argument("--bits", type=int, default=None, help="4: load the model with a 4-bit NF4 bitsandbytes base and train a sparse fp32 delta on the "
                        "--target-modules layers; the saved delta holds dequantized base + delta at the selected "
                        "entries (rebuild with apply_sparse_delta on a 4-bit-loaded base). Not combinable with "
                        "--lean (redundant), --save-full, --resume/--save-steps, --train-embeddings/--train-norms")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' (default: every linear layer but the output head, as in PEFT) or "
                        "comma-separated module names or name suffixes, e.g. q_proj,v_proj,lm_head")
    p.add_argument("--train-embeddings", action="store_true", help="also sparsely train the input embedding")
    p.add_argument("--train-norms", action="store_true", help="also sparsely train normalization weights")
    p.add_argument("--save-full", action="store_true", help="also save the full fine-tuned model (not with --bits 4)")
    p.add_argument("--save-steps", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from, or 'last' (not with --bits 4 yet)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # gallop_kernels/cli.py calls handler(args, subparser); func(args) is the same without the parser
    p.set_defaults(func=finetune_main, handler=lambda args, parser: finetune_main(args), subparser=p)
    return p


def config_from_args(args: argparse.Namespace):
    from gallop_kernels.finetune.pipeline import FinetuneConfig

    targets = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return FinetuneConfig(
        model=args.model, data=args.data, output=args.output, density=args.density, score=args.score,
        calibration_fraction=args.calibration_fraction, lean=args.lean, bits=args.bits, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, max_steps=args.max_steps, target_modules=targets,
        train_embeddings=args.train_embeddings, train_norms=args.train_norms, save_full=args.save_full,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        logging_steps=args.logging_steps, progress=not args.no_progress, resume=args.resume,
        save_steps=args.save_steps,
    )


def finetune_main(args: argparse.Namespace) -> int:
    """Handler of ``gallop finetune``; returns the exit status (2 for bad input, before training)."""
    from gallop_kernels.finetune.pipeline import print_result, run_finetune

    try:
        result = run_finetune(config_from_args(args))
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"gallop finetune: error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m gallop_kernels.finetune ...``."""
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
