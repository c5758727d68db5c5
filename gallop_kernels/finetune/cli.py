"""``gallop finetune``: the flags (built from `finetune.config.OPTIONS`) and the handler.

Every flag is a field of :class:`~gallop_kernels.finetune.config.FinetuneConfig`; the parser
records only the flags actually given, so that they override a ``--config`` file while ``--help``
still shows every default.
"""

from __future__ import annotations

import argparse

from gallop_kernels.finetune.config import OPTIONS, help_text

EPILOG = """\
examples:
  gallop finetune --data train.jsonl --output out
  gallop finetune --model path/to/hf-folder --data a.jsonl:0.7 --data b.jsonl:0.3 --eval-split 0.05
  gallop finetune --config run.yaml --lr 2e-4          # flags override the file

config file (YAML or JSON): the same options as keys, e.g.
  model: path/to/model.gguf
  data: [a.jsonl:0.7, b.jsonl:0.3]
  eval_data: eval.jsonl
  lr: 2.0e-4
  report_to: tensorboard
The resolved config is saved as finetune_config.json in the output folder; --config reads it back.
In Python: gallop_kernels.finetune.run_finetune(FinetuneConfig(...)) does what this command does."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand; its handler is set as ``func``."""
    p = subparsers.add_parser(
        "finetune",
        help="sparse GaLLoP fine-tuning of a causal LM on chat, prompt/response or text data",
        description="Fine-tune a causal language model with GaLLoP (Hugging Face Trainer + SparseAdamW): "
                    "phase one selects the entries with the largest |gradient| / |weight| on a calibration "
                    "fraction of the data, phase two trains only those. Writes the sparse delta "
                    "(gallop_delta.safetensors), the loss log, the selection summary and the resolved "
                    "config to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line reach the namespace
    )
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a YAML or JSON file of options (keys as the flags, e.g. max_steps); flags given "
                        "here override it, a repeated flag (--data) replaces its list")
    for option in OPTIONS:
        kwargs = dict(help=help_text(option), dest=option.name)
        if option.parse is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            default_metavar = {int: "N", float: "X"}.get(option.parse, option.name.upper())
            kwargs.update(type=option.parse, metavar=option.metavar or default_metavar)
            if option.choices is not None:
                kwargs.update(choices=option.choices, metavar=None)
            if option.repeat:
                kwargs["action"] = "append"
        p.add_argument(option.flag, **kwargs)
    # gallop_kernels/cli.py calls handler(args, subparser); func(args) is the same without the parser
    p.set_defaults(func=finetune_main, handler=lambda args, parser: finetune_main(args), subparser=p)
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`FinetuneConfig` of parsed arguments: the ``--config`` file, then the flags given."""
    from gallop_kernels.finetune.config import FinetuneConfig

    flags = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    if getattr(args, "config", None):
        return FinetuneConfig.from_file(args.config, **flags)
    return FinetuneConfig(**flags)


def finetune_main(args: argparse.Namespace) -> int:
    """Handler of ``gallop finetune``; returns the exit status (2 for bad input, before training)."""
    from gallop_kernels.errors import is_user_error, report_user_error, user_input
    from gallop_kernels.finetune.pipeline import print_result, run_finetune

    try:
        with user_input():
            config = config_from_args(args)
        result = run_finetune(config, command=getattr(args, "command_line", None))
    except Exception as e:  # bad input (a missing model included): one message; anything else is a bug
        if is_user_error(e):
            return report_user_error("finetune", e)
        raise
    print_result(result)
    return 0
