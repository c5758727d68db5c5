"""Files in a run folder: never read or written through a link, always written whole.

Every file is written to a temporary name in its folder, fsynced and renamed, with the user's
normal permissions (`gallop_kernels.atomic.write_atomic`);
every path read or replaced is opened with ``O_NOFOLLOW`` or checked with ``lstat`` first, and a
link or a special file anywhere in a run folder is a :class:`RunFolderError` naming it
(`docs/design.md#run-folders`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from typing import Any, Iterator

from gallop_kernels import bounded_json
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


def remove_run_tree(path: str, marker: str) -> None:
    """Delete a run folder with its ``marker`` (the run record) last, so that a deletion cut
    short (SIGKILL) leaves a folder still marked as a run, which the next run recognises and
    finishes deleting; a concurrent deletion is not an error."""
    st = lstat_or_none(path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    for name in os.listdir(path):
        if name != marker:
            with contextlib.suppress(FileNotFoundError):
                remove_tree(os.path.join(path, name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, marker))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (released when the block ends or the process
    dies): publishing a run and finishing an interrupted publish hold it on the output's parent,
    so that neither sees the other half done."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


MAX_RECORD_DEPTH = 32
"""Run records and checkpoint manifests are a few levels deep; deeper is not one of ours."""


def read_json(path: str, what: str) -> Any:
    """A JSON file read without following a link; a parse error names the line and column, and
    nesting deeper than `MAX_RECORD_DEPTH`, huge integers and non-finite numbers are refused."""
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return bounded_json.loads(text, max_depth=MAX_RECORD_DEPTH)
    except ValueError as e:
        raise RunFolderError(f"{what} {path} is not usable: {e}") from None


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports an errno
_ERRNO_LOST = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")  # torch.save


def storage_failure(error: BaseException, folder: str) -> OSError | None:
    """``error`` as an ``OSError`` with its errno when it means the disk is full, a quota or a
    file-size limit was hit while writing into ``folder``; None for anything else.

    Writers report it differently: Python as ``OSError``, safetensors as ``SafetensorError(...
    (os error 28))``, ``torch.save`` as a ``RuntimeError`` that has lost the errno (then the
    filesystem is asked: less than 1 MiB free, or a file in ``folder`` at the file-size limit)."""
    code = None
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        code = error.errno
    elif (m := _OS_ERROR.search(str(error))) and int(m.group(1)) in STORAGE_ERRNOS:
        code = int(m.group(1))
    elif isinstance(error, RuntimeError) and _ERRNO_LOST.search(str(error)):
        code = _storage_state(folder)
    return None if code is None else OSError(code, os.strerror(code))


def _storage_state(folder: str) -> int | None:
    import resource

    with contextlib.suppress(OSError):
        vfs = os.statvfs(folder)
        if vfs.f_bavail * vfs.f_frsize < (1 << 20):
            return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and os.path.isdir(folder):
        with contextlib.suppress(OSError):
            if any(entry.stat(follow_symlinks=False).st_size >= limit for entry in os.scandir(folder)):
                return errno.EFBIG
    return None


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
