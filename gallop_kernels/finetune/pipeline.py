"""``gallop finetune`` as a function: validate everything, then train with the Trainer integration.

Order of work (`docs/design.md#finetune`): the options (`finetune.config.check_options`), the
model spec, the data (every file, every line) and the output folder and checkpoint to resume
(`finetune.rundir.plan_run`) are checked first; then the run's staging folder is created
(`docs/design.md#run-folders`), the model is resolved (the embedded default, a ``.gguf`` file
converted once into the cache, a folder or a hub id: `gallop_kernels.models`) and loaded, and every
example is encoded (chat template, assistant-only labels), so a bad conversation fails before
anything is trained. The trainable representation prepares the model (`finetune.representations`:
SparseAdamW on the chosen weights, or with ``bits=4`` a sparse fp32 delta on a 4-bit NF4 base), the
``Trainer`` runs phase one (where the representation does not run it first), phase two and the
evaluations, and the sparse delta (or the full model), the loss log, the selection summary, the
resolved config and the result are written to the staging folder, which is then renamed onto the
output. :func:`run_finetune` is that sequence, written once for both representations.

With ``bits=4`` the saved delta holds *dequantized base + Δ* at the selected entries; rebuild the
trained model with ``apply_sparse_delta`` on a freshly 4-bit-loaded base.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

from gallop_kernels.errors import user_input
from gallop_kernels.extras import MissingExtra, require
from gallop_kernels.quiet import no_bitsandbytes_notice, progress_bars
from gallop_kernels.finetune import rundir
from gallop_kernels.finetune.config import (
    CONFIG_FILE,
    FinetuneConfig,
    NotAvailableYet,
    check_options,
    report_targets,
)
from gallop_kernels.finetune.data import (
    CausalLMCollator,
    DataError,
    EncodedDataset,
    TrainingData,
    encode_records,
    load_training_data,
)

DELTA_FILE = "gallop_delta.safetensors"
LOSS_LOG = "loss_log.jsonl"
SELECTION_FILE = "selection.json"
SUMMARY_FILE = "finetune_summary.json"
RESULT_FILES = (DELTA_FILE, SUMMARY_FILE, SELECTION_FILE, LOSS_LOG, CONFIG_FILE, "model", "gallop_adapter.json",
                "README.md", "adapter_config.json", "adapter_model.safetensors")
"""Every top-level name a run writes besides its checkpoints and run record: what a run record of
an older gallop (without its own file list) owns in a run folder (`rundir.plan.inspect_output`)."""
# Files a folder must hold for AutoTokenizer to build a tokenizer without converting anything.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


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
    eval_examples: int = 0
    eval_loss: float | None = None
    summary: dict[str, dict[str, int]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)


def prepare(config: FinetuneConfig) -> TrainingData:
    """All checks that need no model loaded: the options, the model spec, then every data file."""
    check_options(config)
    check_model(config)
    return load_training_data(config.data, config.eval_data, config.eval_split, config.seed, config.data_split,
                              config.max_line_bytes)


# ---------------------------------------------------------------------------------------------
# Quiet: progress lines, progress bars, one import-time notice
# ---------------------------------------------------------------------------------------------


def progress_printer(out: TextIO, enabled: bool) -> Callable[[str], None]:
    """``say(line)``: print a progress line to ``out`` when ``enabled``, else nothing."""
    def say(line: str) -> None:
        if enabled:
            print(line, file=out, flush=True)
    return say


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def check_model(config: FinetuneConfig) -> None:
    """The model spec, before anything converts or loads (`gallop_kernels.models.check_model_spec`),
    plus a check that a model folder holds a tokenizer, so that a folder with only config.json gets
    that message and not a hint from deep inside transformers about sentencepiece."""
    from gallop_kernels import models

    if models.check_model_spec(config.model) == "folder" and not any(
            os.path.isfile(os.path.join(os.path.expanduser(os.fspath(config.model)), name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"--model {config.model!r} has config.json but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            f"save it there with tokenizer.save_pretrained({config.model!r})")


def resolve_model(config: FinetuneConfig, say: Callable[[str], None]) -> Any:
    """`gallop_kernels.models.resolve_model` (converting a GGUF file once)."""
    from gallop_kernels import models

    return models.resolve_model(config.model, log=say)


def base_model_name(config: FinetuneConfig) -> str:
    """What the delta records as its base: the model as given, or the embedded GGUF's file name."""
    from gallop_kernels import models

    return models.EMBEDDED_GGUF if config.model is None else os.fspath(config.model)


