"""Files in a run folder: never read or written through a link, always written whole.

Every file is written to a temporary name in its folder, fsynced and renamed, with the user's
normal permissions (`gallop_kernels.atomic.write_atomic`);
every path read or replaced is opened with ``O_NOFOLLOW`` or checked with ``lstat`` first, and a
link or a special file anywhere in a run folder is a :class:`RunFolderError` naming it
(`docs/design.md#run-folders`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from typing import Any

from gallop_kernels.atomic import fsync_dir, write_atomic  # noqa: F401 (re-exported to the run folder code)
from gallop_kernels.errors import UserError

class RunFolderError(UserError):
    """The output folder, the staging folder or a checkpoint cannot be used as asked."""


# ---------------------------------------------------------------------------------------------
# Files: never through a link, always complete
# ---------------------------------------------------------------------------------------------


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """An fd of the regular file ``path``; a link or anything else is refused, not followed."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link; gallop does not read or write through links in a "
                                 "run folder: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file")
    return fd


def read_bytes(path: str) -> bytes:
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_json_atomic(path: str, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def walk_tree(root: str) -> tuple[list[str], list[str]]:
    """(folders, files) under ``root`` as relative paths; a link or a special file anywhere is a
    :class:`RunFolderError` naming it (nothing under a run folder may point elsewhere)."""
    folders, files = [], []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(root, rel)) as entries:
            for entry in entries:
                sub = os.path.join(rel, entry.name)
                if entry.is_symlink():
                    raise RunFolderError(f"{os.path.join(root, sub)} is a symbolic link; gallop does not read or "
                                         "write through links in a run folder: remove it")
                if entry.is_dir(follow_symlinks=False):
                    folders.append(sub)
                    pending.append(sub)
                elif entry.is_file(follow_symlinks=False):
                    files.append(sub)
                else:
                    raise RunFolderError(f"{os.path.join(root, sub)} is not a regular file or folder")
    return sorted(folders), sorted(files)


def hash_fd(fd: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def file_sha256(path: str) -> str:
    fd = open_regular(path)
    try:
        return hash_fd(fd)[1]
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Delete a folder we own; links inside are removed, never followed (``shutil.rmtree``)."""
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def read_json(path: str, what: str) -> Any:
    """A JSON file read without following a link; a parse error names the line and column."""
    try:
        text = read_bytes(path).decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)
