"""`AdamWHyper`: the hyper-parameters of one sparse AdamW step, one value for every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AdamWHyper:
    """What a step needs besides the tensors: ``step`` counts from the selection (>= 1)."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"step must be an int >= 1, got {self.step!r}")

    def scalars(self) -> tuple[float, ...]:
        """The kernels' scalar arguments, as torch computes them: in Python doubles, rounded to
        float32 when passed: decay, β1, 1-β1, β2, 1-β2, sqrt(1-β2^t), -lr/(1-β1^t), eps."""
        return (
            1.0 - self.lr * self.weight_decay, self.beta1, 1.0 - self.beta1, self.beta2,
            1.0 - self.beta2, math.sqrt(1.0 - self.beta2**self.step),
            -self.lr / (1.0 - self.beta1**self.step), self.eps,
        )
