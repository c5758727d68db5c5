"""The selection op: the exact top-k of a group's scores (`docs/design.md#selection-semantics`).

One folder, one op: ``naive.py`` is the definition written to be obviously right (the oracle
every backend is tested against), ``streaming.py`` the torch backend (a chunked radix select that
runs on any device and streams gradients from anywhere), ``launcher.py`` the Triton backend that
runs the kernels of ``score.py`` (the score and its radix key), ``histogram.py`` (the radix
passes), ``bucket.py`` (the bucket choice on the device) and ``compaction.py`` (the ordered
output). `select` is the one entry point.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gallop_kernels.ops.backends import resolve
from gallop_kernels.ops.collective import ShardLayout
from gallop_kernels.ops.select import naive, streaming
from gallop_kernels.rules import Score, check_score_floor, index_dtype

__all__ = ["select"]


def select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    k: int,
    *,
    score: Score = "gallop",
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    layout: ShardLayout | None = None,
    backend: str = "auto",
    floors: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Per tensor, the sorted flat indices of the group's ``k`` largest scores, ties to the lower
    flat index of the group's concatenation, as `rules.index_dtype` (int32; int64 from 2³¹).

    A ``None`` gradient counts as zeros. With ``layout`` the tensors are this rank's shards of
    the group (``ops/collective.py``): ``k`` counts the whole group and the indices returned are
    local; every rank calls with its own shards. A NaN or infinite score raises ``ValueError``
    naming the parameter (on every rank), before anything is returned. ``backend``: "auto",
    "torch" or "triton" (`ops/backends.py`). ``floors``: the magnitude floor of each tensor
    (`docs/design.md#score-floor`; checked by `rules.check_score_floor`), or None.
    """
    floors = check_score_floor(floors, len(params), score)
    if resolve(backend, [*params, *grads]) == "torch":
        chosen = streaming.select(params, grads, k, score, score_eps, seed, names, layout=layout,
                                  floors=floors)
        return [c.to(index_dtype(p.numel())) for c, p in zip(chosen, params)]

    from gallop_kernels.ops.select import launcher  # imports triton

    precomputed = None
    if callable(score):  # a user's score: computed here, the kernels select from its values
        offsets = list(layout.offsets) if layout is not None else _offsets(params)
        precomputed = [naive.compute_score(p, g, score, score_eps, seed, off)
                       for p, g, off in zip(params, grads, offsets)]
        score = "precomputed"
    return launcher.select(params, grads, k, score, score_eps=score_eps, seed=seed, names=names,
                           precomputed=precomputed, layout=layout, floors=floors)


def _offsets(params: Sequence[torch.Tensor]) -> list[int]:
    offsets = [0]
    for p in params[:-1]:
        offsets.append(offsets[-1] + p.numel())
    return offsets
