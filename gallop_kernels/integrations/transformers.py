"""Train with GaLLoP inside the Hugging Face ``Trainer``.

Three pieces, usable together or alone::

    from transformers import Trainer, TrainingArguments
    from gallop_kernels.integrations.transformers import (
        GallopCallback, gallop_optimizer_cls_and_kwargs, select_trainable)

    select_trainable(model)                     # all linear layers but the output head; rest frozen
    args = TrainingArguments(output_dir="out", learning_rate=1e-4, ...)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=collator,
        optimizer_cls_and_kwargs=gallop_optimizer_cls_and_kwargs(args, density=0.01, score="gallop"),
        callbacks=[GallopCallback(calibration_fraction=0.05)],   # phase one before step 1
    )
    trainer.train()                             # or trainer.train(resume_from_checkpoint=True)

- :func:`select_trainable` chooses which weights are sparsely trained (``target_modules`` as in
  PEFT, `docs/design.md#target-modules`) and freezes everything else, so the ``Trainer`` hands
  only those to the optimizer.
- :func:`gallop_optimizer_cls_and_kwargs` returns ``(SparseAdamW, kwargs)`` for the ``Trainer``'s
  ``optimizer_cls_and_kwargs`` argument, taking lr, betas and eps from the ``TrainingArguments``.
  The ``Trainer`` passes two param groups (weights with ``weight_decay``, biases and norms without);
  each group selects its own top ``density`` fraction.
- :class:`GallopCallback` runs GaLLoP's phase one (`gallop_kernels.phase_one.calibrate_dataset`)
  when training begins. When the optimizer already holds a selection (resuming from a checkpoint:
  the ``Trainer`` loads the optimizer, indices included, before training begins) it does nothing.
- :func:`gallop_trainer` (or :class:`GallopTrainerMixin`) makes a ``Trainer`` class (or TRL's
  ``SFTTrainer``) clip and log lean mode's gradient norm: lean mode frees each dense gradient as
  it lands, so the ``Trainer``'s own clipping finds no ``.grad`` and would log ``grad_norm: 0``.
  With a plain ``Trainer`` the callback still clips (before each step), but the logged norm stays 0.

Under ``torchrun`` / ``accelerate launch`` (DDP) nothing changes: phase one splits the
calibration examples over the ranks and sums their gradients, and lean mode finds the DDP module
by itself (`docs/design.md#distributed`).

Gradient accumulation, bf16/fp16 autocast, gradient checkpointing and the ``Trainer``'s LR
schedulers work unchanged: selection happens once, before the first step, and ``SparseAdamW`` is a
``torch.optim.Optimizer``. Checkpoints save the optimizer with ``torch.save(state_dict())`` and the
``Trainer`` loads it with ``weights_only=True``, which SparseAdamW's state dict supports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from gallop_kernels.extras import require
from gallop_kernels.integrations.targets import ALL_LINEAR, select_trainable
from gallop_kernels.optim import SparseAdamW
from gallop_kernels.optim.unwrap import unwrap_optimizer
from gallop_kernels.phase_one import calibrate_dataset, calibration_subset, optimizer_sink, select_from_sink
from gallop_kernels.quiet import no_bitsandbytes_notice
from gallop_kernels.rules import check_count, check_fraction
from gallop_kernels.summary import format_selection_summary, layer_type, selection_summary

require("the Trainer integration (gallop_kernels.integrations.transformers)", "transformers", "accelerate")
with no_bitsandbytes_notice():  # the Trainer's modules import peft, and peft imports bitsandbytes
    from transformers import TrainerCallback  # noqa: E402

__all__ = [
    "ALL_LINEAR",
    "GallopCallback",
    "format_selection_summary",
    "GallopTrainerMixin",
    "gallop_optimizer_cls_and_kwargs",
    "gallop_trainer",
    "label_token_units",
    "layer_type",
    "select_trainable",
    "selection_summary",
    "unwrap_optimizer",
]


def gallop_optimizer_cls_and_kwargs(
    args: Any = None,
    *,
    density: float = 0.01,
    score: Any = "gallop",
    lr: float | None = None,
    **options: Any,
) -> tuple[type[SparseAdamW], dict[str, Any]]:
    """``(SparseAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``lr``, ``betas`` and ``eps`` default to the ``TrainingArguments`` ``args`` (learning_rate,
    adam_beta1/2, adam_epsilon); weight decay comes from the ``Trainer``'s param groups
    (``args.weight_decay`` on weights, 0 on biases and norms). ``options`` go to SparseAdamW
    (``score_eps``, ``seed``, ``reselect_every``, ``master_weights``, ``backend``, ``lean``). The
    options are validated here, so a bad density or score fails before the ``Trainer`` is built.
    """
    kwargs: dict[str, Any] = {"density": density, "score": score, **options}
    if args is not None:
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
        kwargs["lr"] = args.learning_rate if lr is None else lr
    elif lr is not None:
        kwargs["lr"] = lr
    # Validate now (on a throwaway parameter) rather than deep inside trainer.train().
    SparseAdamW([torch.zeros(1, requires_grad=True)], **kwargs)
    # (The Trainer's no-decay group is empty when only linear weights train: SparseAdamW
    # accepts empty groups.)
    return SparseAdamW, kwargs


def label_token_units(model: nn.Module) -> Callable[[Any], int]:
    """Counts what a Hugging Face model's loss is the mean over, in a collated batch: its label
    tokens other than -100 (``labels[..., 1:]`` for a causal LM, whose loss shifts the labels;
    ``shift_labels`` when the collator gives them), as the ``Trainer`` counts
    ``num_items_in_batch``. Phase one weighs each batch by it (``calibrate_dataset(units=)``), so
    that its mean gradient is over every calibration token, whatever the batch size."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP and the like
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    shifts = (LOSS_MAPPING.get(getattr(inner, "loss_type", None)) is ForCausalLMLoss
              and not getattr(getattr(inner, "config", None), "is_encoder_decoder", False))

    def count(batch: Any) -> int:
        if not isinstance(batch, Mapping) or not ({"labels", "shift_labels"} & set(batch)):
            raise ValueError("calibration batches have no 'labels': the model's loss needs them")
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        else:
            labels = batch["labels"][..., 1:] if shifts else batch["labels"]
        return int(labels.ne(-100).sum())

    return count


class GallopCallback(TrainerCallback):
    """Runs GaLLoP's phase one (calibration + selection) when ``Trainer.train()`` begins.

    Args:
        calibration_fraction: d_s, the fraction of the training set whose mean gradient selects
            the trained entries (a seeded random subset; at least one example).
        batch_size: calibration batch size (default: ``per_device_train_batch_size``).
        seed: seed of the subset (default: ``args.seed``).
        loss_fn: ``(model, inputs) -> loss``; default ``model(**inputs).loss``. With the
            default, each batch weighs by its label tokens (`label_token_units`), so the mean
            gradient is over every calibration token and the selection does not depend on the
            batch size, gradient accumulation or number of ranks; a ``loss_fn`` weighs by
            examples (exact when it is a mean over the batch's examples).
        log: called with a progress line before calibration, after it and after selection
            (examples, seconds, entries selected), e.g. ``print``; None: silent.

    After selection, ``self.summary`` holds :func:`selection_summary` and ``self.num_examples``
    the number of calibration examples. When resuming, the loaded optimizer already holds the
    selection, so nothing is recomputed (``self.resumed`` is True).
    """

    def __init__(
        self,
        calibration_fraction: float = 0.05,
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        log: Callable[[str], Any] | None = None,
    ) -> None:
        self.calibration_fraction = check_fraction(calibration_fraction, "calibration_fraction")
        check_count(batch_size, "batch_size", allow_none=True)
        self.batch_size = batch_size
        self.seed = seed
        self.loss_fn = loss_fn
        self.log = log
        self.summary: dict[str, dict[str, int]] | None = None
        self.num_examples = 0
        self.resumed = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if opt.is_selected():
            self.resumed = True
            self.summary = selection_summary(model, opt)
            return control
        if train_dataloader is None or getattr(train_dataloader, "dataset", None) is None:
            raise RuntimeError("GallopCallback needs the Trainer's training dataloader")
        autocast = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        dataset = train_dataloader.dataset
        batch_size = self.batch_size or args.per_device_train_batch_size
        seed = args.seed if self.seed is None else self.seed
        say = self.log if self.log is not None and state.is_world_process_zero else (lambda line: None)
        say(f"phase one: calibrating on {len(calibration_subset(len(dataset), self.calibration_fraction, seed))} "
            f"of {len(dataset)} training examples (batch {batch_size}) ...")
        t0 = time.perf_counter()
        sink = optimizer_sink(opt)
        self.num_examples = calibrate_dataset(
            model, sink, dataset, train_dataloader.collate_fn,
            fraction=self.calibration_fraction, batch_size=batch_size, seed=seed,
            device=args.device, autocast_dtype=autocast, loss_fn=self.loss_fn,
            units=label_token_units(model) if self.loss_fn is None else None,
        )
        t1 = time.perf_counter()
        say(f"phase one: calibration took {t1 - t0:.1f} s; selecting ...")
        select_from_sink(opt, sink)
        model.zero_grad(set_to_none=True)
        total = sum(p.numel() for group in opt.param_groups for p in group["params"])
        say(f"phase one: selected {opt.num_selected:,} of {total:,} entries "
            f"({opt.num_selected / max(total, 1):.2%}) in {time.perf_counter() - t1:.1f} s")
        self.summary = selection_summary(model, opt)
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Lean mode with a plain Trainer: its clipping found no .grad, so clip the kept
        # gradients here (GallopTrainerMixin already did, and logs the norm).
        opt = _lean_optimizer(optimizer)
        if opt is not None and args.max_grad_norm and args.max_grad_norm > 0 \
                and opt.last_grad_norm is None:
            opt.clip_grad_norm_(args.max_grad_norm)
        return control


def _lean_optimizer(optimizer: Any) -> SparseAdamW | None:
    """The SparseAdamW behind the Trainer's optimizer if it runs in lean mode, else None."""
    try:
        opt = unwrap_optimizer(optimizer)
    except TypeError:
        return None
    return opt if opt.lean else None


class GallopTrainerMixin:
    """Mix into a ``Trainer`` class: in lean mode, clip and log the norm of the kept gradients.

    The ``Trainer`` computes (and clips) the gradient norm over ``model.parameters()``' ``.grad``;
    lean mode keeps only the selected entries, in its own buffers, so the norm is taken there:
    ``SparseAdamW.clip_grad_norm_`` (the kept entries; DDP-averaged, summed over FSDP2 shards).
    Overrides the ``Trainer``'s ``_clip_grad_norm`` and ``_get_grad_norm`` (transformers >= 5);
    any other optimizer goes through the ``Trainer``'s own code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name in ("_clip_grad_norm", "_get_grad_norm"):
            if not callable(getattr(super(), name, None)):
                raise TypeError(f"GallopTrainerMixin needs a transformers Trainer with {name}() "
                                f"(transformers >= 5)")
        super().__init__(*args, **kwargs)

    def _clip_grad_norm(self, model):
        opt = _lean_optimizer(self.optimizer)
        if opt is None:
            return super()._clip_grad_norm(model)
        return opt.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        opt = _lean_optimizer(self.optimizer)
        if opt is not None and grad_norm is None:
            grad_norm = opt.clip_grad_norm_(float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)


def gallop_trainer(trainer_cls: type | None = None) -> type:
    """``trainer_cls`` (default ``transformers.Trainer``; e.g. ``trl.SFTTrainer``) with
    :class:`GallopTrainerMixin`: lean mode's gradient norm is clipped and logged."""
    if trainer_cls is None:
        from transformers import Trainer

        trainer_cls = Trainer
    if issubclass(trainer_cls, GallopTrainerMixin):
        return trainer_cls
    return type(f"Gallop{trainer_cls.__name__}", (GallopTrainerMixin, trainer_cls), {})
