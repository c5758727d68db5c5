"""One source for each rule that several layers check: option ranges, score names, k, index sets.

The optimizer, phase one, the delta file format, the 4-bit delta path and the CLI all refuse the
same bad input with the same words, because they all call these functions (see
`docs/design.md#rules`). Each check raises ``TypeError`` for a wrong kind of value and
``ValueError`` for a value out of range, before the caller changes anything. The message names
the option as the caller spells it (``name="--density"`` in the CLI).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = Union[str, ScoreFn]

SCORE_NAMES = ("gallop", "gradient", "magnitude", "random")
"""The named scores (`docs/design.md#selection-semantics`); a callable is the user's own."""

INT32_LIMIT = 2**31

DEFAULT_MIN_8BIT_ENTRIES = 4096
"""``SparseAdamW(state_bits=8, min_8bit_entries=...)``'s default: a tensor with fewer selected
entries keeps fp32 moments, as bitsandbytes' ``min_8bit_size`` does for whole tensors."""

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The param and gradient dtypes every backend supports."""


def k_for_density(numel: int, density: float) -> int:
    """Number of entries to select: ``min(N, max(1, floor(density * N + 0.5)))`` (0 for N = 0)."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def index_dtype(numel: int) -> torch.dtype:
    """Per-tensor index dtype: int32, or int64 for a tensor of 2^31 entries or more."""
    return torch.int64 if numel >= INT32_LIMIT else torch.int32


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_fraction(value: Any, name: str = "density") -> float:
    """A fraction in (0, 1] (density ρ, calibration fraction d_s); NaN is refused."""
    number = _real(name, value)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must be in (0, 1])")
    return number


def check_score(score: Any, name: str = "score", allow_callable: bool = True) -> None:
    """A score name of `SCORE_NAMES`, or (where allowed) a ``(param, grad)`` callable."""
    if allow_callable and callable(score):
        return
    if not isinstance(score, str) or score not in SCORE_NAMES:
        extra = " or a callable" if allow_callable else ""
        raise ValueError(f"unknown {name} {score!r}; expected one of {', '.join(SCORE_NAMES)}{extra}")


FLOORED_SCORES = ("gallop", "magnitude")
"""The named scores that read |θ|, and so the ones a magnitude floor changes."""


def check_score_floor(value: Any, num_tensors: int | None, score: Any = "gallop",
                      name: str = "score_floor") -> list[float] | None:
    """The magnitude floor of a group's score (`docs/design.md#score-floor`): ``None`` (none),
    one finite number >= 0 for every tensor, or a sequence of them, one per tensor in group order.

    Returns the per-tensor floors rounded to float32 (the value every backend compares |θ| with),
    or ``None``; ``num_tensors=None`` (a default, before the group has params) skips the count. A floor only means something for the scores that read |θ|
    (`FLOORED_SCORES`); with another score it is refused rather than silently ignored.
    """
    if value is None:
        return None
    if isinstance(score, str) and score not in FLOORED_SCORES or callable(score):
        raise ValueError(f"{name} applies to the {' and '.join(map(repr, FLOORED_SCORES))} scores only, "
                         f"not to score {score if isinstance(score, str) else 'callable'!r}")
    if isinstance(value, (str, bytes, torch.Tensor)) or not hasattr(value, "__len__"):
        values = [value] * (1 if num_tensors is None else num_tensors)
    else:
        values = list(value)
        if num_tensors is not None and len(values) != num_tensors:
            raise ValueError(f"{name} has {len(values)} value(s) for {num_tensors} tensor(s); give one per "
                             "tensor of the group, or one number for all")
    out = []
    for v in values:
        number = _real(name, v)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"invalid {name}: {v!r} (must be finite and >= 0)")
        out.append(float(torch.tensor(number, dtype=torch.float32)))
    return out


def check_count(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> None:
    """An integer of at least ``minimum`` (``None`` too when ``allow_none``); bools are refused."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "None or an int" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"invalid {name}: {value} (must be >= {minimum}{' or None' if allow_none else ''})")


def check_index_set(indices: Any, numel: int, where: str) -> torch.Tensor:
    """Flat indices into a tensor of ``numel`` entries: a 1-D int32/int64 tensor, strictly
    increasing (sorted and unique), every index in ``[0, numel)``. Returns them as int64.

    ``where`` names the tensor in the message (``"layer 'q_proj'"``, ``"delta tensor 'w'"``).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"{where}: indices must be an int32/int64 tensor, got {got}")
    if indices.dim() != 1:
        raise ValueError(f"{where}: indices must be one-dimensional, got shape {tuple(indices.shape)}")
    idx = indices.to(torch.int64)
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= numel:
            raise ValueError(f"{where}: an index is out of range for {numel} entries")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{where}: indices must be sorted and unique")
    return idx


__all__ = ["DEFAULT_MIN_8BIT_ENTRIES", "FLOORED_SCORES", "INDEX_DTYPES", "INT32_LIMIT", "SCORE_NAMES",
           "Score", "ScoreFn", "FLOAT_DTYPES", "check_count", "check_fraction", "check_index_set", "check_score",
           "check_score_floor", "index_dtype", "k_for_density"]
