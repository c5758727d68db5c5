"""Helpers both demos share: device choice, optimizer-state bytes, progress bars, byte sizes."""

from __future__ import annotations

import sys
from typing import Iterator

import torch


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


def progress(steps: int, desc: str, show: bool) -> Iterator[int]:
    """A tqdm bar on stderr when asked for (and installed), else a plain range."""
    if not show:
        return iter(range(steps))
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return iter(range(steps))
    return iter(tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True))


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
