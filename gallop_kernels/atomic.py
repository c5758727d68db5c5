"""Files written whole, with the permissions the user's ``open()`` would give them.

Every file gallop_kernels writes for a user (a delta, an adapter folder, a run folder's records)
goes through :func:`write_atomic`: a temporary name in the same folder, created as ``open()``
creates files (mode 0o666 less the umask, so ``-rw-r--r--`` under the usual umask 022, not the
``-rw-------`` of ``tempfile.mkstemp``), written, fsynced and renamed over the path, so a reader
sees the old file or the new one, never half of one. A link at the path is replaced, never written
through.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Callable

Writer = Callable[[str], None]  # writes a whole file at the path it is given (e.g. safetensors' save_file)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Writer) -> None:
    """Write ``path`` completely or not at all: ``data`` (bytes, text as UTF-8, or a function that
    writes a file at the temporary path it is given) goes to a new file beside it, which is fsynced
    and renamed over ``path``."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for open()
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if callable(data):
            data(tmp)
            os.chmod(tmp, mode)  # the writer may have made a file of its own (safetensors' is 0600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


__all__ = ["fsync_dir", "write_atomic"]
