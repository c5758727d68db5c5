"""What ``gallop finetune`` runs: one dataclass, one table of options, one config-file reader.

The command line and the config file are two spellings of :class:`FinetuneConfig`: every field is
a flag (``max_steps`` is ``--max-steps``) and a config-file key (``max_steps`` or ``max-steps``).
A YAML or JSON file gives values, flags on the command line override them, and the resolved
config is saved as ``finetune_config.json`` in the output folder, which ``--config`` reads back.
In Python: ``run_finetune(FinetuneConfig(...))`` or ``run_finetune(FinetuneConfig.from_file(path,
lr=2e-4))`` is what the command does. Every option is checked by :func:`check_options` before
anything is loaded (`docs/design.md#finetune`).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from gallop_kernels import bounded_json
from gallop_kernels.finetune.data import CHAT_TEMPLATE_MODES, DEFAULT_MAX_LINE_BYTES, parse_sources, read_regular_text
from gallop_kernels.finetune.rundir import check_output
from gallop_kernels.integrations.targets import ALL_LINEAR
from gallop_kernels.optim.validation import FLOAT32_MAX  # (the optimizer computes in float32: beyond is inf)
from gallop_kernels.rules import SCORE_NAMES, check_score

CONFIG_FILE = "finetune_config.json"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")
REPORT_TARGETS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


@dataclass
class FinetuneConfig:
    """What ``gallop finetune`` runs; the defaults are its defaults (see :data:`OPTIONS`)."""

    data: Any = field(default_factory=list)  # sources: "a.jsonl", "a.jsonl:0.7" or {"path", "weight"}
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct (gallop_kernels.models)
    output: str = "gallop-finetune"
    eval_data: Any = field(default_factory=list)
    eval_split: float = 0.0
    eval_steps: int = 0
    chat_template: str = "auto"
    data_split: str = "train"
    density: float = 0.01
    score: str = "gallop"
    calibration_fraction: float = 0.05
    target_modules: str | list[str] = ALL_LINEAR
    train_embeddings: bool = False
    train_norms: bool = False
    lean: bool = False
    bits: int | None = None
    quantization_floor: bool = False
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 1e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # the Trainer's default clipping (lean: of the kept entries); 0 disables
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    report_to: str | list[str] = "none"
    progress: bool = True
    save_full: bool = False
    save_steps: int = 0
    resume: str | None = None
    overwrite: bool = False  # replace a finished run in ``output`` (or discard an interrupted one's checkpoints)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "FinetuneConfig":
        """The config in a YAML or JSON file, with ``overrides`` (field names) taking precedence."""
        values = read_config_file(path)
        unknown = [k for k in overrides if k not in FIELD_NAMES]
        if unknown:
            raise ValueError(_unknown_key(unknown[0], "argument"))
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain values, data sources normalized: what ``finetune_config.json`` holds."""
        out = asdict(self)
        out["data"] = [s.to_config() for s in parse_sources(self.data, "--data")]
        out["eval_data"] = [s.to_config() for s in parse_sources(self.eval_data, "--eval-data")]
        return out

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


FIELD_NAMES = tuple(f.name for f in fields(FinetuneConfig))
DEFAULTS = FinetuneConfig()


# ---------------------------------------------------------------------------------------------
# The options table: flags, help, and how text becomes a value
# ---------------------------------------------------------------------------------------------


def _optional_int(text: str) -> int | None:
    return None if str(text).lower() in ("", "none", "null") else int(text)


def _targets(text: Any) -> str | list[str]:
    if isinstance(text, list):
        return text
    return ALL_LINEAR if text == ALL_LINEAR else [t.strip() for t in str(text).split(",") if t.strip()]


def _report_to(text: Any) -> str | list[str]:
    if isinstance(text, list):
        return text
    return "none" if text == "none" else [t.strip() for t in str(text).split(",") if t.strip()]


@dataclass(frozen=True)
class Option:
    """One field as a flag: help text, how a string becomes its value, choices, repeatable."""

    name: str
    help: str
    parse: Callable[[str], Any] | None = None  # None: a boolean flag (--x / --no-x)
    choices: tuple[Any, ...] | None = None
    repeat: bool = False  # a list: the flag may be given several times
    metavar: str | None = None
    show_default: str | None = None  # how --help shows the default (else repr of the value)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return getattr(DEFAULTS, self.name)


