"""The delta of a model trained by SparseAdamW: trained minus base at every entry that changed."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from gallop_kernels.delta.base import BaseSource, open_base, weights_location
from gallop_kernels.delta.fingerprint import TensorView, record
from gallop_kernels.delta.format import SparseDelta, new_delta, score_label
from gallop_kernels.delta.ops import exact_difference
from gallop_kernels.optim.unwrap import unwrap_optimizer
from gallop_kernels.rules import index_dtype


def owner_classes(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Tensor name → class name of the module that holds it (``"Linear"``, ``"Embedding"``...)."""
    out = {}
    for name in names:
        module_name = name.rpartition(".")[0]
        try:
            out[name] = type(model.get_submodule(module_name)).__name__
        except AttributeError:
            continue
    return out


def extract_delta(
    model: nn.Module,
    optimizer: Any,
    *,
    base: BaseSource | None = None,
    base_model: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> SparseDelta:
    """The difference between ``model`` and its base at the entries SparseAdamW trained.

    Args:
        model: the trained model.
        optimizer: its SparseAdamW (or a wrapper around one).
        base: the base values (`gallop_kernels.delta.base`): the base model, a ``{name: tensor}``
            copy, or the base's safetensors folder/file. Default (`delta.base.weights_location`):
            the weights of ``base_model`` on this machine, else those of the folder or hub id the
            model was loaded from (``model.name_or_path``); so do not save the trained model over
            its base folder before extracting.
        base_model: the base's name or path, recorded in the metadata.
        metadata: the user's own string metadata (may not set the format's keys).

    Per trained tensor the delta holds the selected entries; with ``reselect_every`` also every
    other entry that differs from the base (an entry trained under an earlier selection keeps
    its trained value). Differences are float32 where that is exact, else float64
    (`ops.exact_difference`), so ``apply_delta`` onto the base rebuilds ``model`` exactly. The
    base fingerprint is sampled from ``base``.
    """
    opt = unwrap_optimizer(optimizer)
    if base is None:
        base = weights_location(base_model) or weights_location(getattr(model, "name_or_path", None))
        if base is None:
            raise ValueError("extract_delta needs the base values to take differences: pass base= (the "
                             "base model, a {name: tensor} copy taken before training, or the base's "
                             "safetensors folder)")
    if base is model:
        raise ValueError("base is the trained model itself; pass the base it was trained from")
    source = open_base(base)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    indices, values, shapes, samples = {}, {}, {}, {}
    dtypes, scores, densities = set(), set(), set()
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "indices" not in st or st["indices"].numel() == 0:
                continue  # nothing of this tensor changed
            if id(p) not in names:
                raise ValueError("the optimizer trains a tensor that is not a parameter of the model")
            name = names[id(p)]
            trained = p.detach().reshape(-1)
            start = source.get(name, tuple(p.shape), p.dtype, p.device).reshape(-1)
            idx = st["indices"].to(device=p.device, dtype=torch.int64)
            if group["reselect_every"] is not None:
                changed = torch.nonzero(trained != start).squeeze(1)
                idx = torch.unique(torch.cat([idx, changed]))
            indices[name] = idx.to(index_dtype(p.numel())).cpu()
            values[name] = exact_difference(start.index_select(0, idx), trained.index_select(0, idx))
            shapes[name] = tuple(p.shape)
            samples[name] = record(TensorView(start), idx)
            dtypes.add(str(p.dtype).replace("torch.", ""))
            scores.add(score_label(group["score"]))
            densities.add(repr(float(group["density"])))
    if not indices:
        raise ValueError("the optimizer has no selection yet: nothing to extract")
    return new_delta(indices, values, shapes, base_model=base_model, scores=scores, densities=densities,
                     dtypes=dtypes, base=samples, modules=owner_classes(model, list(indices)),
                     metadata=metadata)
