"""Training data for ``gallop finetune``: JSONL files (or ``datasets`` names), validated up front.

Line formats (one JSON object per line; blank lines are ignored; other keys, such as an ``id``,
are ignored too):

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
  -- a conversation, rendered with the tokenizer's chat template; the loss covers every assistant
  message and its end-of-turn token (`gallop_kernels.chat`).
* ``{"prompt": ..., "response": ...}`` (``"completion"`` is accepted for ``"response"``, as TRL
  spells it; an optional ``"system"`` string) -- the loss covers the response. With
  ``chat_template="auto"`` (the default) the pair goes through the chat template when the
  tokenizer has one (an instruct model answers in its chat format), else it is tokenized raw as
  ``prompt + response + EOS``; ``"on"`` requires the template, ``"off"`` always tokenizes raw.
* ``{"text": ...}`` -- plain text, tokenized raw; the loss covers all of it.

Formats may be mixed in one file. Every malformed line is reported with its file and line number
(a byte that is not UTF-8 too, a line longer than ``max_line_bytes``, JSON nested deeper than
`MAX_LINE_DEPTH` levels, an integer of more than `bounded_json.MAX_INT_DIGITS` digits) before
anything is loaded or trained. A data file must be a regular file (a link to one is followed): a
FIFO, a device such as ``/dev/zero`` or a folder is refused before it is read, so reading always
ends. Before tokenizing, every text is cut to what ``max_length`` tokens can cover
(:func:`char_budget`), so one enormous line costs the tokenizer no more than a long one.

Several sources mix by weight (``a.jsonl:0.7``, ``b.jsonl:0.3``): see :func:`mix`. An eval set is
a separate file (``eval_data``) or a seeded fraction held out of every training source
(``eval_split``) before mixing, so no eval line is also trained on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from gallop_kernels import bounded_json
from gallop_kernels.chat import IGNORE, encode_conversation, encode_prompt_response

MAX_REPORTED_ERRORS = 20
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
DEFAULT_MAX_LINE_BYTES = 16 << 20
"""``--max-line-bytes``: the longest data line read (16 MiB; a longer one is refused, naming the
limit). Only the first ``max_length`` tokens of an example are trained, so this bounds what a
line may cost to read and parse, not what is learned."""
MAX_LINE_DEPTH = 64
"""The deepest JSON nesting of a data line (a conversation is 3 levels deep)."""


class DataError(ValueError):
    """The training data cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Record:
    """One training example: chat ``messages``, a ``prompt``/``response`` pair, or plain ``text``."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    system: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    where: str = ""  # "train.jsonl line 7": where a later error about this example points

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else ("pair" if self.prompt is not None else "text")


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


def _check_messages(messages: Any) -> tuple[Mapping[str, str], ...] | str:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}"
        if not isinstance(m.get("role"), str) or not m["role"]:
            return f"message {i} needs a non-empty string 'role'"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({m['role']}) needs a string 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no 'assistant' message: nothing to train"
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return "every 'assistant' message is empty: nothing to train"
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def check_row(row: Any, where: str = "") -> Record | str:
    """A Record, or the reason the row is not one."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    response_key = "completion" if "completion" in row and "response" not in row else "response"
    kinds = [k for k, present in (("messages", "messages" in row), ("text", "text" in row),
                                  ("prompt/response", "prompt" in row or response_key in row)) if present]
    if len(kinds) > 1:
        return f"has both {kinds[0]!r} and {kinds[1]!r} keys; one example is one of them"
    if "system" in row and kinds != ["prompt/response"]:
        return "'system' goes with a prompt/response example (put a system message into 'messages' instead)"
    if kinds == ["messages"]:
        messages = _check_messages(row["messages"])
        return messages if isinstance(messages, str) else Record(messages=messages, where=where)
    if kinds == ["text"]:
        if not isinstance(row["text"], str) or not row["text"].strip():
            return "'text' must be a non-empty string"
        return Record(text=row["text"], where=where)
    if kinds == ["prompt/response"]:
        if "response" in row and "completion" in row:
            return "has both 'response' and 'completion'; they mean the same, keep one"
        missing = [k for k in ("prompt", response_key) if k not in row]
        if missing:
            return f"missing {missing[0]!r} (a prompt/response example needs both)"
        if not isinstance(row["prompt"], str) or not isinstance(row[response_key], str):
            return f"'prompt' and {response_key!r} must be strings"
        if not row[response_key].strip():
            return f"{response_key!r} is empty"
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            return "'system' must be a string"
        return Record(prompt=row["prompt"], response=row[response_key], system=system, where=where)
    return f"needs 'messages', 'text', or 'prompt' and 'response'; found keys {sorted(row)[:5]}"