def base_weights(resolved: Any) -> str:
    """The folder holding the base's weights, which the delta's differences are taken against.

    The embedded model and a ``.gguf`` file load from their converted cache folder, a folder from
    itself; a hub id from the hub cache, where ``from_pretrained`` has just put it. Checked before
    training (`gallop_kernels.delta.open_base`), so a base that cannot be read fails the run early.
    """
    from gallop_kernels.delta import open_base, weights_location

    path = weights_location(resolved.path)
    if path is None:
        raise ValueError(f"cannot find the weights of {resolved.describe()} on this machine to take the "
                         "delta's differences against")
    open_base(path)
    return path


def load_model(resolved: Any, config: FinetuneConfig, four_bit: bool, say: Callable[[str], None]) -> tuple[Any, Any]:
    """The model (bf16 or fp32; with ``four_bit`` an NF4 bitsandbytes base) and a padding tokenizer."""
    import torch

    from gallop_kernels import models

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    options: dict[str, Any] = {}
    if four_bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        options["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    try:
        model, tokenizer = models.load_model_and_tokenizer(resolved.path, dtype=dtype, **options)
    except OSError as e:
        raise ValueError(f"could not load model {resolved.describe()}: {e}") from e
    if tokenizer.pad_token_id is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {resolved.name!r} has no pad, eos or unk token to pad with")
    count = sum(p.numel() for p in model.parameters())
    say(f"model: {resolved.describe()}, {count:,} parameters, loaded in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------


def training_arguments(config: FinetuneConfig, has_eval: bool, output: str | None = None) -> Any:
    """The ``TrainingArguments`` of a run; checkpoints go to ``output`` (default ``config.output``)."""
    import torch
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    ckpt_flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # transformers 5 reads a warmup_steps below 1 as a ratio; 4.x has warmup_ratio
    warmup = ({"warmup_ratio": config.warmup_ratio} if "warmup_ratio" in fields and config.warmup_ratio
              else {"warmup_steps": config.warmup_ratio or config.warmup_steps})
    evaluation = {"eval_strategy": "steps", "eval_steps": config.eval_steps} if has_eval and config.eval_steps else {}
    return TrainingArguments(
        output_dir=config.output if output is None else output,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=report_targets(config.report_to) or "none",
        seed=config.seed,
        bf16=config.bf16,
        disable_tqdm=not config.progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # Lean mode frees each dense gradient as it lands, so there is nothing for the Trainer's
        # gradient-norm clipping to read: it is off there (said in --lean's help).
        # (lean mode: the norm of the kept entries, clipped and logged by gallop_trainer's mixin)
        max_grad_norm=config.max_grad_norm,
        **warmup,
        **evaluation,
        **{ckpt_flag: config.gradient_checkpointing},
    )


def _loss_logger(path: str) -> Any:
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends every Trainer log (step, loss, lr, grad norm, eval loss) to a JSONL file."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return LossLog()


def _selection_printer(representation: Any, say: Callable[[str], None]) -> Any:
    from transformers import TrainerCallback

    from gallop_kernels.summary import format_selection_summary

    class PrintSelection(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            summary, how = representation.selection()
            if summary is not None and state.is_world_process_zero:
                say(f"selection ({how}):\n{format_selection_summary(summary)}")

    return PrintSelection()


def _encode(data: TrainingData, tokenizer: Any, config: FinetuneConfig) -> tuple[EncodedDataset, EncodedDataset | None]:
    train = encode_records(data.train, tokenizer, config.max_length, config.chat_template)
    evals = encode_records(data.eval, tokenizer, config.max_length, config.chat_template) if data.eval else None
    for name, ds in (("training", train), ("eval", evals)):
        if ds is not None and ds.skipped:
            print(f"gallop finetune: warning: {len(ds.skipped)} {name} example(s) have no trained token within "
                  f"--max-length {config.max_length} and are skipped (first: {ds.skipped[0]})", file=sys.stderr)
    return train, evals


def save_delta_files(representation: Any, model: Any, trainer: Any, config: FinetuneConfig, output: str,
                     base: Any = None, write: bool = True, command: str | None = None) -> list[str]:
    """Write the trained delta into ``output`` as an adapter folder (`gallop_kernels.adapter`: the
    delta file, a JSON config, a model card and, where SHiRA can hold it, PEFT's files); returns the
    paths written (``write=False``: another rank than 0 of a launch, which extracts but writes nothing).
    ``command`` is the command line that was typed (recorded in the config; without one, the command
    that replays the run from its saved config). A skipped PEFT export is said on stderr, with why."""
    from gallop_kernels.adapter import CONFIG_FILE as ADAPTER_CONFIG
    from gallop_kernels.adapter import PEFT_CONFIG, save_adapter

    meta = {"calibration_fraction": config.calibration_fraction, "epochs": config.epochs, "lr": config.lr,
            "target_modules": json.dumps(config.target_modules), "steps": trainer.state.global_step,
            "data": json.dumps(config.to_dict()["data"])}
    delta = representation.extract_delta(model, trainer, base_model_name(config), meta, base=base)
    settings = config.to_dict()
    adapter_config = {
        "target_modules": config.target_modules,
        "data": settings["data"],
        "command": command or "gallop finetune --config " + CONFIG_FILE,
        "training": {key: settings[key] for key in ("lr", "epochs", "max_steps", "batch_size", "grad_accum",
                                                      "max_length", "calibration_fraction", "seed", "lean", "bits")
                     if key in settings},
        "steps": trainer.state.global_step,
    }
    if not write:
        return []
    # (the staging folder is this run's own: an adapter left there by an interrupted attempt is replaced)
    written = save_adapter(output, delta, config=adapter_config, overwrite=True)
    if not any(os.path.basename(p) == PEFT_CONFIG for p in written):
        with open(os.path.join(output, ADAPTER_CONFIG), encoding="utf-8") as f:
            reason = json.load(f)["peft"].get("reason", "not exported")
        try:
            require("the PEFT export (adapter_config.json, adapter_model.safetensors)", "peft")
        except MissingExtra as missing_peft:
            reason = str(missing_peft)
        print(f"gallop finetune: note: no PEFT SHiRA files: {reason}", file=sys.stderr)
    return written


def run_finetune(config: FinetuneConfig, out: TextIO | None = None, *, command: str | None = None) -> FinetuneResult:
    """Validate, fine-tune, evaluate, save: what ``gallop finetune`` does, as one call.

    Bad input raises `gallop_kernels.errors.UserError` (a ``ValueError``; the data's `DataError`
    and a missing model's ``ModelUnavailable`` as they are) before the output changes. The run is
    written to a staging folder and published whole (`finetune.rundir`,
    `docs/design.md#run-folders`). Progress lines go to ``out`` (stdout) unless ``config.progress``
    is False. ``command``: the command line as typed, recorded in ``gallop_adapter.json``.
    """
    require("gallop finetune", "transformers", "accelerate")
    out = out or sys.stdout
    say = progress_printer(out, config.progress)
    t0 = time.perf_counter()
    with progress_bars(config.progress), no_bitsandbytes_notice():
        from gallop_kernels.models import ModelUnavailable

        with user_input(ValueError, TypeError, OSError, ModelUnavailable):
            data = prepare(config)
            notes = (rundir.finish_interrupted_publish(config.output, (*RESULT_FILES, LOSS_LOG))
                     if is_main_process() else [])  # (what a killed run left on this output)
            plan = rundir.plan_run(config, loss_log=LOSS_LOG, result_files=RESULT_FILES)
        for note in [*notes, *plan.notes]:
            print(f"gallop finetune: note: {note}", file=sys.stderr)
        with rundir.RunFolder(plan) as run:
            result = _train_and_save(config, data, run, say, t0, command)
            result.saved += [run.final(os.path.join(run.path, SUMMARY_FILE)), run.final(os.path.join(run.path, rundir.RUN_FILE))]
            if is_main_process():
                rundir.write_json_atomic(os.path.join(run.path, SUMMARY_FILE), asdict(result))
            run.publish()
    return result


def _train_and_save(config: FinetuneConfig, data: TrainingData, run: rundir.RunFolder, say: Callable[[str], None],
                    t0: float, command: str | None = None) -> FinetuneResult:
    """Load, train, evaluate and write every result into the run's staging folder ``run.path``."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from gallop_kernels.finetune.representations import representation_for
    from gallop_kernels.integrations.transformers import gallop_trainer
    from gallop_kernels.models import ModelUnavailable

    rep = representation_for(config, log=say)
    main_process = is_main_process()  # (under torchrun / accelerate launch only rank 0 writes)
    with user_input(ValueError, TypeError, OSError, ModelUnavailable):  # the model, the encoded data
        resolved = resolve_model(config, say)
        model, tokenizer = load_model(resolved, config, rep.four_bit, say)
        base = None if rep.four_bit else base_weights(resolved)
        train, evals = _encode(data, tokenizer, config)
    if any(r.kind == "pair" for r in data.train):  # (how "messages" and "text" lines encode has no choice)
        say(f"data: {data.describe()}; prompt/response lines: "
            + ("chat template" if train.chat_template else "raw prompt + response"))
    else:
        say(f"data: {data.describe()}")

    output = run.path  # everything below is written to the staging folder
    # (without the run controls: replaying this file with --config must not overwrite or resume)
    if main_process:
        dataclasses.replace(config, overwrite=False, resume=None).save(os.path.join(output, CONFIG_FILE))
    loss_log = run.loss_log

    collate = CausalLMCollator(tokenizer.pad_token_id)
    with user_input():  # the target modules exist; the Trainer accepts the options; the checkpoint fits
        rep.prepare(model, train, collate)
        if run.resume_from is not None:
            rundir.check_resume_weights(run.resume_from, model)
        args = training_arguments(config, has_eval=evals is not None, output=output)
    with rep.trainer_context(model):
        trainer = run.trainer_class(gallop_trainer(Trainer))(
            model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collate,
            callbacks=[run.callback(), *rep.callbacks(), _selection_printer(rep, say), _loss_logger(loss_log)],
            **rep.trainer_options(model, args),
        )
    if not config.progress:
        trainer.remove_callback(PrinterCallback)  # the per-step log lines: they are in the loss log
    train_out = trainer.train(resume_from_checkpoint=run.resume_from)
    eval_loss = None
    if evals is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
        say(f"eval loss {eval_loss:.4f} on {len(evals)} example(s)")

    saved = save_delta_files(rep, model, trainer, config, output, base=base, write=main_process, command=command)
    if config.save_full:
        full = os.path.join(output, "model")
        trainer.save_model(full)
        if main_process:
            tokenizer.save_pretrained(full)
        saved.append(full)
    summary = rep.selection()[0] or {}
    selection_path = os.path.join(output, SELECTION_FILE)
    if main_process:
        rundir.write_json_atomic(selection_path, summary)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return FinetuneResult(
        output=run.final(output),
        num_examples=len(train),
        num_trainable=rep.num_trainable,
        num_selected=rep.num_selected(trainer),
        calibration_examples=rep.calibration_examples(),
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else train_out.training_loss,
        seconds=time.perf_counter() - t0,
        eval_examples=0 if evals is None else len(evals),
        eval_loss=eval_loss,
        summary=summary,
        saved=[run.final(p) for p in [*saved, loss_log, selection_path, os.path.join(output, CONFIG_FILE)]],
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (its ``RANK``), or a process on its own: the one
    that writes the output folder and prints the result."""
    return int(os.environ.get("RANK", "0")) == 0


def print_result(result: FinetuneResult, file: TextIO | None = None) -> None:
    if not is_main_process():
        return  # (one report per launch, not one per rank)
    out = file or sys.stdout
    share = result.num_selected / result.num_trainable if result.num_trainable else 0.0
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    evaluated = "" if result.eval_loss is None else f"; eval loss {result.eval_loss:.4f} ({result.eval_examples} examples)"
    print(f"fine-tuned {result.num_selected:,} of {result.num_trainable:,} trainable entries ({share:.2%}) "
          f"for {result.steps} steps on {result.num_examples} examples in {result.seconds:.1f} s; "
          f"last logged loss {loss}{evaluated}", file=out)
    for path in result.saved:
        print(f"  wrote {path}", file=out)


__all__ = ["DataError", "FinetuneConfig", "FinetuneResult", "NotAvailableYet", "check_options", "prepare",
           "print_result", "run_finetune"]
