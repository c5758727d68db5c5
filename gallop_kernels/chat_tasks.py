"""Chat tasks for a real instruct model: one it cannot do (ID) and several it already does (OOD).

No download: every item is generated or comes from the small hand-written lists below. Each task
is a list of :class:`Item` (a question, an optional assistant prefix, the expected answer) split
deterministically into ``train``/``val``/``test`` parts. Accuracy is *teacher-forced exact match*:
one forward pass over ``prompt + answer`` and the item counts as right when every answer token is
the argmax of the model's next-token distribution. That is exactly "greedy decoding produces the
answer", at the cost of one forward pass per batch instead of a decoding loop.

**The ID task, ``category``: answer with the category of an unseen word.** The user asks "What
category does the word "tiger" belong to?"; the answer is exactly one of ``animal``, ``fruit``,
``vehicle``, ``clothing``, ``body part``. The base model never answers so (0 % exact match: it
starts "The word "tiger" belongs to the category of ..."), and a model that only learned to answer
with some label would score about 1/5. The test words never appear in training, so a high score
means the fine-tuned model applies the rule to words through the category knowledge it already had,
not that it memorised word -> label pairs. What is new is the skill (a one-word classification
answer over a fixed label set), not the knowledge: like the paper's fine-tuning tasks.

Two harder variants are kept for experiments (``ID_TASKS``), both measured and rejected as the
default because they are not learned in tens of steps on two CPU cores: ``codes`` (an arbitrary
code per category: alpha, beta, ...; full fine-tuning and LoRA stayed at the "some code" plateau
for 40 steps) and ``place`` (zoo, orchard, garage, closet, doctor; GaLLoP reached 64 % in 30 steps).

**The OOD tasks: what the base model already does.** Short factual or morphological questions
answered in the model's own phrasing ("The plural of mouse is mice."). Each is kept only if the
base model scores well above chance on it (see docs/reproduction.md for the measured values):
fine-tuning on ``category`` contains none of these questions, so any drop is forgetting. They are
asked with the model's own answer opening as an assistant prefix ("The plural of mouse is") and
the answer word is scored, so a drop means the knowledge (or the ability to state it) was lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from gallop_kernels.chat import IGNORE, Encoded, encode_completion

SYSTEM = "Answer briefly."  # a short system message keeps sequences short (the default one is ~30 tokens)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One question. ``prefix`` (may be empty) opens the assistant's answer; ``answer`` follows it."""

    question: str
    answer: str
    prefix: str = ""
    key: str = ""  # what decides the split (the word); items sharing a key share a split

    def messages(self, system: str | None = SYSTEM) -> list[dict[str, str]]:
        out = [{"role": "system", "content": system}] if system is not None else []
        out.append({"role": "user", "content": self.question})
        if self.prefix:
            out.append({"role": "assistant", "content": self.prefix})
        return out

    def encode(self, tokenizer: Any, system: str | None = SYSTEM) -> Encoded:
        """Chat-template tokens; labels on the answer only (what greedy decoding must produce)."""
        return encode_completion(tokenizer, self.messages(system), self.answer)


@dataclass(frozen=True)
class ChatTask:
    """A named list of items and the chance level of exact match (0 for open-ended answers)."""

    name: str
    description: str
    items: tuple[Item, ...]
    chance: float = 0.0

    def split(self, part: str, fractions: tuple[float, float, float] = (0.5, 0.15, 0.35)) -> list[Item]:
        """Items of ``part`` (train/val/test): a hash of each item's key decides, so splits never overlap
        and do not change when items are added elsewhere in the list."""
        if part not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {part!r}")
        return [it for it in self.items if split_of(it.key or it.question, fractions) == part]