def _raise_errors(errors: list[str], source: str, total: int, unit: str = "line") -> None:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise DataError(f"{source}: {len(errors)} malformed {unit}(s) of {total}:\n  " + "\n  ".join(shown) + more)


# ---------------------------------------------------------------------------------------------
# Sources: a JSONL file or a `datasets` name
# ---------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path: str, what: str) -> int:
    """A read-only fd of the regular file at ``path`` (a link to one is followed). A FIFO, a device
    (``/dev/zero``), a socket or a folder is refused before it is opened, and checked again on the
    opened fd (opened non-blocking, so a FIFO swapped in between cannot hang the open)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is {_kind(st.st_mode)}; give a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{what} {path} is {_kind(mode)}; give a regular file")
    return fd


def read_regular_text(path: str, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes`` (`open_regular_file`)."""
    with os.fdopen(open_regular_file(path, what), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{what} {path} is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _lines(f: Any, max_bytes: int) -> Iterable[tuple[int, bytes | None]]:
    """(line number, bytes) of every line of a binary file, None for a line over ``max_bytes``
    (skipped without being held in memory)."""
    lineno = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes and not (len(raw) == max_bytes + 1 and raw.endswith(b"\n")):
            while raw and not raw.endswith(b"\n"):  # the rest of the long line, a chunk at a time
                raw = f.readline(1 << 20)
            yield lineno, None
            continue
        yield lineno, raw


def _parse_line(raw: bytes, lineno: int, max_bytes: int) -> Any:
    """The JSON value of one line, or a str saying why it is not one."""
    if raw is None:
        return f"line {lineno}: longer than {max_bytes:,} bytes (--max-line-bytes)"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if not line.strip():
        return None
    try:
        return (bounded_json.loads(line.rstrip("\r\n"), max_depth=MAX_LINE_DEPTH, finite=False),)
    except ValueError as e:
        return f"line {lineno}: {e}"


def load_jsonl(path: str | os.PathLike, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Record]:
    """Read and validate a JSONL file; ``DataError`` lists every bad line by number."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    records: list[Record] = []
    errors: list[str] = []
    lines = 0
    # bytes, decoded line by line: a bad byte is reported at its line
    with os.fdopen(open_regular_file(path, "data file"), "rb") as f:
        for lineno, raw in _lines(f, max_line_bytes):
            lines = lineno
            parsed = _parse_line(raw, lineno, max_line_bytes)
            if parsed is None:
                continue
            if isinstance(parsed, str):
                errors.append(parsed)
                continue
            checked = check_row(parsed[0], f"{path} line {lineno}")
            if isinstance(checked, str):
                errors.append(f"line {lineno}: {checked}")
            else:
                records.append(checked)
    if errors:
        _raise_errors(errors, path, lines)
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def load_hub_dataset(name: str, split: str = "train") -> list[Record]:
    """Rows of a Hugging Face ``datasets`` dataset with the columns of one of the line formats."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a file; loading it as a `datasets` name needs "
            "`pip install datasets` (and network access to the hub)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, bad split: all end the run here
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {e}") from e
    records, errors = [], []
    for i, row in enumerate(ds):
        checked = check_row(dict(row), f"dataset {name} row {i}")
        if isinstance(checked, str):
            errors.append(f"row {i}: {checked}")
        else:
            records.append(checked)
    if errors:
        _raise_errors(errors, f"dataset {name!r}", len(ds), unit="row")
    if not records:
        raise DataError(f"dataset {name!r} split {split!r} is empty")
    return records


def looks_like_path(spec: str) -> bool:
    """A file name rather than a hub name (``owner/name`` has at most one slash and no extension)."""
    return (spec.endswith((".jsonl", ".json", ".txt")) or spec.startswith(("/", ".", "~"))
            or spec.count("/") > 1 or "\\" in spec)


def load_records(spec: str | os.PathLike, split: str = "train",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Record]:
    """A local JSONL file when ``spec`` exists or looks like a path, else a ``datasets`` name."""
    spec = os.fspath(spec)
    expanded = os.path.expanduser(spec)
    if os.path.lexists(expanded) or looks_like_path(spec):
        return load_jsonl(expanded, max_line_bytes)
    return load_hub_dataset(spec, split)


# ---------------------------------------------------------------------------------------------
# Several sources: weights, mixing, the eval split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One ``--data`` entry: a file (or ``datasets`` name) and its mixture weight (None: by size)."""

    path: str
    weight: float | None = None

    def to_config(self) -> str | dict[str, Any]:
        return self.path if self.weight is None else {"path": self.path, "weight": self.weight}


def parse_source(spec: Any, what: str = "--data") -> DataSource:
    """``"a.jsonl"``, ``"a.jsonl:0.7"`` or ``{"path": "a.jsonl", "weight": 0.7}`` as a DataSource.

    A ``:number`` suffix is a weight unless the whole string names an existing file.
    """
    if isinstance(spec, DataSource):
        source = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "weight"}
        if unknown or "path" not in spec:
            raise ValueError(f"{what} entry {dict(spec)!r} must have a 'path' and an optional 'weight'")
        source = DataSource(os.fspath(spec["path"]), spec.get("weight"))
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        head, sep, tail = text.rpartition(":")
        source = DataSource(text)
        if sep and head and not os.path.exists(os.path.expanduser(text)):
            try:
                source = DataSource(head, float(tail))
            except ValueError:
                pass  # "C:\\data\\a.jsonl" or "name:config": no weight
    else:
        raise TypeError(f"{what} entries must be paths (optionally 'path:weight') or "
                        f"{{'path', 'weight'}} objects, got {type(spec).__name__}")
    if not isinstance(source.path, str) or not source.path:
        raise ValueError(f"{what}: empty path in {spec!r}")
    w = source.weight
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0):
        raise ValueError(f"{what} {source.path!r}: the weight must be a positive number, got {w!r}")
    return source


