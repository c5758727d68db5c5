"""Model configs for the memory report: built-in presets, or a ``config.json`` path.

* ``llama3-8b``: the Llama-3-8B shape (hidden 4096, 32 layers, MLP 14336, vocab 128256, GQA 32/8
  heads, untied ``lm_head``): 8.03 B parameters. Only predicted here (no weights are downloaded).
* ``llama3-70b``: the Llama-3-70B shape (hidden 8192, 80 layers, MLP 28672, vocab 128256, GQA
  64/8 heads): 70.55 B parameters; predicted only (``gallop memory --gpus`` for FSDP2).
* ``llama-0.3b``: the same architecture scaled down to 0.37 B parameters for CPU measurements.
  The vocabulary stays at 128256, so the embedding, ``lm_head`` and the fp32 logits temporaries
  (which dominate an 8B model's activation peak) are exercised at their real width.
* ``llama-tiny``: a few million parameters, for a seconds-long pipeline test.

A path may name a ``config.json`` file or a directory that holds one (a Hugging Face checkpoint).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-0.3b": dict(
        vocab_size=128256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-tiny": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}

_COMMON = dict(use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


class ConfigError(ValueError):
    """The ``--config`` argument names neither a preset nor a readable Llama ``config.json``."""


def _llama_config(fields: dict[str, Any]) -> SimpleNamespace:
    # The config's fields as attributes; `llama_config` turns them into a transformers
    # LlamaConfig where a model is built, so predictions never import transformers.
    return SimpleNamespace(**fields)


def llama_config(config: SimpleNamespace) -> Any:
    """The ``transformers.LlamaConfig`` of a config from :func:`load_config`."""
    from transformers import LlamaConfig

    return LlamaConfig(**vars(config))


def load_config(name_or_path: str) -> SimpleNamespace:
    """The fields of a Llama config (attributes, as in ``LlamaConfig``) for a preset name or a
    ``config.json`` file/directory; :func:`llama_config` builds the ``transformers`` object.

    Raises `ConfigError` (with the list of presets) for anything else.
    """
    if name_or_path in PRESETS:
        return _llama_config({**PRESETS[name_or_path], **_COMMON})
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) and no "
            f"config.json at {path!r}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model config {path!r}: {e}") from e
    if not isinstance(fields, dict):
        raise ConfigError(f"model config {path!r} is not a JSON object")
    model_type = fields.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError(
            f"model config {path!r} has model_type {model_type!r}; the memory model covers "
            "Llama-architecture decoders (llama, mistral)"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in fields]
    if missing:
        raise ConfigError(f"model config {path!r} lacks {', '.join(missing)}")
    keep = {k: v for k, v in fields.items() if k not in ("architectures", "model_type",
                                                          "transformers_version")}
    return _llama_config({**keep, **_COMMON})


def config_name(name_or_path: str) -> str:
    """A short label for tables and file names."""
    if name_or_path in PRESETS:
        return name_or_path
    return os.path.basename(os.path.normpath(name_or_path)) or name_or_path
