"""argparse pieces the subcommands share: types that refuse a number which would make a command
meaningless, at parse time, and the help formatter that shows defaults.

``gallop demo --steps 0`` would train nothing for a minute and print a table; ``gallop memory
--seq 0`` would predict the memory of no tokens. Each type turns such a value into a usage error
(the subcommand's usage, one line, exit 2) before anything runs. Shared by the subcommands'
parsers (`cli.py`, `memory/report.py`, `reproduce/cli.py`).
"""

from __future__ import annotations

import argparse
import math

from gallop_kernels.rules import check_fraction


def fraction(text: str) -> float:
    """A fraction in (0, 1] (`rules.check_fraction`), e.g. a density."""
    try:
        return check_fraction(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batches, items, threads, sequence lengths)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate: 0 would train nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers (seeds), at least one."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1 (GPU counts)."""
    values = ints(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (its help says what applies, e.g. a per-mode
    default) and a help that states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))  # on/off: no default
        if flag or action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


__all__ = ["DefaultsFormatter", "fraction", "ints", "positive_float", "positive_int", "positive_ints"]