def split_of(key: str, fractions: tuple[float, float, float]) -> str:
    """train / val / test by a hash of ``key`` (stable across runs, machines and list edits)."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for part, f in zip(SPLITS, fractions):
        edge += f
        if u < edge:
            return part
    return SPLITS[-1]


# --------------------------------------------------------------------------------------------
# The ID task: codes of categories
# --------------------------------------------------------------------------------------------

CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "animal": ("alpha", (
        "dog", "cat", "horse", "cow", "pig", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox",
        "rabbit", "mouse", "elephant", "giraffe", "zebra", "monkey", "deer", "camel", "kangaroo",
        "squirrel", "donkey", "leopard", "cheetah", "hippo", "rhino", "panda", "koala", "otter",
        "beaver", "hamster", "moose", "badger", "hedgehog", "gorilla")),
    "fruit": ("beta", (
        "apple", "banana", "orange", "grape", "pear", "peach", "plum", "cherry", "lemon", "lime",
        "mango", "pineapple", "strawberry", "blueberry", "raspberry", "watermelon", "melon", "kiwi",
        "apricot", "coconut", "papaya", "fig", "grapefruit", "pomegranate", "nectarine", "tangerine",
        "blackberry", "cranberry", "guava", "lychee", "date", "avocado", "passion fruit", "mandarin",
        "gooseberry", "persimmon")),
    "vehicle": ("gamma", (
        "car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat",
        "ship", "taxi", "van", "tractor", "scooter", "submarine", "tram", "ambulance", "yacht", "canoe",
        "jeep", "limousine", "sailboat", "ferry", "rocket", "skateboard", "minivan", "pickup truck",
        "fire engine", "bulldozer", "glider", "kayak", "hovercraft", "cable car", "sled", "wagon",
        "jet")),
    "clothing": ("delta", (
        "shirt", "jacket", "coat", "sweater", "dress", "skirt", "jeans", "trousers", "shorts", "sock",
        "shoe", "boot", "hat", "cap", "scarf", "glove", "tie", "belt", "blouse", "hoodie", "vest",
        "pajamas", "sandal", "raincoat", "suit", "uniform", "cardigan", "mitten", "slipper",
        "swimsuit", "overalls", "tuxedo", "sneaker", "bathrobe", "leggings", "poncho")),
    "body part": ("epsilon", (
        "hand", "foot", "head", "arm", "leg", "nose", "ear", "eye", "mouth", "knee", "elbow", "finger",
        "toe", "shoulder", "neck", "chin", "forehead", "cheek", "tongue", "tooth", "lip", "wrist",
        "ankle", "heel", "thumb", "stomach", "chest", "back", "hip", "eyebrow", "jaw", "throat",
        "thigh", "palm", "skull", "spine")),
}


def _codes_items() -> tuple[Item, ...]:
    return tuple(Item(f"What is the code of the word \"{word}\"?", code, key=word)
                 for code, words in CATEGORIES.values() for word in words)


CODES = ChatTask(
    "codes",
    "the code of a word's category (animal alpha, fruit beta, vehicle gamma, clothing delta, body part epsilon); "
    "test words are never trained on",
    _codes_items(), chance=1 / len(CATEGORIES))

PLACES = {"animal": "zoo", "fruit": "orchard", "vehicle": "garage", "clothing": "closet", "body part": "doctor"}
CATEGORY = ChatTask(
    "category", "the category of a word, in one word; test words are never trained on",
    tuple(Item(f"What category does the word \"{w}\" belong to?", cat, key=w)
          for cat, (_, ws) in CATEGORIES.items() for w in ws), chance=1 / len(CATEGORIES))
PLACE = ChatTask(
    "place", "the place that goes with a word's category (animal zoo, fruit orchard, vehicle garage, clothing closet, "
    "body part doctor); test words are never trained on",
    tuple(Item(f"Which place goes with the word \"{w}\"?", PLACES[cat], key=w)
          for cat, (_, ws) in CATEGORIES.items() for w in ws), chance=1 / len(CATEGORIES))
ID_TASKS = {t.name: t for t in (CODES, CATEGORY, PLACE)}


# --------------------------------------------------------------------------------------------
# OOD tasks: things the instruct model already answers
# --------------------------------------------------------------------------------------------

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("tall", "short"),
    ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("rich", "poor"), ("strong", "weak"),
    ("loud", "quiet"), ("early", "late"), ("thick", "thin"), ("heavy", "light"), ("high", "low"),
    ("left", "right"), ("black", "white"), ("day", "night"), ("good", "bad"), ("true", "false"),
    ("up", "down"), ("in", "out"), ("yes", "no"), ("first", "last"), ("clean", "dirty"),
    ("cheap", "expensive"), ("safe", "dangerous"), ("inside", "outside"), ("north", "south"),
    ("east", "west"), ("love", "hate"), ("alive", "dead"), ("before", "after"), ("above", "below"),
    ("front", "back"), ("friend", "enemy"), ("smooth", "rough"), ("win", "lose"), ("push", "pull"),
    ("open", "closed"), ("old", "young"), ("rise", "fall"), ("buy", "sell"), ("sweet", "sour"),
    ("start", "finish"), ("give", "take"), ("near", "far"), ("wide", "narrow"),
)

PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
    ("man", "men"), ("woman", "women"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"),
    ("person", "people"), ("baby", "babies"), ("city", "cities"), ("knife", "knives"), ("leaf", "leaves"),
    ("wolf", "wolves"), ("bus", "buses"), ("church", "churches"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("sheep", "sheep"), ("deer", "deer"), ("book", "books"), ("car", "cars"),
    ("house", "houses"), ("apple", "apples"), ("tree", "trees"), ("bird", "birds"), ("glass", "glasses"),
    ("dish", "dishes"), ("party", "parties"), ("story", "stories"), ("wife", "wives"), ("life", "lives"),
    ("half", "halves"), ("hero", "heroes"), ("key", "keys"), ("day", "days"), ("toy", "toys"),
    ("boy", "boys"), ("girl", "girls"), ("horse", "horses"), ("watch", "watches"), ("fox", "foxes"),
    ("ox", "oxen"), ("lady", "ladies"), ("country", "countries"), ("shelf", "shelves"),
)

CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Turkey", "Ankara"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Saudi Arabia", "Riyadh"),
    ("Switzerland", "Bern"), ("India", "New Delhi"), ("Nigeria", "Abuja"),
)

PAST_TENSES = (
    ("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("write", "wrote"), ("take", "took"),
    ("come", "came"), ("give", "gave"), ("make", "made"), ("know", "knew"), ("think", "thought"),
    ("buy", "bought"), ("bring", "brought"), ("sing", "sang"), ("swim", "swam"), ("drink", "drank"),
    ("fly", "flew"), ("sleep", "slept"), ("speak", "spoke"), ("break", "broke"), ("drive", "drove"),
    ("ride", "rode"), ("begin", "began"), ("fall", "fell"), ("walk", "walked"), ("play", "played"),
    ("jump", "jumped"), ("teach", "taught"), ("catch", "caught"), ("find", "found"), ("tell", "told"),
    ("sit", "sat"), ("stand", "stood"), ("win", "won"), ("lose", "lost"), ("feel", "felt"),
    ("keep", "kept"), ("leave", "left"), ("meet", "met"), ("pay", "paid"), ("send", "sent"),
    ("build", "built"), ("grow", "grew"), ("draw", "drew"), ("throw", "threw"), ("wear", "wore"),
)

LANGUAGES = (
    ("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"),
    ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Portugal", "Portuguese"),
    ("Greece", "Greek"), ("the Netherlands", "Dutch"), ("Poland", "Polish"), ("Sweden", "Swedish"),
    ("Turkey", "Turkish"), ("South Korea", "Korean"), ("England", "English"), ("Mexico", "Spanish"),
    ("Brazil", "Portuguese"), ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Finland", "Finnish"),
    ("Hungary", "Hungarian"), ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("Israel", "Hebrew"),
    ("Iran", "Persian"), ("Egypt", "Arabic"), ("Ukraine", "Ukrainian"), ("Argentina", "Spanish"),
    ("Austria", "German"), ("Indonesia", "Indonesian"), ("Czech Republic", "Czech"), ("Romania", "Romanian"),
)

COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("blood", "red"), ("a lemon", "yellow"), ("a strawberry", "red"), ("milk", "white"), ("a carrot", "orange"),
    ("a tomato", "red"), ("an orange", "orange"), ("the sun", "yellow"), ("a leaf", "green"),
    ("chocolate", "brown"), ("a cucumber", "green"), ("a polar bear", "white"), ("a crow", "black"),
    ("the ocean", "blue"), ("a lime", "green"), ("cotton", "white"), ("a cherry", "red"),
    ("an eggplant", "purple"), ("a flamingo", "pink"), ("a pumpkin", "orange"), ("soil", "brown"),
    ("a blueberry", "blue"), ("ink", "black"), ("a fire truck", "red"), ("a frog", "green"),
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _pairs(template: str, prefix: str, pairs: Sequence[tuple[str, str]]) -> tuple[Item, ...]:
    return tuple(Item(template.format(x), " " + y, prefix.format(x), key=x) for x, y in pairs)


def _numbers() -> tuple[Item, ...]:
    return tuple(Item(f"What number comes after {n}?", f" {n + 1}", f"The number after {n} is", key=str(n))
                 for n in range(1, 100))


def _additions() -> tuple[Item, ...]:
    return tuple(Item(f"What is {a} + {b}?", f" {a + b}", f"{a} + {b} =", key=f"{a}+{b}")
                 for a in range(1, 10) for b in range(1, 10))


def _successors(kind: str, names: Sequence[str]) -> tuple[Item, ...]:
    return tuple(Item(f"What {kind} comes after {x}?", " " + names[(i + 1) % len(names)],
                      f"The {kind} after {x} is", key=x) for i, x in enumerate(names))


def _letters() -> tuple[Item, ...]:
    abc = [chr(c) for c in range(ord("A"), ord("Z"))]
    return tuple(Item(f"What letter comes after {x}?", " " + chr(ord(x) + 1), f"The letter after {x} is", key=x)
                 for x in abc)


CANDIDATE_OOD: dict[str, Callable[[], ChatTask]] = {
    "opposites": lambda: ChatTask("opposites", "the opposite of a word",
                                  _pairs("What is the opposite of {}?", "The opposite of {} is", OPPOSITES)),
    "plurals": lambda: ChatTask("plurals", "the plural of a noun",
                                _pairs("What is the plural of {}?", "The plural of {} is", PLURALS)),
    "capitals": lambda: ChatTask("capitals", "the capital of a country",
                                 _pairs("What is the capital of {}?", "The capital of {} is", CAPITALS)),
    "past_tense": lambda: ChatTask("past_tense", "the past tense of a verb",
                                   _pairs("What is the past tense of {}?", "The past tense of {} is", PAST_TENSES)),
    "languages": lambda: ChatTask("languages", "the language of a country",
                                  _pairs("What language is spoken in {}?", "The language spoken in {} is", LANGUAGES)),
    "colors": lambda: ChatTask("colors", "the color of a thing",
                               _pairs("What color is {}?", "The color of {} is", COLORS)),
    "next_number": lambda: ChatTask("next_number", "the number after n", _numbers()),
    "addition": lambda: ChatTask("addition", "a + b for one-digit a, b", _additions()),
    "next_day": lambda: ChatTask("next_day", "the day after a weekday", _successors("day", DAYS)),
    "next_month": lambda: ChatTask("next_month", "the month after a month", _successors("month", MONTHS)),
    "next_letter": lambda: ChatTask("next_letter", "the letter after a letter", _letters()),
}


# --------------------------------------------------------------------------------------------
# Batches and teacher-forced exact match
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Right-padded token ids, attention mask and labels (``IGNORE`` off the answers).

    ``open_end`` (per row) says the answer ends in a letter or digit, and ``word_start`` (per token
    id of the tokenizer) says a token's text begins with one: together they decide whether what
    the model would say after the answer lengthens its last word (`correct`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    open_end: torch.Tensor | None = None
    word_start: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: str | torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     move(self.open_end), move(self.word_start))

    def __getitem__(self, index: Any) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.labels[index],
                     None if self.open_end is None else self.open_end[index], self.word_start)


def collate(encoded: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad to the longest sequence (padding carries no label and no attention)."""
    from gallop_kernels.finetune.data import CausalLMCollator

    if not encoded:
        raise ValueError("cannot collate an empty list")
    out = CausalLMCollator(pad_id)([{"input_ids": torch.tensor(e.input_ids, dtype=torch.long),
                                     "labels": torch.tensor(e.labels, dtype=torch.long)} for e in encoded])
    return Batch(out["input_ids"], out["attention_mask"], out["labels"])


