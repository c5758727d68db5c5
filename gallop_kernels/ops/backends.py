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
import re
import warnings
from typing import Iterable

import torch

BACKENDS = ("auto", "triton", "torch")
# The Triton releases the kernels are built and checked for (pyproject.toml declares the same):
# 3.6 (torch 2.10/2.11) to the newest (3.9 today); CI compiles them on 3.6.0, 3.7.1, 3.8.0, 3.9.0.
TRITON_MIN = (3, 6)


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on the CPU in its interpreter (``TRITON_INTERPRET=1``, which
    must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_problem() -> str | None:
    """Why the installed triton cannot run the kernels (missing, or older than the declared
    range), else None. Reads the package's version without importing it."""
    if not triton_installed():
        return "the triton package is not installed"
    from importlib import metadata

    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:  # an unpackaged source tree: trust it
        return None
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < TRITON_MIN:
        need = ".".join(map(str, TRITON_MIN))
        return (f"gallop_kernels' Triton kernels need triton >= {need} (the range declared in "
                f"pyproject.toml and checked in CI), found triton {version}: install a torch whose "
                f"triton is {need} or newer (torch >= 2.10), or use backend='torch'")
    return None


_warned: set[str] = set()


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` if ``backend`` is unknown or, asked for by name, cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        problem = triton_problem()
        if problem is not None:
            raise ValueError(f"backend='triton': {problem}")
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
    if not one_cuda or not triton_installed():
        return "torch"
    problem = triton_problem()
    if problem is not None:  # an installed triton outside the range: say so once, run torch
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"{problem}; backend='auto' runs the torch backend", stacklevel=3)
        return "torch"
    return "triton"
