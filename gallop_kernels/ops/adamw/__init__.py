"""The sparse AdamW op: one AdamW step on the selected entries only (`docs/design.md#sparse-update`).

One folder, one op: ``naive.py`` is the definition written to be obviously right (the oracle),
``foreach.py`` the torch backend (each operation once over all of a group's tensors),
``quantization.py`` the 8-bit state's maps and rounding rule, ``hyper.py`` the step's
hyper-parameters (`AdamWHyper`), ``launcher.py`` + ``kernel.py`` the Triton backend (one fused
multi-tensor launch per group, fp32 or 8-bit state). `sparse_adamw` is the one entry point.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from gallop_kernels.ops.adamw import foreach
from gallop_kernels.ops.adamw.hyper import AdamWHyper
from gallop_kernels.ops.backends import resolve

__all__ = ["AdamWHyper", "sparse_adamw"]

_EIGHT_BIT_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")


def sparse_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    hyper: AdamWHyper,
    *,
    backend: str = "auto",
) -> None:
    """One AdamW step, in place, on the selected entries of tensors that share ``hyper``.

    ``states[i]`` holds ``indices`` (sorted flat int32/int64), ``exp_avg`` and ``exp_avg_sq``
    (float32, or uint8 codes with ``exp_avg_absmax``/``exp_avg_sq_absmax`` for 8-bit state) and
    optionally ``master`` (float32 weights of the selected entries). ``grads[i]`` is the dense
    gradient or the gathered one (one value per selected entry). ``backend``: "auto", "torch" or
    "triton" (`ops/backends.py`).
    """
    params, grads, states = list(params), list(grads), list(states)
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(f"got {len(params)} params, {len(grads)} grads and {len(states)} states")
    if resolve(backend, [*params, *grads]) == "torch":
        foreach.sparse_adamw(params, grads, states, hyper)
        return
    eight = [st["exp_avg"].dtype == torch.uint8 for st in states]

    from gallop_kernels.ops.adamw import launcher  # imports triton

    for layout in ("fp32", "8bit"):
        chosen = [i for i, q in enumerate(eight) if q == (layout == "8bit")]
        if not chosen:
            continue
        column = {key: [states[i].get(key) for i in chosen]
                  for key in ("indices", "exp_avg", "exp_avg_sq", "master", *_EIGHT_BIT_KEYS)}
        extra = ({"exp_avg_absmaxes": column["exp_avg_absmax"],
                  "exp_avg_sq_absmaxes": column["exp_avg_sq_absmax"]} if layout == "8bit" else {})
        launcher.sparse_adamw(
            [params[i] for i in chosen], [grads[i] for i in chosen], column["indices"],
            column["exp_avg"], column["exp_avg_sq"], column["master"], hyper,
            state_layout=layout, **extra,
        )