OPTIONS: tuple[Option, ...] = (
    Option("data", "a training file: JSONL of {\"messages\"}, {\"prompt\", \"response\"} or {\"text\"} lines, "
           "or a `datasets` name when online; repeat for several, with PATH:WEIGHT to mix them by weight "
           "(e.g. --data a.jsonl:0.7 --data b.jsonl:0.3); required here or in --config", str, repeat=True,
           metavar="PATH[:WEIGHT]", show_default="none"),
    Option("model", "a Hugging Face model folder, a .gguf file (converted once and cached) or a hub id",
           str, metavar="MODEL", show_default="the embedded SmolLM2-135M-Instruct"),
    Option("output", "output folder", str, metavar="DIR"),
    Option("eval_data", "an eval file (repeat for several); its loss is reported during and after training",
           str, repeat=True, metavar="PATH", show_default="none"),
    Option("eval_split", "instead of --eval-data: hold out this fraction of every training file for eval "
           "(seeded, before mixing); 0 = no eval set", float),
    Option("eval_steps", "evaluate every N optimizer steps (0: only at the end of training)", int),
    Option("chat_template", "prompt/response lines through the tokenizer's chat template: auto (when the "
           "tokenizer has one), on, off (raw prompt + response + EOS); messages lines always use it, "
           "text lines never", str, choices=CHAT_TEMPLATE_MODES),
    Option("data_split", "split to read when --data is a `datasets` name", str),
    Option("density", "fraction of the trainable entries to train, in (0, 1]", float),
    Option("score", f"selection score: {', '.join(SCORE_NAMES)}", str, choices=SCORE_NAMES),
    Option("calibration_fraction", "fraction d_s of the training data whose mean gradient selects, in (0, 1]",
           float),
    Option("target_modules", "'all-linear' (every linear layer but the output head, as in PEFT) or "
           "comma-separated module names or name suffixes, e.g. q_proj,v_proj,lm_head", _targets),
    Option("train_embeddings", "also sparsely train the input embedding"),
    Option("train_norms", "also sparsely train normalization weights"),
    Option("lean", "memory-lean gradients: keep only the selected entries of each gradient and freeze "
           "tensors with none (clipping and the logged grad_norm use the norm of the kept entries); not "
           "with --bits 4, which is lean already"),
    Option("bits", "4: load the model with a 4-bit NF4 bitsandbytes base and train a sparse fp32 delta on "
           "the --target-modules layers (rebuild with apply_sparse_delta on a 4-bit-loaded base); not with "
           "--lean, --save-full, --resume/--save-steps, --train-embeddings/--train-norms",
           _optional_int, metavar="4", show_default="none: full-precision base"),
    Option("quantization_floor", "floor |θ| in the gallop/magnitude score at half the base's quantization "
           "step (docs/design.md#score-floor), so that its exact zeros and tiny magnitudes do not take the "
           "selection: the NF4 step with --bits 4, the GGUF file's with a .gguf model or the embedded default"),
    Option("epochs", "training epochs", float),
    Option("max_steps", "stop after this many optimizer steps (-1: train for --epochs)", int),
    Option("lr", "peak learning rate", float),
    Option("lr_scheduler", "learning-rate schedule after warmup", str, choices=LR_SCHEDULERS),
    Option("warmup_steps", "linear warmup over this many steps (not with --warmup-ratio)", int),
    Option("warmup_ratio", "linear warmup over this fraction of the training steps, in [0, 1)", float),
    Option("weight_decay", "AdamW weight decay on the selected entries", float),
    Option("max_grad_norm", "clip the gradient norm to this (0: off; with --lean: the kept entries' norm)",
           float),
    Option("batch_size", "examples per device and step (also the calibration batch)", int),
    Option("grad_accum", "gradient accumulation steps", int),
    Option("max_length", "truncate examples to this many tokens", int),
    Option("max_line_bytes", "refuse a data line longer than this many bytes (a bound on what one example "
           "may take to read)", int),
    Option("bf16", "bf16 weights and autocast (SparseAdamW keeps fp32 master copies of the selected entries)"),
    Option("gradient_checkpointing", "recompute activations in the backward pass to save memory"),
    Option("seed", "seed of the calibration subset, the data mixture, the eval split and the Trainer", int),
    Option("logging_steps", "log the loss every N steps", int),
    Option("report_to", "where the Trainer reports: none, tensorboard, wandb (comma-separated for several)",
           _report_to, metavar="none|tensorboard|wandb"),
    Option("progress", "progress bars and progress lines (phase one: examples, time, entries selected); "
           "--no-progress prints only the result"),
    Option("save_full", "also save the full fine-tuned model (not with --bits 4)"),
    Option("save_steps", "save a resumable checkpoint every N steps (0: none)", int),
    Option("resume", "checkpoint folder to resume from, or 'last': the newest complete checkpoint of the run "
           "in --output (not with --bits 4 yet); refused when saved with other options, model or data",
           str, metavar="DIR|last", show_default="none"),
    Option("overwrite", "replace the finished run in --output when this run finishes (or discard an "
           "interrupted run's checkpoints); without it such a run is refused before anything loads"),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
assert set(OPTION_BY_NAME) == set(FIELD_NAMES), "every FinetuneConfig field is an option"

COUNT_MAX = 2**31 - 1
"""The largest step count, size or length accepted (a 32-bit count: the Trainer's schedules compute
in floats, and a count beyond this is a typo, not a plan)."""
SEED_MAX = 2**32 - 1
"""The Trainer seeds numpy too, whose seeds stop here."""


@dataclass(frozen=True)
class Limits:
    """The range of a number option: ``low`` < value (``low_open``) or ``low`` <= value, and
    value <= ``high`` (value < ``high`` with ``high_open``); ``integer`` for counts."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        shown = (lambda x: f"{int(x)}") if self.integer else (lambda x: f"{x:g}")  # counts exactly: 2147483647
        low = f"> {shown(self.low)}" if self.low_open else f">= {shown(self.low)}"
        high = f"< {shown(self.high)}" if self.high_open else f"<= {shown(self.high)}"
        return f"{'an integer' if self.integer else 'a number'} {low} and {high}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


NUMBER_LIMITS: dict[str, Limits] = {
    "eval_split": Limits(0, 1, high_open=True),
    "eval_steps": Limits(0, COUNT_MAX, integer=True),
    "density": Limits(0, 1, low_open=True),
    "calibration_fraction": Limits(0, 1, low_open=True),
    "epochs": Limits(0, COUNT_MAX, low_open=True),
    "max_steps": Limits(-1, COUNT_MAX, integer=True),
    "lr": Limits(0, FLOAT32_MAX, low_open=True),
    "warmup_steps": Limits(0, COUNT_MAX, integer=True),
    "warmup_ratio": Limits(0, 1, high_open=True),
    "weight_decay": Limits(0, FLOAT32_MAX),
    "max_grad_norm": Limits(0, FLOAT32_MAX),
    "batch_size": Limits(1, COUNT_MAX, integer=True),
    "grad_accum": Limits(1, COUNT_MAX, integer=True),
    "max_length": Limits(1, COUNT_MAX, integer=True),
    "max_line_bytes": Limits(1, COUNT_MAX, integer=True),
    "seed": Limits(0, SEED_MAX, integer=True),
    "logging_steps": Limits(1, COUNT_MAX, integer=True),
    "save_steps": Limits(0, COUNT_MAX, integer=True),
}
"""The range of every number option, checked by :func:`check_options` before anything loads
(from the command line, a config file or Python alike). ``bits`` is a choice, checked apart."""
assert set(NUMBER_LIMITS) == {o.name for o in OPTIONS if o.parse in (int, float)}, "every number option has limits"


def help_text(option: Option) -> str:
    """The option's help with its default, as ``--help`` shows it."""
    shown = option.show_default
    if shown is None:
        value = option.default
        shown = ("on" if value else "off") if option.parse is None else value
        if option.name == "progress":
            shown = "on"
    return f"{option.help} (default: {shown})".replace("%", "%%")


# ---------------------------------------------------------------------------------------------
# The config file
# ---------------------------------------------------------------------------------------------


def _unknown_key(key: str, what: str) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELD_NAMES)}"
    return f"unknown {what} {key!r}{hint}"


