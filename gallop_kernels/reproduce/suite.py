"""The paper-protocol task suite: generated multiple-choice tasks in one shared format.

The GaLLoP paper fine-tunes on one of eight commonsense QA sets that share one format and
measures forgetting on the *other* sets against the zero-shot base model. This module is that
suite at CPU scale (`docs/reproduction.md#the-task-suite`): every task is a list of
:class:`MCItem` -- a question that names its options, the options, the index of the right one --
generated from the hand-written lists of `suite_data.py` with a seeded generator (no download).

**Format.** The question is the user turn of the model's chat template (system message "Answer
briefly."), the assistant turn opens with ``"Answer:"``, and each option follows as
``" " + option``. **Scoring** is the log-likelihood of each option given that prompt (the sum over
its tokens), the item counts when the right option scores highest: the usual multiple-choice
evaluation of lm-evaluation-harness, with no generation. When every option is the same tokens
but the last (one token each, as all options of this suite are with SmolLM2's tokenizer), the
item is **one row**: the prompt, whose last position's logits score every option at once.
Otherwise (another tokenizer) it is one row per option; both give the same log-likelihoods.
**Training** on an item is the cross-entropy of the right option's tokens (the loss on the
assistant's answer only).

Rows are left-padded and the model is asked for the logits of the last few positions only
(``logits_to_keep``), so the output head runs on one position per row, not on the whole prompt.

**Splits.** A hash of each item's key decides train / val / test (50 / 15 / 35 %); items that
share a key (the same word, the same pair of objects) share a split, so the test items of a task
ask about words or pairs that its training items never mention.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from gallop_kernels.chat import encode_completion
from gallop_kernels.chat_tasks import SPLITS, split_of
from gallop_kernels.reproduce import suite_data as D

SPLIT_FRACTIONS = (0.5, 0.15, 0.35)
SYSTEM = "Answer briefly."


@dataclass(frozen=True)
class MCItem:
    """One question; the assistant's answer opens with ``prefix`` and one of ``choices`` follows it;
    ``choices[answer]`` is right. ``key`` decides the split."""

    question: str
    prefix: str
    choices: tuple[str, ...]
    answer: int
    key: str

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
            raise ValueError(f"an item needs at least two distinct choices, got {self.choices}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index of {self.choices}")


@dataclass(frozen=True)
class MCTask:
    """A named list of items; ``chance`` is the expected accuracy of a uniform guess."""

    name: str
    description: str
    items: tuple[MCItem, ...]

    @property
    def chance(self) -> float:
        return sum(1 / len(it.choices) for it in self.items) / len(self.items)

    def split(self, part: str) -> list[MCItem]:
        if part not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {part!r}")
        return [it for it in self.items if split_of(f"{self.name}:{it.key}", SPLIT_FRACTIONS) == part]


# ---------------------------------------------------------------------------------------------
# The generated tasks
# ---------------------------------------------------------------------------------------------


def _rng(name: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))


class _Maker:
    """Builds the items of one task from a generator seeded by the task's name."""

    def __init__(self, name: str) -> None:
        self.rng = _rng(name)

    def item(self, question: str, prefix: str, right: str, wrong: Sequence[str], key: str) -> MCItem:
        """The options in a seeded random order (they are not shown: the order only breaks ties)."""
        choices = [right, *wrong]
        self.rng.shuffle(choices)
        return MCItem(question, prefix, tuple(choices), choices.index(right), key)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _kind() -> tuple[MCItem, ...]:
    """Every category name is an option (11; chance 1/11); two phrasings per word."""
    labels = tuple(D.CATEGORY_WORDS)
    items = []
    for label, words in D.CATEGORY_WORDS.items():
        for word in words:
            answer = labels.index(label)
            items.append(MCItem(f"What kind of thing is \"{word}\"?", f"\"{word}\" is a kind of", labels, answer,
                                word))
            items.append(MCItem(f"Which category does \"{word}\" belong to?", f"The category of \"{word}\" is",
                                labels, answer, word))
    return tuple(items)


def _antonyms() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, b in D.ANTONYMS:
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return out


