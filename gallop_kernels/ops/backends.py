"""Which implementation runs an op: the one place a backend is chosen (`docs/design.md#backends`).

Every op (`ops.select`, `ops.adamw`) has a pure-torch oracle (``naive.py``, for tests), a torch
backend that runs anywhere and a Triton backend. ``backend="auto"`` picks Triton when every tensor
the op reads is on a CUDA device and triton is importable, torch otherwise, quietly; a backend
asked for by name that cannot run here raises the real reason. This module is also the only
reader of ``TRITON_INTERPRET`` (Triton kernels interpreted on the CPU, as the tests run them).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on the CPU in its interpreter (``TRITON_INTERPRET=1``, which
    must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` if ``backend`` is unknown or, asked for by name, cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not (torch.cuda.is_available() or interpreter_enabled()):
            raise ValueError(
                "backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before triton is "
                "imported to run the kernels on the CPU; use backend='torch' or 'auto' otherwise"
            )


def check_device(device: torch.device) -> None:
    """Raise unless Triton kernels can run on ``device`` here (CUDA, or the CPU interpreter)."""
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device} (or set TRITON_INTERPRET=1 before "
            f"importing triton to run them on the CPU)"
        )


def resolve(backend: str, tensors: Iterable[torch.Tensor | None]) -> str:
    """The concrete backend ("torch" or "triton") for an op reading ``tensors`` (None skipped).

    "auto": Triton when all of them are on one CUDA device, else torch (a gradient kept in host
    memory, say, is streamed by the torch backend). "triton" by name on tensors it cannot read
    raises; "torch" always runs.
    """
    devices = {t.device for t in tensors if t is not None}
    if backend == "torch":
        return "torch"
    if backend == "triton":
        for device in devices:
            check_device(device)
        if len(devices) > 1:
            raise ValueError(
                f"backend='triton' needs every tensor of an op on one device, got {sorted(map(str, devices))}"
            )
        return "triton"
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    one_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
    return "triton" if one_cuda and triton_installed() else "torch"