def coerce(option: Option, value: Any, where: str) -> Any:
    """A config-file value as the field's type: text goes through the flag's parser (YAML reads
    ``1e-4`` as text), lists stay lists where the flag repeats."""
    if option.parse is None:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {option.name} must be true or false, got {value!r}")
        return value
    if option.repeat:
        return value
    if isinstance(value, str) or option.parse in (_targets, _report_to):
        try:
            return option.parse(value)
        except ValueError:
            raise ValueError(f"{where}: {option.name}: cannot read {value!r}") from None
    return value


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 8
"""A config file is at most 1 MiB and nested at most 8 levels (a data source list of objects is 3)."""


def _yaml_loader() -> Any:
    """PyYAML's safe loader without aliases: a config file needs none, and an alias bomb (a few
    lines that expand to billions of nodes for whoever walks them) is refused where it is read."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config file",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return NoAliases


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields set in a YAML (or JSON) config file; unknown keys and bad values raise ValueError.

    The file must be a regular file of at most `MAX_CONFIG_BYTES` (a FIFO or a device is refused,
    not read), nested at most `MAX_CONFIG_DEPTH` levels, with finite numbers (JSON) and no YAML
    aliases."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    text = read_regular_text(path, "config file", MAX_CONFIG_BYTES)
    if path.endswith(".json"):
        try:
            raw = bounded_json.loads(text, max_depth=MAX_CONFIG_DEPTH)
        except ValueError as e:
            raise ValueError(f"{path}: not a usable JSON config: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml`), or write the "
                             "config as JSON") from None
        try:
            raw = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader without aliases)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        except RecursionError:
            raise ValueError(f"{path}: nested too deeply for a config file") from None
        if bounded_json.depth(json.dumps(raw, default=str)) > MAX_CONFIG_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file holds a mapping of option names to values")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_BY_NAME:
            raise ValueError(f"{path}: {_unknown_key(str(key), 'key')}")
        values[name] = coerce(OPTION_BY_NAME[name], value, path)
    return values


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A value for a message, short even when it is an integer of 400 digits."""
    text = repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and len(text) > 24:
        return f"{text[:6]}...{text[-3:]} ({len(text.lstrip('-'))} digits)"
    return text if len(text) <= 60 else text[:57] + "..."


