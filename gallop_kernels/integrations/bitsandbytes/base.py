"""The frozen base weight of a linear layer: a bitsandbytes ``Linear4bit`` or a plain ``nn.Linear``.

This is the only module that touches bitsandbytes, and it never imports it on its own: a model
can only hold ``Linear4bit`` layers once something else (transformers' 4-bit loader) imported
bitsandbytes, so until then every layer is answered "not 4-bit" without the import (which is slow
and prints kernel warnings). bitsandbytes is used for one thing: ``dequantize_4bit``.

CPU note: on an AVX512-BF16 CPU, ``Linear4bit.forward`` in eval mode without grad repacks the
weight *in place* into an inference layout that ``dequantize_4bit`` cannot read. The sparse-delta
layer therefore never calls the bitsandbytes forward on CPU, and a repacked weight is refused.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (NF4/FP4)."""
    bnb = sys.modules.get("bitsandbytes")
    nn_mod = getattr(bnb, "nn", None) if bnb is not None else None
    linear4bit = getattr(nn_mod, "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight of a ``Linear4bit`` (dequantized, a fresh tensor) or ``nn.Linear`` (itself).

    The dequantized weight has the dtype the model was quantized from (``quant_state.dtype``).
    """
    if not is_linear4bit(base):
        return base.weight.detach()
    from bitsandbytes.functional import dequantize_4bit

    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(base, "quant_state", None)
    if state is None:
        raise ValueError("this Linear4bit has no quant_state (it was never quantized)")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "this Linear4bit was repacked in place for bitsandbytes' CPU inference kernel "
            "(it ran in eval mode without grad on an AVX512-BF16 CPU); dequantize_4bit cannot "
            "read that layout. Wrap the model before running inference on it, or reload it."
        )
    return dequantize_4bit(weight.data, state)


def base_quantization(base: nn.Module) -> str:
    """``"nf4"``/``"fp4"`` for a 4-bit base, ``"none"`` for a plain one (delta metadata)."""
    if is_linear4bit(base):
        state = getattr(base.weight, "quant_state", None)
        return str(getattr(state, "quant_type", "4bit"))
    return "none"
