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
  peft: ``"all-linear"``, a list of module-name suffixes, or a regular expression; embeddings,
  norms and biases optional) and freezes everything else, so the ``Trainer`` hands only those to
  the optimizer.
- :func:`gallop_optimizer_cls_and_kwargs` returns ``(SparseAdamW, kwargs)`` for the ``Trainer``'s
  ``optimizer_cls_and_kwargs`` argument, taking lr, betas and eps from the ``TrainingArguments``.
  The ``Trainer`` passes two param groups (weights with ``weight_decay``, biases and norms without);
  each group selects its own top ``density`` fraction.
- :class:`GallopCallback` runs GaLLoP's phase one when training begins: the task gradient averaged
  over a seeded random fraction ``d_s`` of the training set, then ``optimizer.select()``. When the
  optimizer already holds a selection (resuming from a checkpoint: the ``Trainer`` loads the
  optimizer, indices included, before training begins) it does nothing.

Gradient accumulation, bf16/fp16 autocast, gradient checkpointing and the ``Trainer``'s LR
schedulers work unchanged: selection happens once, before the first step, and ``SparseAdamW`` is a
``torch.optim.Optimizer``. Checkpoints save the optimizer with ``torch.save(state_dict())`` and the
``Trainer`` loads it with ``weights_only=True``, which SparseAdamW's state dict supports.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from gallop_kernels.optim import SparseAdamW
from gallop_kernels.optim.calibration import calibrate as calibrate_on_host

try:  # the Trainer pieces need transformers; select_trainable and calibrate do not
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[assignment,misc]

__all__ = [
    "ALL_LINEAR",
    "GallopCallback",
    "calibrate",
    "format_selection_summary",
    "gallop_optimizer_cls_and_kwargs",
    "layer_type",
    "select_trainable",
    "selection_summary",
    "unwrap_optimizer",
]

ALL_LINEAR = "all-linear"


# ----------------------------------------------------------------------------------------------
# Which weights are trained
# ----------------------------------------------------------------------------------------------


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:  # GPT-2 style models use a transposed linear layer
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in type(module).__name__.lower()


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def select_trainable(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    *,
    embeddings: bool = False,
    norms: bool = False,
    biases: bool = False,
) -> list[str]:
    """Make only the chosen weights trainable (``requires_grad``) and freeze the rest.

    Args:
        target_modules: ``"all-linear"`` (default: every ``nn.Linear`` except the model's output
            layer, as in peft), a list of module names or name suffixes (``["q_proj", "v_proj"]``,
            ``"lm_head"`` to add the head), or a regular expression matched against the full
            module name. The weights of the matched linear modules are trained.
        embeddings: also train the input embedding (and the output head when it is tied to it).
        norms: also train the weights of normalization layers (LayerNorm, RMSNorm, ...).
        biases: also train the biases of the targeted linear modules.

    Returns the names of the trainable parameters. Raises ``ValueError`` when nothing matches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str) and not (
        isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules)
    ):
        raise TypeError("target_modules must be 'all-linear', a regex string or a list of module names")
    linear_types = _linear_types()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    chosen: set[int] = set()  # ids of params to train
    matched_modules = 0
    for name, module in model.named_modules():
        if isinstance(module, linear_types):
            if target_modules == ALL_LINEAR:
                hit = module is not output
            else:
                hit = _matches(name, target_modules)
            if hit:
                matched_modules += 1
                chosen.add(id(module.weight))
                if biases and getattr(module, "bias", None) is not None:
                    chosen.add(id(module.bias))
        if norms and _is_norm(module):
            chosen.update(id(p) for p in module.parameters(recurse=False))
        if embeddings and (isinstance(module, nn.Embedding) or module is input_emb):
            chosen.update(id(p) for p in module.parameters(recurse=False))
    if target_modules != ALL_LINEAR and matched_modules == 0:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, linear_types)]
        raise ValueError(
            f"target_modules {target_modules!r} matched no linear module; linear modules are e.g. "
            f"{linear_names[:6]}"
        )
    names = []
    for name, p in model.named_parameters():
        train = id(p) in chosen
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError("no parameter was selected for training (the model has no linear layers?)")
    return names


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------


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
    (``score_eps``, ``seed``, ``reselect_every``, ``master_weights``, ``backend``). The options are
    validated here, so a bad density or score fails before the ``Trainer`` is built.
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


def unwrap_optimizer(optimizer: Any) -> SparseAdamW:
    """The SparseAdamW inside an accelerate/DeepSpeed wrapper (or the optimizer itself)."""
    seen = 0
    while not isinstance(optimizer, SparseAdamW) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, SparseAdamW):
        raise TypeError(
            f"GaLLoP needs a SparseAdamW optimizer, got {type(optimizer).__name__}: pass "
            "optimizer_cls_and_kwargs=gallop_optimizer_cls_and_kwargs(args, ...) to the Trainer"
        )
    return optimizer


def _is_selected(optimizer: SparseAdamW) -> bool:
    return any("steps_since_selection" in g for g in optimizer.param_groups)


# ----------------------------------------------------------------------------------------------
# Phase one: calibration
# ----------------------------------------------------------------------------------------------


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _default_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    loss = out["loss"] if isinstance(out, Mapping) else (out.loss if hasattr(out, "loss") else out[0])
    if loss is None:
        raise ValueError("the model returned no loss during calibration: do the batches have labels?")
    return loss


def calibration_indices(num_examples: int, fraction: float, seed: int) -> list[int]:
    """The sorted, seeded random subset of ``ceil(fraction * num_examples)`` (>= 1) examples."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"calibration fraction must be in (0, 1], got {fraction}")
    if num_examples < 1:
        raise ValueError("the training set is empty")
    count = min(num_examples, max(1, math.ceil(fraction * num_examples - 1e-9)))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_examples, generator=gen)[:count].tolist())