def check_number(name: str, value: Any) -> None:
    """The option ``name`` is within its `NUMBER_LIMITS`; ``ValueError`` naming the flag otherwise."""
    limits = NUMBER_LIMITS[name]
    if not limits.admits(value):
        raise ValueError(f"{OPTION_BY_NAME[name].flag} must be {limits.describe()}, got {_shown(value)}")


class NotAvailableYet(ValueError):
    """A combination of options that is planned but not built yet."""


def _check_four_bit(config: FinetuneConfig) -> None:
    if config.bits != 4:
        raise ValueError(f"--bits must be 4 (a 4-bit base), got {config.bits}")
    if config.lean:
        raise ValueError("--lean is redundant with --bits 4 (the 4-bit path already keeps only the selected "
                         "entries as a sparse delta); drop --lean")
    if config.save_full:
        raise ValueError("--save-full is not possible with --bits 4: a 4-bit base plus a sparse delta cannot be "
                         "saved as a plain full-precision model; use the saved delta with apply_sparse_delta")
    if config.resume is not None or config.save_steps:
        raise NotAvailableYet("--resume and --save-steps (checkpoints) are not supported with --bits 4 yet")
    if config.train_embeddings or config.train_norms:
        raise ValueError("--train-embeddings and --train-norms are not supported with --bits 4 "
                         "(the 4-bit path trains linear layers only)")