def _opposite() -> tuple[MCItem, ...]:
    """Options: the opposite, the word itself, two other words; both directions, twice each."""
    make = _Maker("opposite")
    antonyms = _antonyms()
    words = sorted(antonyms)
    items = []
    for a, b in D.ANTONYMS:
        for word, right in ((a, b), (b, a)):
            pool = [w for w in words if w != word and w not in antonyms[word]]
            for _ in range(2):
                items.append(make.item(f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is",
                                       right, [word, *make.rng.sample(pool, 2)], "/".join(sorted((a, b)))))
    return tuple(items)


LETTERS = "ABCDEFGHIJKLMNOPRSTWY"


def _suite_words() -> list[str]:
    return sorted({w for ws in D.CATEGORY_WORDS.values() for w in ws} | set(D.SIZES_M)
                  | {w for pair in D.ANTONYMS for w in pair})


def _letter(which: str) -> tuple[MCItem, ...]:
    make = _Maker(f"{which}_letter")
    verb, pick = {"first": ("starts", lambda w: w[0]), "last": ("ends", lambda w: w[-1])}[which]
    items = []
    for word in _suite_words():
        right = pick(word).upper()
        wrong = make.rng.sample([c for c in LETTERS if c != right], 3)
        items.append(make.item(f"Which letter does the word \"{word}\" {verb[:-1]} with?",
                               f"The word \"{word}\" {verb} with the letter", right, wrong, word))
    return tuple(items)


def _sentiment() -> tuple[MCItem, ...]:
    """Key: the predicate, so a test review never shares its verdict words with a training one."""
    items = []
    for subject in D.REVIEW_SUBJECTS:
        for answer, predicates in enumerate((D.POSITIVE_PREDICATES, D.NEGATIVE_PREDICATES)):
            for predicate in predicates:
                items.append(MCItem(f"Is this review positive or negative? \"{subject} {predicate}.\"",
                                    "The review is", ("positive", "negative"), answer, predicate))
    return tuple(items)


def _arithmetic() -> tuple[MCItem, ...]:
    make = _Maker("arithmetic")
    exprs = []
    for a in range(1, 10):
        for b in range(1, 10):
            if a + b <= 9:
                exprs.append((f"{a} + {b}", a + b))
            if a - b >= 0:
                exprs.append((f"{a} - {b}", a - b))
            for c in range(1, 10):
                if 0 <= a + b - c <= 9:
                    exprs.append((f"{a} + {b} - {c}", a + b - c))
    items = []
    for text, value in exprs:
        wrong = make.rng.sample([d for d in range(10) if d != value], 3)
        items.append(make.item(f"What is {text}?", f"{text} =", str(value), [str(d) for d in wrong], text))
    return tuple(items)


def _size(count: int = 900, min_ratio: float = 4.0) -> tuple[MCItem, ...]:
    make = _Maker("size")
    names = sorted(D.SIZES_M)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
             if max(D.SIZES_M[a], D.SIZES_M[b]) >= min_ratio * min(D.SIZES_M[a], D.SIZES_M[b])]
    items = []
    for a, b in make.rng.sample(pairs, count):
        big, small = (a, b) if D.SIZES_M[a] > D.SIZES_M[b] else (b, a)
        asked = make.rng.choice(("bigger", "smaller"))
        first, second = make.rng.sample([a, b], 2)
        right = big if asked == "bigger" else small
        items.append(MCItem(f"Which is {asked}: {_article(first)} {first} or {_article(second)} {second}?",
                            f"The {asked} one is the", (first, second), (first, second).index(right),
                            f"{small}<{big}"))
    return tuple(items)


def _parity(count: int = 900) -> tuple[MCItem, ...]:
    numbers = _rng("parity").sample(range(10, 1000), count)
    return tuple(MCItem(f"Is {n} an even or an odd number?", f"{n} is an", ("even", "odd"), n % 2, str(n))
                 for n in numbers)


def _odd_one_out(count: int = 900) -> tuple[MCItem, ...]:
    make = _Maker("odd_one_out")
    words = {c: [w for w in ws if w not in D.MULTI_TOKEN_WORDS] for c, ws in D.CATEGORY_WORDS.items()}
    labels = list(words)
    items, seen = [], set()
    while len(items) < count:
        group, odd_label = make.rng.sample(labels, 2)
        three = make.rng.sample(words[group], 3)
        odd = make.rng.choice(words[odd_label])
        if (tuple(sorted(three)), odd) in seen:
            continue
        seen.add((tuple(sorted(three)), odd))
        shown = [*three, odd]
        make.rng.shuffle(shown)
        items.append(make.item(f"Which word does not belong with the others: {', '.join(shown)}?",
                               "The word that does not belong is", odd, three, f"{'/'.join(sorted(three))}|{odd}"))
    return tuple(items)