def parse_sources(value: Any, what: str = "--data") -> list[DataSource]:
    """A list of sources from one spec or a list of them (see :func:`parse_source`)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    sources = [parse_source(item, what) for item in items]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"give every {what} a weight (path:weight) or none of them")
    return sources


def mixture_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Examples drawn from each source: its size without weights; with weights, the shares of
    ``sum(sizes)`` in proportion to the weights (largest remainders), so the mixture keeps the
    total size of the sources and a weight above a source's share repeats its examples."""
    if weights is None:
        return list(sizes)
    total, weight_sum = sum(sizes), float(sum(weights))
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(records: Sequence[Record], count: int, generator: torch.Generator) -> list[Record]:
    """``count`` examples of ``records``: whole copies, then a seeded subset without repeats."""
    copies, extra = divmod(count, len(records))
    chosen = sorted(torch.randperm(len(records), generator=generator)[:extra].tolist())
    return list(records) * copies + [records[i] for i in chosen]


def mix(parts: Sequence[Sequence[Record]], weights: Sequence[float] | None, seed: int) -> tuple[list[Record], list[int]]:
    """The training mixture of several sources and how many examples came from each.

    Without weights the sources are concatenated. With weights, source i contributes
    ``mixture_counts`` examples: a seeded subset when that is fewer than it holds, whole copies
    plus a seeded subset when more. The ``Trainer`` shuffles the result every epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = mixture_counts([len(p) for p in parts], weights)
    mixed: list[Record] = []
    for part, count in zip(parts, counts):
        mixed += list(part) if weights is None else draw(part, count, generator)
    return mixed, counts


def split_eval(records: Sequence[Record], fraction: float, generator: torch.Generator,
               where: str) -> tuple[list[Record], list[Record]]:
    """``(train, eval)``: a seeded ``fraction`` of ``records`` (at least one) held out for eval."""
    n_eval = max(1, round(fraction * len(records)))
    if n_eval >= len(records):
        raise DataError(f"{where}: --eval-split {fraction} of {len(records)} example(s) leaves none to train on")
    held = set(torch.randperm(len(records), generator=generator)[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


@dataclass
class TrainingData:
    """The validated records of the training mixture and the eval set, and how they were made."""

    train: list[Record]
    eval: list[Record]
    sources: list[tuple[DataSource, int, int]] = field(default_factory=list)  # (source, examples, drawn)

    def describe(self) -> str:
        parts = []
        for source, size, drawn in self.sources:
            if source.weight is None or drawn == size:
                parts.append(f"{source.path} ({size})")
            else:
                how = "repeated" if drawn > size else "subset"
                parts.append(f"{source.path} ({drawn} drawn from {size}, weight {source.weight:g}, {how})")
        evals = f"; {len(self.eval)} eval example(s)" if self.eval else ""
        return f"{len(self.train)} training example(s): {', '.join(parts)}{evals}"


def load_training_data(data: Any, eval_data: Any = None, eval_split: float = 0.0, seed: int = 0,
                       split: str = "train", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> TrainingData:
    """Load and validate every source, hold out the eval split, and mix (see the module doc)."""
    sources = parse_sources(data, "--data")
    if not sources:
        raise ValueError("no training data: give --data (a JSONL file, or several as path:weight)")
    eval_sources = parse_sources(eval_data, "--eval-data")
    if any(s.weight is not None for s in eval_sources):
        raise ValueError("--eval-data takes no weights: the eval files are concatenated")
    parts = [load_records(s.path, split, max_line_bytes) for s in sources]
    evals = [r for s in eval_sources for r in load_records(s.path, split, max_line_bytes)]
    if eval_split:
        generator = torch.Generator().manual_seed(seed)
        held = [split_eval(p, eval_split, generator, s.path) for p, s in zip(parts, sources)]
        parts = [train for train, _ in held]
        evals = [r for _, ev in held for r in ev]
    weights = [s.weight for s in sources] if sources[0].weight is not None else None
    train, counts = mix(parts, weights, seed)
    return TrainingData(train, evals, [(s, len(p), c) for s, p, c in zip(sources, parts, counts)])


# ---------------------------------------------------------------------------------------------
# Tokens and labels
# ---------------------------------------------------------------------------------------------


def uses_chat_template(tokenizer: Any, mode: str = "auto") -> bool:
    """Whether prompt/response examples go through the chat template (see the module doc)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise DataError("--chat-template on, but the tokenizer has no chat template; "
                        "use --chat-template off (raw prompt + response) or a model that has one")
    return has if mode == "auto" else mode == "on"