def _check_quantization_floor(config: FinetuneConfig) -> None:
    """--quantization-floor needs a score that reads |θ| and a quantized base to read the step of."""
    if not isinstance(config.quantization_floor, bool):
        raise ValueError(f"--quantization-floor must be true or false, got {config.quantization_floor!r}")
    if not config.quantization_floor:
        return
    from gallop_kernels.rules import FLOORED_SCORES

    if config.score not in FLOORED_SCORES:
        raise ValueError(f"--quantization-floor applies to --score {' or '.join(FLOORED_SCORES)}, not {config.score}")
    if config.bits == 4:
        return
    if config.model is None or os.fspath(config.model).lower().endswith(".gguf"):  # (the default is one)
        return
    from gallop_kernels.models import converted_from

    if converted_from(config.model) is None:
        raise ValueError("--quantization-floor needs a quantized base: --bits 4, a .gguf --model, a folder "
                         "converted from one by gallop (its GGUF file still in place), or the embedded default")


def check_options(config: FinetuneConfig) -> None:
    """Every option that can be checked without loading anything; ValueError says which."""
    if config.bits is not None:
        _check_four_bit(config)
    for name in ("train_embeddings", "train_norms", "lean", "bf16", "gradient_checkpointing", "progress",
                 "save_full", "overwrite"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{OPTION_BY_NAME[name].flag} must be true or false, got {getattr(config, name)!r}")
    if config.model is not None and (not isinstance(config.model, (str, os.PathLike)) or not os.fspath(config.model)):
        raise ValueError(f"--model must be a folder, a .gguf file or a hub id, got {config.model!r}")
    if not parse_sources(config.data, "--data"):
        raise ValueError("no training data: give --data (a JSONL file, or several as path:weight)")
    parse_sources(config.eval_data, "--eval-data")
    for name in NUMBER_LIMITS:  # every number, in the table's order: the first bad one is named
        check_number(name, getattr(config, name))
    check_score(config.score, "--score", allow_callable=False)
    _check_quantization_floor(config)
    if config.max_steps == 0:
        raise ValueError("--max-steps must be a positive integer (or -1 for --epochs), got 0")
    if config.warmup_ratio and config.warmup_steps:
        raise ValueError("give --warmup-steps or --warmup-ratio, not both")
    if config.eval_split and parse_sources(config.eval_data, "--eval-data"):
        raise ValueError("give --eval-data or --eval-split, not both")
    if config.eval_steps and not (config.eval_split or config.eval_data):
        raise ValueError("--eval-steps needs an eval set: --eval-data FILE or --eval-split FRACTION")
    for name, choices in (("chat_template", CHAT_TEMPLATE_MODES), ("lr_scheduler", LR_SCHEDULERS)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{OPTION_BY_NAME[name].flag} must be one of {', '.join(choices)}, "
                             f"got {getattr(config, name)!r}")
    report_targets(config.report_to)
    targets = config.target_modules
    if (not isinstance(targets, (str, list)) or not targets
            or (isinstance(targets, list) and not all(isinstance(t, str) for t in targets))):
        raise ValueError(f"--target-modules must be 'all-linear', a regular expression or a list of names, "
                         f"got {config.target_modules!r}")
    for name in ("output", "resume"):
        value = getattr(config, name)
        if not (value is None and name == "resume") and (not isinstance(value, (str, os.PathLike))
                                                          or not os.fspath(value)):
            raise ValueError(f"{OPTION_BY_NAME[name].flag} must be a path, got {value!r}")
    check_output(config.output)  # where it is; what it holds, and --resume, in rundir.plan_run


def report_targets(report_to: Any) -> list[str]:
    """``report_to`` as the Trainer's list; an unknown or uninstalled target raises ValueError now."""
    targets = [] if report_to in ("none", None, []) else _report_to(report_to)
    for target in targets:
        if not isinstance(target, str) or target not in REPORT_TARGETS:
            raise ValueError(f"--report-to must be none or any of {', '.join(REPORT_TARGETS)}, got {target!r}")
        if not any(importlib.util.find_spec(m) is not None for m in REPORT_TARGETS[target]):
            raise ValueError(f"--report-to {target} needs `pip install {REPORT_TARGETS[target][0]}`")
    return targets


__all__ = ["CONFIG_FILE", "FinetuneConfig", "NotAvailableYet", "OPTIONS", "Option", "check_options",
           "help_text", "read_config_file", "report_targets"]