CANDIDATES: dict[str, tuple[str, Callable[[], tuple[MCItem, ...]]]] = {
    "kind": ("the category of a word, among all 11 category names", _kind),
    "opposite": ("the opposite of a word, among it, the word itself and two other words", _opposite),
    "last_letter": ("the last letter of a word, among four letters", lambda: _letter("last")),
    "sentiment": ("whether a one-sentence review is positive or negative", _sentiment),
    "arithmetic": ("a sum or difference of one-digit numbers with a one-digit result, among four digits",
                   _arithmetic),
    "first_letter": ("the first letter of a word, among four letters", lambda: _letter("first")),
    "size": ("which of two things is bigger (or smaller); sizes differ at least fourfold", _size),
    "parity": ("whether a number from 10 to 999 is even or odd", _parity),
    "odd_one_out": ("which of four words is not of the others' category", _odd_one_out),
}
"""Every task generated and measured on the base model (`pilot`, results/paper-protocol/pilot.json)."""
SUITE = ("kind", "opposite", "last_letter", "sentiment", "arithmetic")
"""The tasks of the study: those on which the base model is clearly above chance and below ceiling
(first_letter: at ceiling; size, parity, odd_one_out: at chance)."""


def build_task(name: str) -> MCTask:
    if name not in CANDIDATES:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(CANDIDATES)}")
    description, make = CANDIDATES[name]
    return MCTask(name, description, make())


# ---------------------------------------------------------------------------------------------
# Encoding, scoring and the loss
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A left-aligned token row whose last ``len(scored)`` positions' logits score ``scored``
    (per option: its token ids in order). One shared row scores several one-token options."""

    ids: tuple[int, ...]
    scored: tuple[tuple[int, ...], ...]  # per option scored in this row


@dataclass(frozen=True)
class EncodedItem:
    rows: tuple[Row, ...]
    answer: int

    @property
    def num_choices(self) -> int:
        return sum(len(r.scored) for r in self.rows)

    def training_row(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ids, target tokens) of the right option."""
        seen = 0
        for row in self.rows:
            if self.answer < seen + len(row.scored):
                return row.ids, row.scored[self.answer - seen]
            seen += len(row.scored)
        raise AssertionError("answer index out of range")


def _messages(item: MCItem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item.question},
            {"role": "assistant", "content": item.prefix}]


def _spaced(prefix: str, choice: str) -> str:
    return choice if prefix.endswith(('"', " ")) else " " + choice


def encode_item(item: MCItem, tokenizer: Any) -> EncodedItem:
    """The rows of one item (see the module doc): one shared row when every option is the same
    tokens but the last, else one row per option."""
    encoded = [encode_completion(tokenizer, _messages(item), _spaced(item.prefix, c)) for c in item.choices]
    ids = [tuple(e.input_ids) for e in encoded]
    targets = [tuple(t for t in e.labels if t >= 0) for e in encoded]
    for c, t, i in zip(item.choices, targets, ids):
        if not t or i[len(i) - len(t):] != t:
            raise ValueError(f"option {c!r} of {item.question!r} is not tokenized at the end of its row")
    if len({len(i) for i in ids}) == 1 and len({i[:-1] for i in ids}) == 1 and len({i[-1] for i in ids}) == len(ids):
        return EncodedItem((Row(ids[0][:-1], tuple((i[-1],) for i in ids)),), item.answer)
    return EncodedItem(tuple(Row(i[:-1], (t,)) for i, t in zip(ids, targets)), item.answer)


def encode_items(items: Sequence[MCItem], tokenizer: Any) -> list[EncodedItem]:
    return [encode_item(it, tokenizer) for it in items]


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _common_prefix(rows: Sequence[tuple[int, ...]], keep: int) -> int:
    """Length of the longest prefix every row shares, leaving at least ``keep`` tokens of each row
    (the positions whose logits are asked for)."""
    n = min(len(r) for r in rows) - keep
    first = rows[0]
    for r in rows[1:]:
        while n > 0 and r[:n] != first[:n]:
            n -= 1
    return max(n, 0)


