"""``gallop finetune`` as a function: validate everything, then train with the Trainer integration.

Order of work: all options and the data are checked first (bad density, unknown score, missing or
malformed data, unavailable flags raise before a model is even loaded); then the model and
tokenizer load, the trainable representation prepares the model (`finetune.representations`:
SparseAdamW on the chosen weights, or with ``--bits 4`` a sparse fp32 delta on a 4-bit NF4 base),
the ``Trainer`` runs phase one (where the representation does not run it first) and phase two;
finally the sparse delta (or the full model), the loss log and the selection summary are written
to ``output``. :func:`run_finetune` is that sequence, written once for both representations
(`docs/design.md#finetune`).

With ``--bits 4`` the saved delta holds *dequantized base + Δ* at the selected entries; rebuild
the trained model with ``apply_sparse_delta`` on a freshly 4-bit-loaded base. ``--lean``
(redundant: the delta path is already lean), ``--save-full``, ``--resume``, ``--save-steps``,
``--train-embeddings`` and ``--train-norms`` are refused with ``--bits 4``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from gallop_kernels.finetune.data import (
    CausalLMCollator,
    DataError,
    ListDataset,
    Record,
    load_records,
    tokenize,
)
from gallop_kernels.rules import check_fraction, check_score

DELTA_FILE = "gallop_delta.safetensors"
LOSS_LOG = "loss_log.jsonl"
SELECTION_FILE = "selection.json"
SUMMARY_FILE = "finetune_summary.json"


class NotAvailableYet(ValueError):
    """A flag for a feature that is planned (the memory-lean issue) but not built yet."""


@dataclass
class FinetuneConfig:
    """What ``gallop finetune`` runs; the defaults are its defaults."""

    model: str
    data: str
    output: str = "gallop-finetune"
    density: float = 0.01
    score: str = "gallop"
    calibration_fraction: float = 0.05
    lean: bool = False
    bits: int | None = None
    max_grad_norm: float = 1.0  # the Trainer's default clipping (lean: of the kept entries); 0 disables
    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_steps: int = -1
    target_modules: str | list[str] = "all-linear"
    train_embeddings: bool = False
    train_norms: bool = False
    save_full: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    data_split: str = "train"
    logging_steps: int = 10
    progress: bool = True
    resume: str | None = None
    save_steps: int = 0


@dataclass
class FinetuneResult:
    output: str
    num_examples: int
    num_trainable: int
    num_selected: int
    calibration_examples: int
    steps: int
    final_loss: float | None
    seconds: float
    summary: dict[str, dict[str, int]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)


def _positive(name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (value > 0) or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def check_options(config: FinetuneConfig) -> None:
    """Every option that can be checked without loading anything; ValueError says which."""
    if config.bits is not None:
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
    check_fraction(config.density, "--density")
    check_score(config.score, "--score", allow_callable=False)
    check_fraction(config.calibration_fraction, "--calibration-fraction")
    _positive("--epochs", config.epochs)
    _positive("--lr", config.lr)
    _positive("--batch-size", config.batch_size, integer=True)
    _positive("--grad-accum", config.grad_accum, integer=True)
    _positive("--max-length", config.max_length, integer=True)
    _positive("--logging-steps", config.logging_steps, integer=True)
    if not isinstance(config.max_steps, int) or config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(f"--max-steps must be a positive integer (or -1 for --epochs), got {config.max_steps!r}")
    if config.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.save_steps < 0:
        raise ValueError(f"--save-steps must be >= 0, got {config.save_steps}")
    if config.resume is not None and config.resume != "last" and not os.path.isdir(config.resume):
        raise FileNotFoundError(f"--resume checkpoint not found: {config.resume!r}")
    if os.path.exists(config.output) and not os.path.isdir(config.output):
        raise ValueError(f"--output {config.output!r} exists and is not a directory")


def check_model(spec: str) -> None:
    """A local model directory must hold a config.json; anything else is taken as a hub id."""
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileNotFoundError(f"--model {spec!r} is a directory without config.json "
                                    "(save one with model.save_pretrained(path))")
        return
    if os.path.exists(expanded):
        raise ValueError(f"--model {spec!r} is a file; give the directory written by save_pretrained")
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"--model path not found: {spec!r}")


def prepare(config: FinetuneConfig) -> list[Record]:
    """All checks that need no model: options, model path, data. Returns the validated records."""
    check_options(config)
    check_model(config.model)
    return load_records(config.data, config.data_split)


def _load_model_and_tokenizer(spec: str, bf16: bool, four_bit: bool = False) -> tuple[Any, Any]:
    """The model (bf16 or fp32; with ``four_bit`` an NF4 bitsandbytes base) and a padding tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(os.path.expanduser(spec))
    where = os.path.expanduser(spec) if local else spec
    # bf16 weights with --bf16 (SparseAdamW keeps fp32 master copies of the selected entries)
    dtype = torch.bfloat16 if bf16 else torch.float32
    options: dict[str, Any] = {"dtype": dtype}
    if four_bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        options["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, **options)
    except OSError as e:
        hint = "" if local else " (a hub id needs network access; pass a local directory saved with save_pretrained)"
        raise ValueError(f"could not load model {spec!r}{hint}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {spec!r} has no pad, eos or unk token to pad with")
    return model, tokenizer


def _training_args(config: FinetuneConfig) -> Any:
    import torch
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    ckpt_flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=config.output,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=[],
        seed=config.seed,
        bf16=config.bf16,
        disable_tqdm=not config.progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # (lean mode: the norm of the kept entries, clipped and logged by gallop_trainer's mixin)
        max_grad_norm=config.max_grad_norm,
        **{ckpt_flag: config.gradient_checkpointing},
    )


