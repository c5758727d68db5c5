"""A tiny local Llama with a byte-level tokenizer, for trying ``gallop finetune`` without a hub.

    python -m gallop_kernels.finetune.tiny tiny-llama      # writes a loadable model directory
    gallop finetune --model tiny-llama --data my.jsonl --output out

The model and tokenizer come from `gallop_kernels/toy.py`, the one home of the tiny model.
"""

from __future__ import annotations

import argparse
import os

from gallop_kernels.toy import build_tiny_model, byte_tokenizer, tiny_llama_config


def save_tiny_model(path: str | os.PathLike, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    max_positions: int = 256) -> str:
    """Write a randomly initialised tiny ``LlamaForCausalLM`` and its tokenizer to ``path``."""
    tokenizer = byte_tokenizer()
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                               max_positions=max_positions, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    build_tiny_model(config, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return os.fspath(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"wrote {save_tiny_model(args.path, args.hidden_size, args.layers)}")
    return 0


__all__ = ["byte_tokenizer", "main", "save_tiny_model"]

if __name__ == "__main__":
    raise SystemExit(main())
