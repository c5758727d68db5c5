"""Backend-neutral entry points for the two ops the optimizer needs: select and sparse step.

`backend="torch"` runs pure torch (`streaming_select.py` for selection, `reference.py` for the
step); `backend="triton"` runs the launchers in this package
(`select.py`, `sparse_adamw.py`), which call the kernels in `ops/triton/`. Triton is imported
lazily so that the package works where it is not installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Sequence

import torch

from gallop_kernels import reference
from gallop_kernels.ops.collective import ShardLayout
# (bound under another name so that `gallop_kernels.ops.streaming_select` stays the module)
from gallop_kernels.ops.streaming_select import streaming_select as _streaming_select
from gallop_kernels.reference import Score

BACKENDS = ("auto", "triton", "torch")


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run on the CPU in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    """Raise if ``backend`` is unknown or cannot run on this machine."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not (torch.cuda.is_available() or triton_interpreter_enabled()):
            raise ValueError(
                "backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before triton is "
                "imported to run the kernels on the CPU; use backend='torch' or 'auto' otherwise"
            )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: "auto" means Triton on CUDA, else torch."""
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' cannot run on {device} tensors without TRITON_INTERPRET=1"
            )
        return backend
    return "triton" if device.type == "cuda" and triton_installed() else "torch"


def select_indices(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    density: float,
    score: Score,
    score_eps: float,
    seed: int,
    names: Sequence[str],
    backend: str,
    layout: ShardLayout | None = None,
) -> list[torch.Tensor]:
    """Exact top-k selection over one group: per tensor, its sorted flat indices.

    Indices come back in the storage dtype of `reference.index_dtype`. Raises ``ValueError``
    naming the parameter if any score is NaN or infinite. With ``layout`` the tensors are this
    rank's shards of the group (see ``ops/collective.py``): k counts the whole group, and the
    indices returned are local to each shard.
    """
    total = sum(p.numel() for p in params) if layout is None else layout.total
    k = reference.k_for_density(total, density)
    if backend == "torch":
        # The chunked radix select, not the reference's whole-group sort: it needs O(chunk)
        # memory instead of ~32 bytes per entry, and selects the identical set (tested).
        chosen = _streaming_select(
            params, grads, k, score, score_eps, seed, names, layout=layout
        )
        return [c.to(reference.index_dtype(p.numel())) for c, p in zip(chosen, params)]

    from gallop_kernels.ops.select import triton_select

    precomputed = None
    if callable(score):
        if layout is not None:
            offsets = list(layout.offsets)
        else:
            offsets = [0]
            for p in params[:-1]:
                offsets.append(offsets[-1] + p.numel())
        precomputed = [
            reference.compute_score(p, g, score, score_eps, seed, off)
            for p, g, off in zip(params, grads, offsets)
        ]
        score = "precomputed"
    sharded = {}
    if layout is not None:
        if not triton_accepts_layout():
            raise NotImplementedError(
                "the Triton selection does not take a ShardLayout in this version; select "
                "sharded groups with backend='torch'"
            )
        sharded["layout"] = layout
    return triton_select(
        params, grads, k, score, score_eps=score_eps, seed=seed, names=names,
        precomputed=precomputed, **sharded,
    )


def triton_accepts_layout() -> bool:
    """Whether ``triton_select`` selects sharded groups (takes ``layout=``)."""
    from gallop_kernels.ops.select import triton_select

    return "layout" in inspect.signature(triton_select).parameters


def sparse_adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor | None],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    backend: str,
) -> None:
    """One sparse AdamW step for tensors that share the same step count, in place."""
    if backend == "torch":
        for args in zip(params, grads, indices, exp_avgs, exp_avg_sqs, masters):
            reference.sparse_adamw_step(*args, step, lr, beta1, beta2, eps, weight_decay)
        return

    from gallop_kernels.ops.sparse_adamw import triton_sparse_adamw_step

    triton_sparse_adamw_step(
        list(params), list(grads), list(indices), list(exp_avgs), list(exp_avg_sqs),
        list(masters), step, lr, beta1, beta2, eps, weight_decay,
    )


def sparse_adamw_update_8bit(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    backend: str,
) -> None:
    """`sparse_adamw_update` for 8-bit blockwise m, v (state keys ``exp_avg``, ``exp_avg_absmax``,
    ``exp_avg_sq``, ``exp_avg_sq_absmax``, ``indices``, optional ``master``)."""
    keys = ("indices", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")
    if backend == "torch":
        for p, g, st in zip(params, grads, states):
            reference.sparse_adamw_step_8bit(
                p, g, *(st[k] for k in keys), st.get("master"),
                step, lr, beta1, beta2, eps, weight_decay,
            )
        return

    from gallop_kernels.ops.sparse_adamw import triton_sparse_adamw_step

    columns = {k: [st[k] for st in states] for k in keys}
    triton_sparse_adamw_step(
        list(params), list(grads), columns["indices"], columns["exp_avg"], columns["exp_avg_sq"],
        [st.get("master") for st in states], step, lr, beta1, beta2, eps, weight_decay,
        state_layout="8bit", exp_avg_absmaxes=columns["exp_avg_absmax"],
        exp_avg_sq_absmaxes=columns["exp_avg_sq_absmax"],
    )
