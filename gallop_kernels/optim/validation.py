"""Checks on hyper-parameters and parameters, run before the optimizer changes any state."""

from __future__ import annotations

import importlib.util
import numbers
from typing import Any, Iterable

import torch

from gallop_kernels.reference import SCORE_NAMES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASTER_WEIGHT_CHOICES = ("auto", True, False)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _non_negative(name: str, value: Any) -> None:
    if not _real(name, value) >= 0.0:  # also rejects NaN
        raise ValueError(f"invalid {name}: {value} (must be >= 0)")


def check_group_options(options: dict[str, Any]) -> None:
    """Validate one param group's hyper-parameters (DESIGN §2)."""
    _non_negative("learning rate", options["lr"])
    _non_negative("eps", options["eps"])
    _non_negative("weight_decay", options["weight_decay"])
    _non_negative("score_eps", options["score_eps"])

    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _real(f"beta{i + 1}", beta) < 1.0:
            raise ValueError(f"invalid beta parameter at index {i}: {beta} (must be in [0, 1))")

    density = _real("density", options["density"])
    if not 0.0 < density <= 1.0:
        raise ValueError(f"invalid density: {density} (must be in (0, 1])")

    score = options["score"]
    if not callable(score) and score not in SCORE_NAMES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORE_NAMES} or a callable")

    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    every = options["reselect_every"]
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral):
            raise TypeError(f"reselect_every must be None or an int, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"invalid reselect_every: {every} (must be >= 1 or None)")

    if options["state_bits"] not in (8, 32) or isinstance(options["state_bits"], bool):
        raise ValueError(f"invalid state_bits: {options['state_bits']!r} (expected 32 or 8)")
    if options["state_bits"] == 8 and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("state_bits=8 uses bitsandbytes' quantization maps: pip install bitsandbytes")

    if options["master_weights"] not in MASTER_WEIGHT_CHOICES or (
        not isinstance(options["master_weights"], (bool, str))
    ):
        raise ValueError(
            f"invalid master_weights: {options['master_weights']!r} (expected 'auto', True or False)"
        )


def check_params(params: Iterable[Any]) -> None:
    """Every param must be a contiguous float32/bf16/fp16 tensor, each at most once."""
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"SparseAdamW can only optimize tensors, got {type(p).__name__}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"SparseAdamW supports float32, bfloat16 and float16 parameters, got {p.dtype}"
            )
        if p.is_sparse or not p.is_contiguous():
            raise ValueError(
                f"SparseAdamW needs dense contiguous parameters (flat indices address their "
                f"storage); got a {'sparse' if p.is_sparse else 'non-contiguous'} tensor of "
                f"shape {tuple(p.shape)}"
            )
        if id(p) in seen:
            raise ValueError("a parameter appears twice in the same parameter group")
        seen.add(id(p))


def check_grads(named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Gradients must be dense and shaped like their parameter."""
    for name, p in named_params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise ValueError(f"SparseAdamW does not support sparse gradients (parameter {name})")
        if g.shape != p.shape:
            raise ValueError(
                f"gradient of parameter {name} has shape {tuple(g.shape)}, "
                f"expected {tuple(p.shape)}"
            )
