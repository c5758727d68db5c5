"""Which weights train: the one resolver of ``target_modules``, for every representation.

``target_modules`` means what it means in PEFT (`docs/design.md#target-modules`):

* ``"all-linear"`` (the default): every linear layer -- ``nn.Linear`` (bitsandbytes'
  ``Linear4bit`` is one), transformers' ``Conv1D``, an already wrapped `SparseDeltaLinear` --
  except the model's output layer (``get_output_embeddings()``, the ``lm_head``), wherever the
  layer sits in the model;
* any other string: a regular expression that must match a linear layer's full qualified name
  (``re.fullmatch``), e.g. ``r".*layers\\.1\\.mlp\\..*"``;
* a list of strings: each one a linear layer's full name or a dotted suffix of it (``"q_proj"``,
  ``"mlp.up_proj"``, ``"lm_head"`` to add the head). Every entry must match at least one linear
  layer, so a typo is an error rather than a silently smaller run.

The plain path (:func:`select_trainable`) trains the targeted layers' weights with SparseAdamW;
the 4-bit path wraps them in `SparseDeltaLinear`.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

ALL_LINEAR = "all-linear"

TargetModules = str | Sequence[str]


def _delta_layer() -> type:
    # Imported on use: the 4-bit package imports this module when it loads.
    from gallop_kernels.integrations.bitsandbytes.layer import SparseDeltaLinear

    return SparseDeltaLinear


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear, _delta_layer()]
    try:  # GPT-2 style models use a transposed linear layer
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer of ``model`` by qualified name, in module order; a `SparseDeltaLinear`
    counts as one layer (its inner ``base`` is not listed again)."""
    types = _linear_types()
    wrapper = _delta_layer()
    inner: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if id(module) in inner:
            continue
        if isinstance(module, wrapper):
            inner.add(id(module.base))
        if isinstance(module, types):
            out.append((name, module))
    return out


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (``get_output_embeddings()``), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, target_modules: TargetModules = ALL_LINEAR) -> list[tuple[str, nn.Module]]:
    """The targeted linear layers ``(name, module)``, in module order (see the module docstring).

    Raises ``TypeError`` for a ``target_modules`` of the wrong kind and ``ValueError`` when it
    (or one of its entries) matches no linear layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str) and not (
        isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules)
    ):
        raise TypeError("target_modules must be 'all-linear', a regex string or a list of module names")
    linears = linear_layers(model)
    examples = [n for n, _ in linears[:6]]
    if target_modules == ALL_LINEAR:
        head = output_layer(model)
        chosen = [(n, m) for n, m in linears
                  if head is None or not (m is head or getattr(m, "base", None) is head)]
        if not chosen:
            raise ValueError("the model has no linear layer besides its output layer to train")
        return chosen
    if isinstance(target_modules, str):
        chosen = [(n, m) for n, m in linears if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules {target_modules!r} matched no linear module; "
                             f"linear modules are e.g. {examples}")
        return chosen
    if not target_modules:
        raise ValueError("target_modules is empty")
    names: set[str] = set()
    for target in target_modules:
        if not target:
            raise ValueError("target module names must be non-empty strings")
        hits = [n for n, _ in linears if _suffix_match(n, target)]
        if not hits:
            other = next((m for n, m in model.named_modules() if n and _suffix_match(n, target)), None)
            why = (f"it is a {type(other).__name__}, not a linear layer" if other is not None
                   else f"linear modules are e.g. {examples}")
            raise ValueError(f"target module {target!r} matched no linear module; {why}")
        names.update(hits)
    return [(n, m) for n, m in linears if n in names]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in type(module).__name__.lower()


def select_trainable(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    *,
    embeddings: bool = False,
    norms: bool = False,
    biases: bool = False,
) -> list[str]:
    """Make only the chosen weights trainable (``requires_grad``) and freeze the rest.

    Args:
        target_modules: which linear layers' weights train (see :func:`resolve_targets`).
        embeddings: also train the input embedding (and the output head when it is tied to it).
        norms: also train the weights of normalization layers (LayerNorm, RMSNorm, ...).
        biases: also train the biases of the targeted linear modules.

    Returns the names of the trainable parameters. Raises ``ValueError`` when nothing matches.
    """
    chosen: set[int] = set()  # ids of params to train
    for _, module in resolve_targets(model, target_modules):
        weight = module.delta_values if isinstance(module, _delta_layer()) else module.weight
        chosen.add(id(weight))
        if biases and getattr(module, "bias", None) is not None:
            chosen.add(id(module.bias))
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        if norms and _is_norm(module):
            chosen.update(id(p) for p in module.parameters(recurse=False))
        if embeddings and (isinstance(module, nn.Embedding) or module is input_emb):
            chosen.update(id(p) for p in module.parameters(recurse=False))
    names = []
    for name, p in model.named_parameters():
        train = id(p) in chosen
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError("no parameter was selected for training")
    return names


__all__ = ["ALL_LINEAR", "TargetModules", "linear_layers", "output_layer", "resolve_targets",
           "select_trainable"]
