"""Generated sequence tasks for the reproduction: a pre-training mixture and a fine-tuning task.

Every example is ``BOS RULE x_1 .. x_L SEP y_1 .. y_L``. The rule token says which rule maps the
input x to the answer y; loss and accuracy look only at y. Symbols come from two alphabets of
``num_symbols`` each, digits and letters, and a task is a (rule, alphabet) pair, so one rule token
serves both alphabets.

Pre-training (the "pre-trained knowledge", the OOD tasks of the evaluation) covers five rules
(copy, reverse, increment, sort, rotate) on digits and four of them on letters. The fine-tuning
(ID) task is ``decrement`` on letters: a new rule (its token never appears in pre-training) on a
known alphabet. Fine-tuning data touches only letters and the new token; the question is how much
of the rest survives it. (A first attempt used the held-out pair increment/letters as the ID task:
no method learned it in the step budget, because the increment token's strong digit prior has to
be overcome, so that setting measured nothing about the trade-off.)

Accuracy is exact match of the whole answer under teacher forcing, which equals exact match of
greedy decoding: if every next-token argmax of the answer is right given the right prefix, greedy
decoding produces exactly that answer; if one is wrong, it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PAD, BOS, SEP = 0, 1, 2
IGNORE = -100


def _copy(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.clone()


def _reverse(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.flip(-1)


def _increment(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x + 1) % s


def _sort(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.sort(-1).values


def _rotate(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.roll(-1, dims=-1)


def _decrement(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x - 1) % s


RULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "copy": _copy, "reverse": _reverse, "increment": _increment, "sort": _sort, "rotate": _rotate,
    "decrement": _decrement,
}
ALPHABETS = ("digits", "letters")
NUM_SPECIAL = 3 + len(RULES)  # PAD, BOS, SEP and one token per rule; the symbols follow


@dataclass(frozen=True)
class Task:
    rule: str
    alphabet: int  # 0: digits, 1: letters

    @property
    def name(self) -> str:
        return f"{self.rule}/{ALPHABETS[self.alphabet]}"


PRETRAIN_RULES = ("copy", "reverse", "increment", "sort", "rotate")
PRETRAIN_TASKS: tuple[Task, ...] = tuple(Task(r, 0) for r in PRETRAIN_RULES) + tuple(
    Task(r, 1) for r in PRETRAIN_RULES if r != "increment")
FINETUNE_TASK = Task("decrement", 1)
ALL_TASKS: tuple[Task, ...] = PRETRAIN_TASKS + (FINETUNE_TASK,)


def task_by_name(name: str) -> Task:
    for t in ALL_TASKS:
        if t.name == name:
            return t
    raise ValueError(f"unknown task {name!r}; tasks are {[t.name for t in ALL_TASKS]}")


def rule_token(rule: str) -> int:
    return 3 + list(RULES).index(rule)


def vocab_size(num_symbols: int) -> int:
    return NUM_SPECIAL + 2 * num_symbols


def seq_len(length: int) -> int:
    return 2 * length + 3


def is_held_out(x: torch.Tensor) -> torch.Tensor:
    """About one input in eight (by a hash of the input) is reserved for evaluation."""
    weights = torch.tensor([pow(31, i, 1009) for i in range(x.shape[-1])], dtype=torch.long)
    return (x * weights).sum(-1) % 8 == 0


def sample_inputs(n: int, length: int, num_symbols: int, generator: torch.Generator,
                  split: str = "train") -> torch.Tensor:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    parts, have = [], 0
    while have < n:
        x = torch.randint(num_symbols, (2 * n + 16, length), generator=generator)
        x = x[is_held_out(x) == (split == "eval")]
        parts.append(x)
        have += len(x)
    return torch.cat(parts)[:n]


def encode(task: Task, x: torch.Tensor, num_symbols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for inputs ``x`` [n, L]; labels are IGNORE except on the answer."""
    n, length = x.shape
    y = RULES[task.rule](x, num_symbols)
    offset = NUM_SPECIAL + task.alphabet * num_symbols
    head = torch.tensor([BOS, rule_token(task.rule)], dtype=torch.long).expand(n, 2)
    sep = torch.full((n, 1), SEP, dtype=torch.long)
    ids = torch.cat([head, x + offset, sep, y + offset], dim=1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -length:] = ids[:, -length:]
    return ids, labels


def make_batch(task: Task, n: int, length: int, num_symbols: int, generator: torch.Generator,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return encode(task, sample_inputs(n, length, num_symbols, generator, split), num_symbols)


def mixture_batch(tasks: tuple[Task, ...], n: int, length: int, num_symbols: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training examples, each of a uniformly drawn task of ``tasks``."""
    which = torch.randint(len(tasks), (n,), generator=generator)
    x = sample_inputs(n, length, num_symbols, generator)
    ids, labels = zip(*(encode(t, x[which == i], num_symbols) for i, t in enumerate(tasks)))
    return torch.cat(ids), torch.cat(labels)


@torch.no_grad()
def exact_match(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of examples whose whole answer is right (teacher-forced argmax = greedy decoding)."""
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(ids), chunk):
        i, t = ids[s:s + chunk], labels[s:s + chunk, 1:]
        pred = model(input_ids=i).logits[:, :-1].argmax(-1)
        correct += ((pred == t) | (t == IGNORE)).all(-1).sum().item()
    model.train(was_training)
    return correct / len(ids)