def _cache_argument(model: Any) -> str:
    """What the model's forward calls its key/value cache: ``cache`` (transformers >= 5.20) or
    ``past_key_values`` (older releases, e.g. the lent GPU's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _last_logits(model: Any, rows: Sequence[tuple[int, ...]], keep: int, share_prefix: bool = True) -> torch.Tensor:
    """Logits of the last ``keep`` positions of each row ([len(rows), keep, vocab]).

    The prefix every row shares (the chat template's system turn) runs once, as one row whose
    keys and values every row then attends to; the rest of each row is left-padded after it
    (position ids continue the prefix). Same logits as running every row whole, for less work.
    """
    device = next(model.parameters()).device
    shared = _common_prefix(rows, keep) if share_prefix and len(rows) > 1 else 0
    cache = None
    if shared:
        head = torch.tensor([rows[0][:shared]], dtype=torch.long, device=device)
        out = model(input_ids=head, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(len(rows))
    tails = [r[shared:] for r in rows]
    width = max(len(r) for r in tails)
    ids = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, r in enumerate(tails):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, shared + width - len(r):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    past = {_cache_argument(model): cache} if cache is not None else {}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                logits_to_keep=keep, use_cache=cache is not None, **past)
    return out.logits.float()


def _row_scores(logits: torch.Tensor, row: Row) -> list[float]:
    """Sum of log-probabilities of each option scored in ``row`` (``logits``: that row's last
    positions, as many as the longest option)."""
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for tokens in row.scored:
        n = len(tokens)
        pos = logp[logp.shape[0] - n:]
        out.append(float(pos[torch.arange(n), torch.tensor(tokens)].sum()))
    return out


@torch.no_grad()
def correct(model: Any, items: Sequence[EncodedItem], batch_rows: int = 64) -> torch.Tensor:
    """Per item: does the right option get the highest log-likelihood (ties: the first option)?"""
    was = model.training
    model.eval()
    flat = [(i, r) for i, it in enumerate(items) for r in it.rows]
    order = sorted(range(len(flat)), key=lambda j: len(flat[j][1].ids))  # similar lengths together
    scores: list[list[list[float]]] = [[[] for _ in it.rows] for it in items]
    position = {}  # (item, row object id) -> row number within the item
    for i, it in enumerate(items):
        for n, r in enumerate(it.rows):
            position[(i, id(r))] = n
    for start in range(0, len(order), batch_rows):
        chunk = [flat[j] for j in order[start:start + batch_rows]]
        keep = max(len(t) for _, r in chunk for t in r.scored)
        logits = _last_logits(model, [r.ids for _, r in chunk], keep)
        for (i, r), lg in zip(chunk, logits):
            scores[i][position[(i, id(r))]] = _row_scores(lg, r)
    model.train(was)
    out = []
    for it, per_row in zip(items, scores):
        s = [x for row in per_row for x in row]
        out.append(max(range(len(s)), key=lambda j: (s[j], -j)) == it.answer)
    return torch.tensor(out)


def accuracy(model: Any, items: Sequence[EncodedItem], batch_rows: int = 64) -> float:
    return correct(model, items, batch_rows).float().mean().item()


def loss(model: Any, items: Sequence[EncodedItem]) -> torch.Tensor:
    """Mean cross-entropy of the right options' tokens over a batch of items."""
    rows = [it.training_row() for it in items]
    keep = max(len(t) for _, t in rows)
    logits = _last_logits(model, [ids for ids, _ in rows], keep)
    logp = torch.log_softmax(logits, dim=-1)
    terms = []
    for lp, (_, tokens) in zip(logp, rows):
        n = len(tokens)
        terms.append(-lp[keep - n:][torch.arange(n), torch.tensor(tokens, device=lp.device)])
    return torch.cat(terms).mean()


def token_count(items: Sequence[EncodedItem]) -> int:
    """Tokens one evaluation of ``items`` runs through the model (its cost, unpadded)."""
    return sum(len(r.ids) for it in items for r in it.rows)


__all__ = ["CANDIDATES", "EncodedItem", "MCItem", "MCTask", "Row", "SPLITS", "accuracy",
           "build_task", "correct", "encode_item", "encode_items", "loss", "split_of", "token_count"]