_WORD_START: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def word_start_table(tokenizer: Any) -> torch.Tensor:
    """Per token id, whether the token's text begins with a letter or digit (so that, right after a
    word, it continues that word: "cat" then "s"). Decoded after an anchor token, so that tokenizers
    which drop a leading space of a first token (SentencePiece) are read right. Cached per tokenizer."""
    try:
        return _WORD_START[tokenizer]
    except (KeyError, TypeError):
        pass
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    lead = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False))
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    table = torch.tensor([text[lead:lead + 1].isalnum() for text in texts], dtype=torch.bool)
    with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced is not cached
        _WORD_START[tokenizer] = table
    return table


def encode_items(items: Sequence[Item], tokenizer: Any, system: str | None = SYSTEM,
                 cache: dict[tuple[Item, str | None], Encoded] | None = None) -> Batch:
    """A batch of ``items`` (chat template, labels on the answers, the word table of `correct`).
    ``cache`` keeps each item's tokens across calls: training draws the same items again and again,
    and rendering the template is a few milliseconds per item."""
    def encode(item: Item) -> Encoded:
        if cache is None:
            return item.encode(tokenizer, system)
        if (item, system) not in cache:
            cache[item, system] = item.encode(tokenizer, system)
        return cache[item, system]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([encode(it) for it in items], pad)
    batch.open_end = torch.tensor([it.answer[-1:].isalnum() for it in items], dtype=torch.bool)
    batch.word_start = word_start_table(tokenizer)
    return batch


