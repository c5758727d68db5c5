"""JSON read with bounds: nesting depth, integer length, finite numbers.

Python's ``json.loads`` recurses once per nesting level (100,000 ``[`` raise ``RecursionError``),
turns a 10,000-digit integer into a ``ValueError`` that says nothing about where, and reads
``NaN``, ``Infinity`` and ``1e999`` as floats. Every JSON this project reads from a file a person
or another tool wrote (data lines, config files, run records, checkpoint manifests, adapter
configs, delta metadata) goes through :func:`loads`, which refuses those with a ``ValueError``
whose message the caller prefixes with the file and line (`docs/design.md#rules`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

MAX_INT_DIGITS = 100
"""Longest integer accepted (digits): far beyond any count or id, far below Python's own limit."""

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string (brackets inside don't nest)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (0 for a scalar), read without
    parsing (strings are skipped, so brackets inside them do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets))


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the range of a float")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def loads(text: str | bytes, *, max_depth: int, finite: bool = True) -> Any:
    """``json.loads(text)``, refusing (``ValueError``, a message without a location) nesting
    deeper than ``max_depth``, integers longer than `MAX_INT_DIGITS` digits and, with
    ``finite``, ``NaN``/``Infinity`` and numbers that overflow a float."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    found = depth(text)
    if found > max_depth:
        raise ValueError(f"nested {found} levels deep (at most {max_depth})")
    hooks: dict[str, Any] = {"parse_int": _integer}
    if finite:
        hooks.update(parse_float=_finite_float, parse_constant=_no_constant)
    try:
        return json.loads(text, **hooks)
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"invalid JSON ({e.msg} at {where})") from None
    except RecursionError:  # (a depth the scan missed: unterminated strings)
        raise ValueError(f"nested too deeply (at most {max_depth} levels)") from None


__all__ = ["MAX_INT_DIGITS", "depth", "loads"]
