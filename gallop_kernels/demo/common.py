"""Helpers both demos share: device choice, optimizer-state bytes, progress bars, sizes in MB."""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its per-parameter state."""
    return sum(v.numel() * v.element_size()
               for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def progress(steps: int | Sequence[T], desc: str, show: bool, unit: str = "step") -> Iterator[Any]:
    """``range(steps)`` (or the items of ``steps``) with a tqdm bar on stderr when asked for (and
    installed): the demos' sign of life, a tick per training step, measured task or phase-one batch."""
    items = range(steps) if isinstance(steps, int) else steps
    if not show:
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return iter(items)
    return iter(tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True))


def megabytes(n: int) -> str:
    """A size for people, in decimal units like every size gallop prints (1 MB = 10^6 bytes)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