def training_items(task: ChatTask, tokenizer: Any, end_of_turn: bool = True) -> list[Item]:
    """The train split as items whose answer ends the assistant turn (so the model learns to stop)."""
    eos = tokenizer.eos_token if end_of_turn and tokenizer.eos_token else ""
    return [Item(it.question, it.answer + eos, it.prefix, it.key) for it in task.split("train")]


def _logits_at(model: torch.nn.Module, batch: Batch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The model's logits at the positions ``(rows, cols)`` only, ``[len(rows), vocab]``.

    The output head (a fifth of SmolLM2's forward pass, at every position) runs only where a
    logit is used: a pre-hook hands it the hidden states of those positions, and the model's own
    code after the head (e.g. logit soft-capping) still applies. A model without a findable head
    computes every logit and the wanted ones are picked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if head is None:
        return model(**kwargs).logits[rows, cols]
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols], *args[1:]))
    try:
        logits = model(**kwargs, use_cache=False).logits
    finally:
        handle.remove()
    if logits.shape[:-1] != rows.shape:
        raise RuntimeError(f"{type(model).__name__}: the output head did not get the picked positions "
                           f"(logits of shape {tuple(logits.shape)} for {len(rows)} positions)")
    return logits


def _answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the positions whose next token is an answer token (the logits a loss or
    an exact match reads), in row-major order."""
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = labels[:, 1:] != IGNORE
    return predicts_answer.nonzero(as_tuple=True)


def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens (what Hugging Face's causal-LM loss
    computes from ``labels``, without the output head at the unlabelled positions)."""
    rows, cols = _answer_positions(batch.labels)
    logits = _logits_at(model, batch, rows, cols)
    return torch.nn.functional.cross_entropy(logits.float(), batch.labels[rows, cols + 1])


