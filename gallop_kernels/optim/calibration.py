"""GaLLoP phase one without the model's dense gradient on the accelerator.

`calibrate` runs backward over calibration batches with a post-accumulate-grad hook on every
parameter that moves its gradient into an fp32 host buffer and frees it at once, so at most one
parameter's dense gradient lives on the device at a time. The mean gradient is then streamed back
chunk by chunk through the exact radix select (`ops/streaming_select.py`).

Cost: 4 bytes of host memory per trainable entry (pinned when CUDA is present: 32 GB for an 8B
model), one device-to-host copy of every gradient per batch, and four chunked host-to-device
passes over the gradients during selection (three radix passes and the compaction).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def _host_buffer(param: torch.Tensor) -> torch.Tensor:
    pin = param.device.type == "cuda"
    return torch.zeros(param.shape, dtype=torch.float32, pin_memory=pin)


def calibrate(
    optimizer: Any,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    max_batches: int | None = None,
    average: bool = True,
) -> int:
    """Average the task gradient over ``batches`` on the host, then ``optimizer.select`` from it.

    Args:
        optimizer: a `SparseAdamW`.
        batches: calibration data; each item is passed to ``loss_fn``.
        loss_fn: ``batch -> scalar loss`` (runs the forward pass).
        max_batches: stop after this many batches (the fraction d_s of the training data).
        average: divide the summed gradient by the number of batches; ``False`` when ``loss_fn``
            already weights each batch (e.g. by its share of the calibration examples).

    Returns the number of batches used. Existing ``.grad`` s are cleared first; on return every
    parameter's ``.grad`` is None and the selection is installed (lean mode freezes as usual).
    """
    optimizer.unfreeze()
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums = {p: _host_buffer(p) for p in params if p.requires_grad}

    def offload(param: torch.Tensor) -> None:
        with torch.no_grad():
            sums[param].add_(param.grad.to("cpu", torch.float32))
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(offload) for p in sums]
    lean = getattr(optimizer, "_lean", None)
    if lean is not None:
        lean.paused = True
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            loss = loss_fn(batch)
            loss.backward()
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        if lean is not None:
            lean.paused = False
    if used == 0:
        raise ValueError("calibrate() got no batches")
    if average:
        for buffer in sums.values():
            buffer.div_(used)
    optimizer.select(gradients=sums)
    optimizer.zero_grad(set_to_none=True)
    return used
