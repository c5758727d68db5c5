"""Optional dependencies: which extra brings which package, and one clear error when one is missing.

The core (the optimizer, the ops and their kernels, the delta format) needs torch and triton,
plus safetensors (with numpy) for delta files. The applications bring the rest through pip extras
(`docs/design.md#layers`); each checks what it needs where it starts (`require`), so that a
missing package is one sentence naming the extra, not an ``ImportError`` from deep inside.
"""

from __future__ import annotations

import importlib.util

EXTRA_OF = {
    "transformers": "hf",
    "accelerate": "hf",
    "huggingface_hub": "hf",
    "yaml": "hf",
    "gguf": "model",
    "peft": "peft",
    "bitsandbytes": "bnb",
    "trl": "trl",
    "datasets": "trl",
    "matplotlib": "plot",
    "tensorboardX": "tensorboard",
}
"""The pip extra of ``gallop_kernels`` that installs each optional package (by import name)."""

PIP_NAME = {"yaml": "pyyaml"}


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra brings it."""


def missing(*packages: str) -> list[str]:
    """The packages (import names) of ``packages`` that are not installed."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def require(purpose: str, *packages: str) -> None:
    """Raise `MissingExtra` unless every package is installed.

    ``purpose`` says what needs them ("gallop finetune", "the Trainer integration"); the message
    names the packages and the one pip command that installs them."""
    absent = missing(*packages)
    if not absent:
        return
    extras = sorted({EXTRA_OF.get(p, p) for p in absent})
    names = ", ".join(PIP_NAME.get(p, p) for p in absent)
    raise MissingExtra(
        f"{purpose} needs {names}, which {'is' if len(absent) == 1 else 'are'} not installed: "
        f"pip install 'gallop_kernels[{','.join(extras)}]'"
    )


__all__ = ["EXTRA_OF", "MissingExtra", "missing", "require"]