def _loss_logger(path: str):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends every Trainer log (step, loss, lr, grad norm) to a JSONL file."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return LossLog()


def _selection_printer(representation: Any, out: TextIO):
    from transformers import TrainerCallback

    from gallop_kernels.summary import format_selection_summary

    class PrintSelection(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            summary, how = representation.selection()
            if summary is not None and state.is_world_process_zero:
                print(f"selection ({how}):\n{format_selection_summary(summary)}", file=out, flush=True)

    return PrintSelection()


def run_finetune(config: FinetuneConfig, out: TextIO | None = None) -> FinetuneResult:
    """Validate, fine-tune, save. Raises ValueError/FileNotFoundError before training on bad input."""
    out = out or sys.stdout
    records = prepare(config)
    t0 = time.perf_counter()

    from transformers import Trainer

    from gallop_kernels.delta import save_delta
    from gallop_kernels.finetune.representations import representation_for
    from gallop_kernels.integrations.transformers import gallop_trainer

    rep = representation_for(config)
    model, tokenizer = _load_model_and_tokenizer(config.model, config.bf16, four_bit=rep.four_bit)
    dataset = ListDataset(tokenize(records, tokenizer, config.max_length))
    collate = CausalLMCollator(tokenizer.pad_token_id)
    os.makedirs(config.output, exist_ok=True)
    loss_log = os.path.join(config.output, LOSS_LOG)
    main_process = _is_main_process()  # (under torchrun / accelerate launch only rank 0 writes)
    if config.resume is None and main_process and os.path.exists(loss_log):
        os.remove(loss_log)

    rep.prepare(model, dataset, collate)
    args = _training_args(config)
    with rep.trainer_context(model):
        trainer = gallop_trainer(Trainer)(
            model=model, args=args, train_dataset=dataset, data_collator=collate,
            callbacks=[*rep.callbacks(), _selection_printer(rep, out), _loss_logger(loss_log)],
            **rep.trainer_options(model, args),
        )
    resume = None if config.resume is None else (True if config.resume == "last" else config.resume)
    train_out = trainer.train(resume_from_checkpoint=resume)

    meta = {"calibration_fraction": config.calibration_fraction, "epochs": config.epochs, "lr": config.lr,
            "target_modules": json.dumps(config.target_modules), "steps": trainer.state.global_step}
    delta_path = os.path.join(config.output, DELTA_FILE)
    delta = rep.extract_delta(model, trainer, meta)
    if main_process:
        save_delta(delta_path, delta)
    saved = [delta_path]
    if config.save_full:
        full = os.path.join(config.output, "model")
        trainer.save_model(full)
        if main_process:
            tokenizer.save_pretrained(full)
        saved.append(full)
    summary = rep.selection()[0] or {}
    selection_path = os.path.join(config.output, SELECTION_FILE)
    if main_process:
        with open(selection_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = FinetuneResult(
        output=config.output,
        num_examples=len(dataset),
        num_trainable=rep.num_trainable,
        num_selected=rep.num_selected(trainer),
        calibration_examples=rep.calibration_examples(),
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else train_out.training_loss,
        seconds=time.perf_counter() - t0,
        summary=summary,
        saved=saved + [loss_log, selection_path],
    )
    if main_process:
        with open(os.path.join(config.output, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump({"config": asdict(config), "result": asdict(result)}, f, indent=2, default=str)
    return result


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (its RANK), or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def print_result(result: FinetuneResult, file: TextIO | None = None) -> None:
    if not _is_main_process():
        return  # (one report per launch, not one per rank)
    out = file or sys.stdout
    share = result.num_selected / result.num_trainable if result.num_trainable else 0.0
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"fine-tuned {result.num_selected:,} of {result.num_trainable:,} trainable entries ({share:.2%}) "
          f"for {result.steps} steps on {result.num_examples} examples in {result.seconds:.1f} s; "
          f"last logged loss {loss}", file=out)
    for path in result.saved:
        print(f"  wrote {path}", file=out)


__all__ = ["DataError", "FinetuneConfig", "FinetuneResult", "NotAvailableYet", "check_options", "prepare",
           "print_result", "run_finetune"]