def calibrate(
    model: nn.Module,
    optimizer: Any,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    *,
    fraction: float = 0.05,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> int:
    """GaLLoP phase one: average the loss gradient over a ``fraction`` of ``dataset``, then select.

    Each batch's loss is weighted by its share of the calibration examples, so ``.grad`` holds the
    mean gradient when ``optimizer.select()`` runs; the gradients are then cleared. The global RNG
    state is restored afterwards, so training that follows sees the same random numbers as
    without calibration (resuming from a checkpoint stays exact). Under ``torch.distributed`` each
    rank takes its share of the examples and the gradients are all-reduced before selection, so
    every rank selects the same entries. Returns the number of calibration examples.
    """
    opt = unwrap_optimizer(optimizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError("calibration needs a dataset with a length (not an IterableDataset)") from None
    indices = calibration_indices(n, fraction, seed)
    total = len(indices)
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mine = indices[rank::world]
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    loss_fn = loss_fn or _default_loss
    fork_devices = [torch.cuda.current_device()] if device.type == "cuda" else []

    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]

    def weighted_loss(chunk: list[int]) -> torch.Tensor:
        inputs = _to_device(collate_fn([dataset[i] for i in chunk]), device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model, inputs)
        return loss.float() * (len(chunk) / total)

    if opt.lean:
        # Lean mode: never hold the model's dense gradient on the device; each gradient goes to
        # the host in its hook and the selection streams it back (gallop_kernels.calibrate).
        if world > 1:
            raise NotImplementedError("lean calibration under torch.distributed is not supported yet")
        with torch.random.fork_rng(devices=fork_devices):
            calibrate_on_host(opt, chunks, weighted_loss, average=False)
        model.train(was_training)
        return total
    with torch.random.fork_rng(devices=fork_devices):
        for chunk in chunks:
            weighted_loss(chunk).backward()
    if world > 1:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
    opt.select()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return total


class GallopCallback(TrainerCallback):
    """Runs GaLLoP's phase one (calibration + selection) when ``Trainer.train()`` begins.

    Args:
        calibration_fraction: d_s, the fraction of the training set whose mean gradient selects
            the trained entries (a seeded random subset; at least one example).
        batch_size: calibration batch size (default: ``per_device_train_batch_size``).
        seed: seed of the subset (default: ``args.seed``).
        loss_fn: ``(model, inputs) -> loss``; default ``model(**inputs).loss``.

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
    ) -> None:
        if isinstance(calibration_fraction, bool) or not 0.0 < float(calibration_fraction) <= 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1], got {calibration_fraction}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.calibration_fraction = float(calibration_fraction)
        self.batch_size = batch_size
        self.seed = seed
        self.loss_fn = loss_fn
        self.summary: dict[str, dict[str, int]] | None = None
        self.num_examples = 0
        self.resumed = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        if _is_selected(opt):
            self.resumed = True
            self.summary = selection_summary(model, opt)
            return control
        if train_dataloader is None or getattr(train_dataloader, "dataset", None) is None:
            raise RuntimeError("GallopCallback needs the Trainer's training dataloader")
        autocast = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        self.num_examples = calibrate(
            model,
            opt,
            train_dataloader.dataset,
            train_dataloader.collate_fn,
            fraction=self.calibration_fraction,
            batch_size=self.batch_size or args.per_device_train_batch_size,
            seed=args.seed if self.seed is None else self.seed,
            device=args.device,
            autocast_dtype=autocast,
            loss_fn=self.loss_fn,
        )
        self.summary = selection_summary(model, opt)
        return control


# ----------------------------------------------------------------------------------------------
# What was selected
# ----------------------------------------------------------------------------------------------


def layer_type(name: str) -> str:
    """A parameter's layer type: its name without layer numbers and container prefixes.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj.weight``.
    """
    skip = {"model", "layers", "layer", "h", "blocks", "decoder", "encoder", "transformer", "base_model"}
    parts = [p for p in name.split(".") if not p.isdigit()]
    while len(parts) > 2 and parts[0] in skip:
        parts = parts[1:]
    return ".".join(parts)


def selection_summary(model: nn.Module, optimizer: Any) -> dict[str, dict[str, int]]:
    """Per layer type: how many entries were selected of how many trainable ones (and tensors)."""
    opt = unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    summary: dict[str, dict[str, int]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            kind = layer_type(names.get(id(p), "unnamed"))
            row = summary.setdefault(kind, {"selected": 0, "total": 0, "tensors": 0})
            st = opt.state.get(p, {})
            row["selected"] += int(st["indices"].numel()) if "indices" in st else 0
            row["total"] += p.numel()
            row["tensors"] += 1
    return dict(sorted(summary.items()))


def format_selection_summary(summary: Mapping[str, Mapping[str, int]]) -> str:
    """A small text table of :func:`selection_summary`."""
    width = max([len("layer type")] + [len(k) for k in summary])
    lines = [f"{'layer type':<{width}}  {'tensors':>7}  {'selected':>10}  {'of':>12}  {'share':>7}"]
    sel = tot = 0
    for kind, row in summary.items():
        share = row["selected"] / row["total"] if row["total"] else 0.0
        lines.append(f"{kind:<{width}}  {row['tensors']:>7}  {row['selected']:>10,}  {row['total']:>12,}  {share:>7.2%}")
        sel += row["selected"]
        tot += row["total"]
    lines.append(f"{'total':<{width}}  {'':>7}  {sel:>10,}  {tot:>12,}  {(sel / tot if tot else 0):>7.2%}")
    return "\n".join(lines)


def trainable_named_parameters(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, param)`` for the parameters that require grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
