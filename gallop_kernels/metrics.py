"""The paper's evaluation metrics: ID accuracy, OOD accuracy, forget ratio and collapse rate.

GaLLoP (arXiv 2510.19778) fine-tunes a pre-trained model on one task (in-distribution, ID) and
measures what happens to the tasks it already knew (out-of-distribution, OOD):

- **ID accuracy**: accuracy on the fine-tuning task after fine-tuning.
- **OOD accuracy**: mean accuracy over the other tasks after fine-tuning.
- **Forget ratio** of one run: ``max(0, (acc_vanilla_OOD - acc_OOD) / acc_vanilla_OOD)``, where
  ``acc_vanilla_OOD`` is the OOD accuracy of the model before fine-tuning. 0 means nothing was
  forgotten (or OOD improved); 1 means all of it was.
- **Collapse rate**: the fraction of OOD tasks whose accuracy fell to about zero
  (``<= collapse_threshold``, default 0.01) after fine-tuning.

Accuracies are fractions in [0, 1]. Everything here is plain Python on floats, so it works for
any evaluation (exact match, per-token accuracy, multiple choice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

DEFAULT_COLLAPSE_THRESHOLD = 0.01


def _check_accuracy(value: float, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be an accuracy in [0, 1], got {value!r}")
    return v


def _values(accuracies: Mapping[str, float] | Sequence[float], what: str) -> list[float]:
    items = accuracies.items() if isinstance(accuracies, Mapping) else enumerate(accuracies)
    values = [_check_accuracy(v, f"{what}[{k!r}]") for k, v in items]
    if not values:
        raise ValueError(f"{what} is empty: need the accuracy of at least one task")
    return values


def mean_accuracy(accuracies: Mapping[str, float] | Sequence[float]) -> float:
    """Unweighted mean of per-task accuracies (the OOD accuracy of a run)."""
    values = _values(accuracies, "accuracies")
    return sum(values) / len(values)


def forget_ratio(acc_vanilla_ood: float, acc_ood: float) -> float:
    """``max(0, (acc_vanilla_ood - acc_ood) / acc_vanilla_ood)`` for one run.

    Raises ``ValueError`` when the vanilla OOD accuracy is 0: there was nothing to forget and the
    ratio is undefined (the paper's tasks never hit this; a synthetic setup that does is broken).
    """
    vanilla = _check_accuracy(acc_vanilla_ood, "acc_vanilla_ood")
    tuned = _check_accuracy(acc_ood, "acc_ood")
    if vanilla == 0.0:
        raise ValueError("forget ratio is undefined when the vanilla OOD accuracy is 0")
    return max(0.0, (vanilla - tuned) / vanilla)


def collapse_rate(
    ood_accuracies: Mapping[str, float] | Sequence[float],
    threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
) -> float:
    """Fraction of OOD tasks whose accuracy is ``<= threshold`` (fell to about zero)."""
    threshold = _check_accuracy(threshold, "threshold")
    values = _values(ood_accuracies, "ood_accuracies")
    return sum(v <= threshold for v in values) / len(values)


@dataclass(frozen=True)
class RunMetrics:
    """The paper's metrics for one fine-tuning run."""

    id_accuracy: float
    ood_accuracy: float
    vanilla_ood_accuracy: float
    forget_ratio: float
    collapse_rate: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def run_metrics(
    tuned: Mapping[str, float],
    vanilla: Mapping[str, float],
    id_task: str,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
) -> RunMetrics:
    """All metrics of one run from per-task accuracies after (``tuned``) and before (``vanilla``).

    ``id_task`` names the fine-tuning task; every other task in ``tuned`` is OOD and must also
    appear in ``vanilla``.
    """
    if id_task not in tuned:
        raise ValueError(f"id_task {id_task!r} is not among the evaluated tasks {sorted(tuned)}")
    ood = {k: v for k, v in tuned.items() if k != id_task}
    if not ood:
        raise ValueError("need at least one OOD task besides the ID task")
    missing = sorted(set(ood) - set(vanilla))
    if missing:
        raise ValueError(f"vanilla accuracies are missing OOD task(s) {missing}")
    acc_ood = mean_accuracy(ood)
    acc_vanilla = mean_accuracy({k: vanilla[k] for k in ood})
    return RunMetrics(
        id_accuracy=_check_accuracy(tuned[id_task], f"tuned[{id_task!r}]"),
        ood_accuracy=acc_ood,
        vanilla_ood_accuracy=acc_vanilla,
        forget_ratio=forget_ratio(acc_vanilla, acc_ood),
        collapse_rate=collapse_rate(ood, collapse_threshold),
    )


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) over seeds."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)
