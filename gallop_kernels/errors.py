"""User errors and interruptions: what the ``gallop`` command reports on one line, without a traceback.

A user error is bad input a person can fix (an option, a path, a data line, a checkpoint that
does not fit); the command prints its message and exits 2. Anything else that escapes a
subcommand is a bug and keeps its traceback. Code that checks input raises plain
``ValueError``/``TypeError``/``OSError`` (or their subclasses, e.g. ``DataError``) as the rest of
the project does; the application marks the stretch of work whose failures are the user's with
:func:`user_input`, which tags those exceptions (their type stays what callers catch) so that an
error raised by the same function later, during training, still counts as internal
(`docs/design.md#run-folders`). :class:`UserError` is for code that knows on the spot.

SIGINT raises ``KeyboardInterrupt``; within :func:`terminate_as_interrupt` SIGTERM raises
:class:`Interrupted` (a ``KeyboardInterrupt``), so cleanup in ``finally`` blocks and context
managers runs for both instead of the process vanishing mid-write.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Bad input, stated so that a person can act on it (the CLI exits 2 and prints only this)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or another terminating signal) turned into an exception, so cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


_MARK = "gallop_user_error"


def is_user_error(error: BaseException) -> bool:
    """A :class:`UserError`, a missing optional package (`extras.MissingExtra`: the message says
    what to install), or an exception raised within :func:`user_input`."""
    from gallop_kernels.extras import MissingExtra

    return isinstance(error, (UserError, MissingExtra)) or getattr(error, _MARK, False) is True


@contextlib.contextmanager
def user_input(*kinds: type[BaseException]) -> Iterator[None]:
    """Within the block, ``ValueError``, ``TypeError`` and ``OSError`` (or ``kinds``) are the
    user's: they propagate unchanged, tagged so that :func:`is_user_error` says so."""
    kinds = kinds or (ValueError, TypeError, OSError)
    try:
        yield
    except kinds as error:
        setattr(error, _MARK, True)
        raise


def describe(error: BaseException) -> str:
    """An exception's message for a person: an ``OSError`` as "path: reason" instead of its repr."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{where}: {error.strerror}" if where else error.strerror
    text = str(error)
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text or type(error).__name__


def report_user_error(command: str, error: BaseException) -> int:
    """Print a user error as ``gallop <command>: error: ...`` (its notes below it); returns 2.
    ``GALLOP_TRACEBACK=1`` prints the traceback too, for a bug report."""
    print(f"gallop {command}: error: {describe(error)}", file=sys.stderr)
    for note in getattr(error, "__notes__", ()):
        print(f"  {note}", file=sys.stderr)
    if os.environ.get("GALLOP_TRACEBACK"):
        traceback.print_exception(error)
    return USER_ERROR_EXIT


@contextlib.contextmanager
def _handlers(signals: tuple[int, ...], handler: Callable[[int, Any], None]) -> Iterator[dict[int, Any] | None]:
    """``handler`` for ``signals`` within the block, the previous handlers (yielded) restored after.
    Only the main thread can set handlers: elsewhere nothing changes and None is yielded."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_as_interrupt(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Within the block the given signals raise :class:`Interrupted` in the main thread; the
    previous handlers are restored afterwards. Outside the main thread it does nothing."""
    with _handlers(signals, _raise_interrupted):
        yield


@contextlib.contextmanager
def signals_deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold the given signals while the block runs (a few renames that must happen together): a
    signal that arrives is recorded, and its previous handler runs when the block ends. (Python
    handlers run in the main thread whichever thread the kernel picked, so masking the main thread
    alone would not hold them.)"""
    received: list[int] = []
    previous = None
    try:
        with _handlers(signals, lambda signum, frame: received.append(signum)) as previous:
            yield
    finally:
        if received and previous:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # raises KeyboardInterrupt / Interrupted
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


__all__ = ["Interrupted", "USER_ERROR_EXIT", "UserError", "describe", "exit_status", "is_user_error",
           "report_user_error", "signals_deferred", "terminate_as_interrupt", "user_input"]
