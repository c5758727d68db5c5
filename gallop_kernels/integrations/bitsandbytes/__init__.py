"""GaLLoP on a 4-bit (NF4) bitsandbytes base: the selected entries train as a sparse fp32 delta.

A `transformers` model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` holds its linear
weights as ``bitsandbytes.nn.Linear4bit`` (packed 4-bit codes, never trainable). GaLLoP still
applies, qSpIEL-style (`docs/design.md#four-bit-delta`)::

    wrapped = select_sparse_delta(model, batches, loss_fn, density=0.01)   # phase one
    opt = delta_optimizer(model, lr=1e-4)                                  # phase two
    ...
    save_delta("delta.safetensors", extract_sparse_delta(model, base_model=name))

One module per concern:

* `base` -- the frozen base weight (the only use of bitsandbytes: ``dequantize_4bit``, imported
  only once the model holds 4-bit layers);
* `autograd` -- ``x @ (W + Δ)ᵀ + b`` with only sparse state saved for backward;
* `layer` -- :class:`SparseDeltaLinear` (``delta_indices`` buffer + fp32 ``delta_values``);
* `selection` -- phase one through gradient taps into the shared phase-one loop;
* `training` -- :func:`delta_optimizer`, plain AdamW over the delta values;
* `io` -- the delta as trainable state or in the `gallop_kernels.delta` file format.

Memory per wrapped layer of shape out × in, compute dtype c: W + Δ in c exists only inside the
layer's forward and again for ``grad_x``; the dense fp32 weight gradient exists only long enough
to gather its selected entries (or, in phase one, to reach the host buffer); persistently 4 bytes
of index + 4 bytes of value per selected entry plus 8 bytes of AdamW state. Activation
checkpointing (reentrant or not) works.
"""

from gallop_kernels.integrations.bitsandbytes.base import dequantized_weight, is_linear4bit
from gallop_kernels.integrations.bitsandbytes.io import (
    apply_sparse_delta,
    extract_sparse_delta,
    load_sparse_delta_state,
    sparse_delta_state,
)
from gallop_kernels.integrations.bitsandbytes.layer import (
    SparseDeltaLinear,
    delta_parameters,
    sparse_delta_modules,
)
from gallop_kernels.integrations.bitsandbytes.selection import (
    DeltaTaps,
    select_sparse_delta,
    select_sparse_delta_from_dataset,
)
from gallop_kernels.integrations.bitsandbytes.training import delta_optimizer

__all__ = [
    "DeltaTaps",
    "SparseDeltaLinear",
    "apply_sparse_delta",
    "delta_optimizer",
    "delta_parameters",
    "dequantized_weight",
    "extract_sparse_delta",
    "is_linear4bit",
    "load_sparse_delta_state",
    "select_sparse_delta",
    "select_sparse_delta_from_dataset",
    "sparse_delta_modules",
    "sparse_delta_state",
]
