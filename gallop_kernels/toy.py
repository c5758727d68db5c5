"""The toy world: a tiny Llama, a byte-level chat tokenizer and generated sequence tasks. No download.

One module for everything that must run in seconds on a CPU: ``gallop demo --tiny`` (a tiny Llama
pretrained on one generated task, then fine-tuned sparsely on another), the reproduction's smoke
setting and the real-model smoke tests (:func:`tiny_chat_model`: the same chat pipeline as the
real model, on a random tiny model), ``gallop_kernels.finetune.tiny`` (a model folder to try
``gallop finetune`` on) and the tests.

The generated tasks: every example is ``BOS TASK x_1 .. x_L SEP y_1 .. y_L``. The vocabulary
holds two alphabets of ``num_symbols`` symbols, written ``0 1 2 ..`` and ``a b c ..``. Task A
(copy) reads and writes digits, task B (decode) reads letters and writes their successor digits,
so the two tasks share the model but not the tokens they read: the situation of fine-tuning a
pretrained model on a new domain. (With both tasks on one alphabet the only cue is the task
token; fine-tuning on B then simply remaps the copy circuit and A is lost whatever the optimizer,
which would demonstrate nothing about it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gallop_kernels.extras import require

IGNORE = -100  # the label value Hugging Face causal-LM losses skip

# --------------------------------------------------------------------------------------------
# The tiny model and tokenizer
# --------------------------------------------------------------------------------------------


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                      max_positions: int = 64, *, num_kv_heads: int | None = None,
                      intermediate_size: int | None = None, tie_word_embeddings: bool = False,
                      pad_token_id: int | None = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> Any:
    """A real ``LlamaConfig`` (RMSNorm, RoPE, SwiGLU) scaled down to thousands of parameters."""
    require("the tiny Llama", "transformers")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings, use_cache=False,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def build_tiny_model(config: Any, seed: int, device: str | torch.device = "cpu") -> Any:
    """Randomly initialised ``LlamaForCausalLM``; the seed makes the initial weights reproducible."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# ChatML-like, with the tokenizer's own special tokens: "<s>role\ncontent</s>\n" per message.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def byte_tokenizer(chat_template: bool = True) -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per byte (260 tokens) and a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        out.chat_template = BYTE_CHAT_TEMPLATE
    return out


def tiny_chat_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                    max_positions: int = 256) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a random tiny Llama over the byte tokenizer. Exercises the real-model
    pipeline (chat template, tasks, methods, metrics) in seconds; it knows nothing."""
    tok = byte_tokenizer()
    config = tiny_llama_config(len(tok), hidden_size=hidden_size, num_layers=num_layers,
                               max_positions=max_positions, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return build_tiny_model(config, seed), tok


# --------------------------------------------------------------------------------------------
# Generated sequence tasks (the tiny demo)
# --------------------------------------------------------------------------------------------

PAD, BOS, SEP = 0, 1, 2
NUM_SPECIAL = 5  # PAD, BOS, SEP and the two task tokens; the symbols follow


@dataclass(frozen=True)
class Task:
    """A rule from input symbols to answer symbols, marked by its own token."""

    name: str
    token: int
    in_alphabet: int  # 0: "0 1 2 ..", 1: "a b c .."
    out_alphabet: int
    rule: Callable[[torch.Tensor, int], torch.Tensor]  # (x [n, L] in 0..S-1, S) -> y [n, L]
    description: str


def _copy(x: torch.Tensor, num_symbols: int) -> torch.Tensor:
    return x.clone()


def _successor(x: torch.Tensor, num_symbols: int) -> torch.Tensor:
    return (x + 1) % num_symbols


TASK_A = Task("copy", 3, 0, 0, _copy, "repeat the digits")
TASK_B = Task("decode", 4, 1, 0, _successor, "letters to digits, shifted by one: a->1, b->2, .., j->0")


def vocab_size(num_symbols: int) -> int:
    """Size of the token vocabulary for alphabets of ``num_symbols`` symbols."""
    return NUM_SPECIAL + 2 * num_symbols


def is_held_out(x: torch.Tensor) -> torch.Tensor:
    """Deterministic split: about one input sequence in eight (by a hash) is reserved for evaluation."""
    weights = torch.tensor([pow(31, i, 1009) for i in range(x.shape[-1])], dtype=torch.long)
    return (x * weights).sum(-1) % 8 == 0


@dataclass
class Batch:
    """Token ids and labels (IGNORE everywhere but the answer tokens)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device))


def sample_inputs(batch_size: int, length: int, num_symbols: int, generator: torch.Generator,
                  split: str = "train") -> torch.Tensor:
    """Uniform random inputs (values 0..S-1) from the ``"train"`` or ``"eval"`` split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    parts, have = [], 0
    while have < batch_size:  # rejection-sample the split; a draw keeps ~1/8 (eval) or ~7/8
        x = torch.randint(num_symbols, (2 * batch_size + 16, length), generator=generator)
        x = x[is_held_out(x) == (split == "eval")]
        parts.append(x)
        have += len(x)
    return torch.cat(parts)[:batch_size]


def encode(task: Task, x: torch.Tensor, num_symbols: int) -> Batch:
    """Token sequences and answer-only labels for inputs ``x`` of ``task``."""
    n, length = x.shape
    x_offset = NUM_SPECIAL + task.in_alphabet * num_symbols
    y_offset = NUM_SPECIAL + task.out_alphabet * num_symbols
    y = task.rule(x, num_symbols)
    head = torch.tensor([BOS, task.token], dtype=torch.long).expand(n, 2)
    sep = torch.full((n, 1), SEP, dtype=torch.long)
    input_ids = torch.cat([head, x + x_offset, sep, y + y_offset], dim=1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -length:] = input_ids[:, -length:]
    return Batch(input_ids, labels)


def make_batch(task: Task, batch_size: int, length: int, num_symbols: int,
               generator: torch.Generator, split: str = "train") -> Batch:
    """Sample ``batch_size`` examples of ``task`` from the ``"train"`` or ``"eval"`` split."""
    return encode(task, sample_inputs(batch_size, length, num_symbols, generator, split), num_symbols)


def render(input_ids: torch.Tensor, num_symbols: int) -> str:
    """One example as text, e.g. ``<copy> 3 1 4 = 3 1 4``."""
    names = {PAD: "<pad>", BOS: "", SEP: "=", TASK_A.token: f"<{TASK_A.name}>", TASK_B.token: f"<{TASK_B.name}>"}
    out = []
    for t in input_ids.tolist():
        if t < NUM_SPECIAL:
            out.append(names[t])
            continue
        alphabet, i = divmod(t - NUM_SPECIAL, num_symbols)
        out.append(str(i) if alphabet == 0 else (chr(ord("a") + i) if i < 26 else f"a{i}"))
    return " ".join(s for s in out if s)


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: Batch, chunk: int = 512) -> float:
    """Teacher-forced per-token accuracy on the answer tokens (argmax of the next-token logits)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for start in range(0, len(batch.input_ids), chunk):
        ids = batch.input_ids[start:start + chunk]
        target = batch.labels[start:start + chunk, 1:]
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        mask = target != IGNORE
        correct += (pred[mask] == target[mask]).sum().item()
        total += mask.sum().item()
    model.train(was_training)
    return correct / total
