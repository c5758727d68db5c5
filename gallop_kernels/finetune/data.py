"""Training data for ``gallop finetune``: JSONL files (or ``datasets`` names), validated up front.

A JSONL file holds one JSON object per line, either ``{"prompt": ..., "response": ...}`` (the loss
covers the response only) or ``{"text": ...}`` (the loss covers all of it); the two kinds may be
mixed. Blank lines are ignored. Every malformed line is reported with its line number before
anything is trained.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

IGNORE = -100
MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """The training data cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Record:
    """One training example: ``prompt`` is None for plain text (then ``response`` is the text)."""

    prompt: str | None
    response: str


def _check_row(row: Any) -> Record | str:
    """A Record, or the reason the row is not one."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    has_text, has_pair = "text" in row, ("prompt" in row or "response" in row)
    if has_text and has_pair:
        return "has both 'text' and 'prompt'/'response'; use one or the other"
    if has_text:
        if not isinstance(row["text"], str) or not row["text"].strip():
            return "'text' must be a non-empty string"
        return Record(None, row["text"])
    if has_pair:
        missing = [k for k in ("prompt", "response") if k not in row]
        if missing:
            return f"missing {missing[0]!r} (a prompt/response example needs both)"
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            return "'prompt' and 'response' must be strings"
        if not row["response"].strip():
            return "'response' is empty"
        return Record(row["prompt"], row["response"])
    return f"needs 'text' or 'prompt' and 'response'; found keys {sorted(row)[:5]}"


def _raise_errors(errors: list[str], source: str, total: int) -> None:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise DataError(f"{source}: {len(errors)} malformed line(s) of {total}:\n  " + "\n  ".join(shown) + more)


def load_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read and validate a JSONL file; ``DataError`` lists every bad line by number."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory, not a JSONL file")
    records: list[Record] = []
    errors: list[str] = []
    lines = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                lines = lineno
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                checked = _check_row(row)
                if isinstance(checked, str):
                    errors.append(f"line {lineno}: {checked}")
                else:
                    records.append(checked)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text after line {lines} ({e.reason})") from None
    if errors:
        _raise_errors(errors, path, lines)
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def load_hub_dataset(name: str, split: str = "train") -> list[Record]:
    """Rows of a Hugging Face ``datasets`` dataset with ``text`` or ``prompt``/``response`` columns."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {name!r} is not a file; loading it as a `datasets` name needs "
            "`pip install datasets` (and network access to the hub)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, bad split: all end the run here
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {e}") from e
    records, errors = [], []
    for i, row in enumerate(ds):
        checked = _check_row(dict(row))
        if isinstance(checked, str):
            errors.append(f"row {i}: {checked}")
        else:
            records.append(checked)
    if errors:
        _raise_errors(errors, f"dataset {name!r}", len(ds))
    if not records:
        raise DataError(f"dataset {name!r} split {split!r} is empty")
    return records


def looks_like_path(spec: str) -> bool:
    """A file name rather than a hub name (``owner/name`` has at most one slash and no extension)."""
    return (spec.endswith((".jsonl", ".json", ".txt")) or spec.startswith(("/", ".", "~"))
            or spec.count("/") > 1 or "\\" in spec)


def load_records(spec: str, split: str = "train") -> list[Record]:
    """A local JSONL file when ``spec`` exists or looks like a path, else a ``datasets`` name."""
    expanded = os.path.expanduser(spec)
    if os.path.exists(expanded) or looks_like_path(spec):
        return load_jsonl(expanded)
    return load_hub_dataset(spec, split)


def tokenize(records: Sequence[Record], tokenizer: Any, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Token ids and labels per record (labels IGNORE on the prompt), ending with EOS, truncated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for r in records:
        if r.prompt is None:
            ids = tokenizer(r.response)["input_ids"] + eos
            labels = list(ids)
        else:
            p = tokenizer(r.prompt)["input_ids"]
            a = tokenizer(r.response, add_special_tokens=False)["input_ids"] + eos
            ids, labels = p + a, [IGNORE] * len(p) + a
        ids, labels = ids[:max_length], labels[:max_length]
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)})
    if all(all(l == IGNORE for l in ex["labels"].tolist()) for ex in out):
        raise DataError(f"every example's response was cut off by --max-length {max_length}: nothing to learn")
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Iterable[dict[str, torch.Tensor]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


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