@torch.no_grad()
def correct(model: torch.nn.Module, batch: Batch, chunk: int = 64) -> torch.Tensor:
    """Per example: would greedy decoding give exactly the answer? Teacher-forced, in one forward
    pass per ``chunk`` examples: every answer token is the argmax given the true prefix, and, when
    the answer ends in a letter or digit, the argmax after it does not begin with one (greedy
    "cat" followed by "s" says "cats"). `tests/test_chat_tasks.py` checks the verdicts against
    generation."""
    if batch.open_end is None or batch.word_start is None:
        raise ValueError("the batch has no word table: build it with encode_items(items, tokenizer)")
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(batch), chunk):
        b = batch[s:s + chunk]
        answer = b.labels != IGNORE
        if not answer[:, 1:].any(1).all():
            raise ValueError("every example needs at least one answer token after the first position")
        width = answer.shape[1]
        last = (width - 1) - answer.flip(1).int().argmax(1)  # each row's last answer token
        wanted = torch.zeros_like(answer)
        wanted[:, :-1] = answer[:, 1:]
        wanted[torch.arange(len(b)), last] = True  # what the model says after the answer
        rows, cols = wanted.nonzero(as_tuple=True)
        predicted = torch.full_like(b.labels, -1)
        predicted[rows, cols] = _logits_at(model, b, rows, cols).argmax(-1)
        wrong = (predicted[:, :-1] != b.labels[:, 1:]) & answer[:, 1:]
        after = predicted[torch.arange(len(b)), last]
        table = b.word_start
        continues = torch.zeros_like(after, dtype=torch.bool)
        known = after < len(table)  # a model may have more logits than the tokenizer has tokens
        continues[known] = table[after[known]]
        out.append((~wrong.any(1) & ~(b.open_end & continues)).cpu())
    model.train(was_training)
    return torch.cat(out)


def exact_match(model: torch.nn.Module, batch: Batch, chunk: int = 64) -> float:
    """Fraction of examples whose whole answer is greedy-decoded exactly."""
    return correct(model, batch, chunk).float().mean().item()


def shuffled(items: Sequence[Item], seed: int) -> list[Item]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