def _encode_raw(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if record.kind == "text":
        ids = tokenizer(record.text)["input_ids"] + eos
        return ids, list(ids)
    if record.system is not None:
        raise ValueError("'system' needs the chat template (--chat-template auto/on with a tokenizer that has one)")
    prompt = tokenizer(record.prompt)["input_ids"]
    answer = tokenizer(record.response, add_special_tokens=False)["input_ids"] + eos
    return prompt + answer, [IGNORE] * len(prompt) + answer


def char_budget(tokenizer: Any, max_length: int) -> int | None:
    """How many characters of one text can reach the first ``max_length`` tokens: (max_length + 2)
    × the longest token's text (a byte-level token's string has one character per byte, a
    SentencePiece piece one per character, so no token covers more characters than its string
    has). Cutting every text there before tokenizing leaves the truncated encoding as it was while
    bounding what the tokenizer allocates. None when the tokenizer lists no vocabulary (no cut)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        longest = max((len(token) for token in get_vocab()), default=0) if callable(get_vocab) else 0
    except (NotImplementedError, TypeError):
        longest = 0
    if longest <= 0:
        return None
    return (max_length + 2) * longest


def clip_record(record: Record, budget: int | None) -> Record:
    """``record`` with every text (prompt, response, system, each message's content) cut to
    ``budget`` characters (`char_budget`)."""
    if budget is None:
        return record
    cut = lambda text: text if text is None or len(text) <= budget else text[:budget]  # noqa: E731
    messages = record.messages
    if messages is not None:
        messages = tuple({**m, "content": cut(m["content"])} for m in messages)
    return dataclasses.replace(record, text=cut(record.text), prompt=cut(record.prompt),
                               response=cut(record.response), system=cut(record.system), messages=messages)


def encode_record(record: Record, tokenizer: Any, max_length: int, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where nothing is trained) of one record, truncated."""
    if record.kind == "chat":
        enc = encode_conversation(tokenizer, record.messages, max_length=max_length)
        return enc.input_ids, enc.labels
    if record.kind == "pair" and chat:
        enc = encode_prompt_response(tokenizer, record.prompt, record.response, system=record.system,
                                     max_length=max_length)
        return enc.input_ids, enc.labels
    ids, labels = _encode_raw(record, tokenizer)
    return ids[:max_length], labels[:max_length]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Iterable[dict[str, torch.Tensor]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class EncodedDataset(ListDataset):
    """Tokenized examples for the ``Trainer``; ``skipped`` names those with nothing left to train."""

    def __init__(self, items: Iterable[dict[str, torch.Tensor]], skipped: Sequence[str], chat_template: bool):
        super().__init__(items)
        self.skipped = list(skipped)
        self.chat_template = chat_template


def encode_records(records: Sequence[Record], tokenizer: Any, max_length: int = 512,
                   chat_template: str = "auto") -> EncodedDataset:
    """Tokenize every record (see the module doc for the formats and ``chat_template``).

    Every text is first cut to what ``max_length`` tokens can cover (`char_budget`), so a huge
    line costs the tokenizer little. Examples whose trained tokens are all cut off by
    ``max_length`` are skipped (listed in
    ``skipped``); ``DataError`` when a record cannot be encoded (naming its line) or none is left.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    chat = uses_chat_template(tokenizer, chat_template)
    needs_template = [r.where for r in records if r.kind == "chat"]
    if needs_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{len(needs_template)} 'messages' example(s) (first: {needs_template[0]}) need the "
                        "tokenizer's chat template, and this tokenizer has none")
    items, skipped, errors = [], [], []
    budget = char_budget(tokenizer, max_length)
    for r in records:
        try:
            ids, labels = encode_record(clip_record(r, budget), tokenizer, max_length, chat)
        except ValueError as e:
            errors.append(f"{r.where or 'an example'}: {e}")
            continue
        if all(label == IGNORE for label in labels):
            skipped.append(r.where)
            continue
        items.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                      "labels": torch.tensor(labels, dtype=torch.long)})
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{len(errors)} example(s) could not be encoded:\n  " + "\n  ".join(shown) + more)
    if not items:
        raise DataError(f"every example's trained tokens were cut off by max_length {max_length} (--max-length): "
                        "nothing to learn; raise it")
    return EncodedDataset(items, skipped, chat)


class CausalLMCollator:
    """Right-pads ``input_ids`` with ``pad_id``, ``labels`` with IGNORE, and adds ``attention_mask``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = e["input_ids"], e["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


__all__ = ["CHAT_TEMPLATE_MODES", "CausalLMCollator", "DataError", "DataSource", "EncodedDataset", "ListDataset",
           "Record", "TrainingData", "check_row", "encode_record", "encode_records", "load_hub_dataset",
           "load_jsonl", "load_records", "load_training_data", "mix", "mixture_counts", "parse_source",
           "parse_sources", "split_eval", "uses_chat_template"]
