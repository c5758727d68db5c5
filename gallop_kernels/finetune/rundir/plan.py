"""The plan of a run: everything about the output folder and the resume point checked, nothing
changed (`docs/design.md#run-folders`).

`plan_run` refuses, before any model loads: an output that is a file, a link, a folder that is not
a gallop run, or a finished run without ``--overwrite``; a staging folder locked by a live run; an
interrupted run's checkpoints discarded without ``--overwrite``; and a checkpoint to resume that is
incomplete, changed, without optimizer state or saved with other options, model or data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import Any, Iterable

from gallop_kernels.finetune.rundir.files import RunFolderError, lstat_or_none, open_regular, walk_tree
from gallop_kernels.finetune.rundir.identity import option_differences, run_options
from gallop_kernels.finetune.rundir.records import (
    CHECKPOINT_RE, RUN_FILE, Checkpoint, CheckpointError, check_optimizer_state, read_checkpoint, read_run_record,
    sealed_checkpoints,
)

LOCK_FILE = ".gallop-lock"
STAGING_SUFFIX = ".gallop-staging"

# ---------------------------------------------------------------------------------------------
# The output folder and its staging folder, as found
# ---------------------------------------------------------------------------------------------


def staging_path(output: str) -> str:
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}{STAGING_SUFFIX}")


@dataclass(frozen=True)
class Found:
    """What is at a path: ``kind`` is missing, empty, run (a folder marked as a gallop run by a
    valid ``gallop_run.json``) or foreign (anything else: a folder is a run only by that marker,
    never by file names other tools use too, such as ``checkpoint-500``). ``names`` are the
    entries found; ``extra`` those a run folder holds that its run did not write."""

    kind: str
    record: dict[str, Any] | None = None
    names: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    problem: str | None = None  # why a folder holding gallop_run.json is still not a run


def listing(names: Iterable[str], limit: int = 8) -> str:
    """Folder entries for a message: the first ``limit`` names, and how many more."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _run_owned(record: dict[str, Any], names: Iterable[str], result_files: Iterable[str]) -> tuple[str, ...]:
    """The entries of a run folder its run did not write: those not in the record's ``files``
    (written when the run was published), or for a record without that list (an older gallop),
    those that are not a name a run writes."""
    files = record.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        owned = set(files) | {RUN_FILE}
        return tuple(sorted(n for n in names if n not in owned))
    known = set(result_files) | {RUN_FILE}
    return tuple(sorted(n for n in names if n not in known and not CHECKPOINT_RE.fullmatch(n)))


def inspect_output(output: str, result_files: Iterable[str] = ()) -> Found:
    st = lstat_or_none(output)
    if st is None:
        return Found("missing")
    if stat.S_ISLNK(st.st_mode):
        raise RunFolderError(f"--output {output} is a symbolic link; give the folder itself (gallop replaces the "
                             "output folder when a run finishes and does not follow links)")
    if not stat.S_ISDIR(st.st_mode):
        raise RunFolderError(f"--output {output} exists and is not a folder")
    names = tuple(sorted(os.listdir(output)))
    if not names:
        return Found("empty")
    if RUN_FILE not in names:
        return Found("foreign", names=names)
    try:
        record = read_run_record(output)
    except RunFolderError as e:  # a damaged or foreign record: not a run we can vouch for
        return Found("foreign", names=names, problem=str(e))
    return Found("run", record, names=names, extra=_run_owned(record, names, result_files))


def refuse_foreign(output: str, found: Found, overwrite: bool) -> None:
    """The refusal for an output that is not (only) a gallop run, naming what would be lost."""
    if found.kind == "foreign":
        why = f" ({found.problem})" if found.problem else ""
        raise RunFolderError(
            f"--output {output} is not a gallop run folder{why}: it holds {listing(found.names)}. gallop replaces "
            f"the output folder when a run finishes{' (even with --overwrite)' if overwrite else ''} only when "
            f"{RUN_FILE} marks it as a gallop run, so those files would be lost: choose an empty or new folder")
    if found.kind == "run" and found.extra and overwrite:
        raise RunFolderError(
            f"--output {output} holds run {found.record['run_id']} and files that run did not write: "
            f"{listing(found.extra)}. Publishing replaces the output folder, and gallop replaces only a run's own "
            f"files: move those out of {output} first, or choose another --output")


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid:
            return f" (process {pid})"
    return ""


def take_lock(folder: str, *, create: bool) -> int:
    """The staging folder's lock, held by this process until the fd is closed (``flock``: it is
    released when a killed process's fds close, so a crash never leaves a stale lock)."""
    path = os.path.join(folder, LOCK_FILE)
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = open_regular(path, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise RunFolderError(f"another gallop run{holder} is writing this output (its staging folder {folder} is "
                             "locked); wait for it to finish or choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _staging_in_use(staging: str) -> None:
    """Refuse when a running process holds the staging folder's lock; otherwise change nothing."""
    path = os.path.join(staging, LOCK_FILE)
    if lstat_or_none(path) is None:
        return
    fd = open_regular(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"another gallop run{_lock_holder(fd)} is writing this output (its staging folder "
                                 f"{staging} is locked); wait for it to finish or choose another --output") from None
    finally:
        os.close(fd)  # closing releases the probe's lock


@dataclass(frozen=True)
class Leftover:
    """An interrupted run's staging folder: its run id (None when unreadable) and checkpoints."""

    run_id: str | None
    checkpoints: list[Checkpoint]
    notes: list[str]


def inspect_staging(staging: str, probe_lock: bool = True) -> Leftover | None:
    """The interrupted run in ``staging``, None when there is none. A folder at that name that is
    not a run's staging folder (no valid run record) is refused, not discarded, unless empty; one
    holding a finished run (an interrupted publish: see `folder.finish_interrupted_publish`) is
    refused too, so that it is never continued as if it were interrupted."""
    st = lstat_or_none(staging)
    if st is None:
        return None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise RunFolderError(f"{staging} is {what}, but gallop keeps a run's staging folder at that name: remove it")
    if probe_lock:
        _staging_in_use(staging)
    names = [n for n in os.listdir(staging) if n != LOCK_FILE]
    if not names:
        return Leftover(None, [], [])
    try:
        record = read_run_record(staging)
    except (RunFolderError, FileNotFoundError) as e:
        why = f"no {RUN_FILE}" if isinstance(e, FileNotFoundError) else str(e)
        raise RunFolderError(f"{staging} is not a gallop staging folder ({why}); it holds {listing(names)}. gallop "
                             "keeps a run's staging folder at that name: move it away") from None
    if record.get("status") == "complete":
        raise RunFolderError(f"{staging} holds run {record['run_id']}, finished but not yet published (publishing "
                             "was interrupted): the next `gallop finetune` on this output finishes that first")
    run_id = record["run_id"]
    checkpoints, notes = sealed_checkpoints(staging, run_id, verify_hashes=False)
    return Leftover(run_id, checkpoints, notes)


# ---------------------------------------------------------------------------------------------
# The plan: everything checked, nothing changed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, what it resumes, and what it replaces; made by :func:`plan_run`."""

    output: str
    staging: str
    run_id: str
    record: dict[str, Any]
    loss_log: str
    resume: Checkpoint | None = None
    adopt_staging: bool = False  # continue the interrupted run in its staging folder
    discard_staging: bool = False  # a leftover staging folder to delete first
    replaces: bool = False  # publishing replaces the run in the output folder
    replaced_run_id: str | None = None  # ... whose id, checked again when publishing
    link: tuple[Checkpoint, ...] = ()  # the output's checkpoints up to the resume point, linked into staging
    notes: tuple[str, ...] = field(default_factory=tuple)
    result_files: tuple[str, ...] = ()  # names a run writes (a run record without a file list: what it owns)
    passive: bool = False  # another rank of a multi-process run: rank 0 owns the folders


def _rank() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_output_location(output: str) -> None:
    parent, name = os.path.split(output)
    if not name or name in (".", ".."):
        raise RunFolderError(f"--output {output!r} must name a folder")
    if name.endswith(STAGING_SUFFIX):
        raise RunFolderError(f"--output {output!r}: names ending in {STAGING_SUFFIX} are gallop's staging folders")
    if _within(os.getcwd(), output):
        raise RunFolderError(f"--output {output} is the current folder or holds it; a finished run replaces the "
                             "output folder, so choose a folder of its own")
    if not os.path.exists(parent):
        raise RunFolderError(f"--output {output}: its parent folder {parent} does not exist (create it first, or "
                             "choose another --output)")
    if not os.path.isdir(parent):
        raise RunFolderError(f"--output {output}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--output {output}: the folder {parent} is not writable (gallop stages the run next "
                             "to the output and renames it into place)")


def check_output(output: str | os.PathLike) -> str:
    """The output folder's location alone (usable by any command that writes a folder): it can
    be created or replaced here. Returns the absolute path. Changes nothing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(output)))
    _check_output_location(path)
    return path


def check_writable_folder(folder: str | os.PathLike, flag: str = "--output", files: Iterable[str] = ()) -> str:
    """For a command that writes into a folder in place (``gallop reproduce``): the folder is a
    writable folder, or can be created in a writable one, and each of ``files`` in it is absent or
    a regular file (not a link). Returns the absolute path. Changes nothing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise RunFolderError(f"{flag} {path} exists and is not a folder")
        for name in files:
            st = lstat_or_none(os.path.join(path, name))
            if st is not None and not stat.S_ISREG(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise RunFolderError(f"{flag}: {os.path.join(path, name)} is {what}; gallop writes that file there "
                                     "and does not write through links: remove it")
        writable = path
    else:
        writable = os.path.dirname(path)
        while not os.path.lexists(writable):
            writable = os.path.dirname(writable)
        if not os.path.isdir(writable):
            raise RunFolderError(f"{flag} {path}: {writable} is not a folder")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag} {path}: the folder {writable} is not writable")
    return path


def plan_run(config: Any, *, loss_log: str, result_files: Iterable[str] = ()) -> RunPlan:
    """Check the output folder, the staging folder and ``config.resume`` against ``config``;
    change nothing. Raises :class:`RunFolderError` (a :class:`~gallop_kernels.errors.UserError`)."""
    output = check_output(config.output)
    result_files = (*result_files, loss_log)
    overwrite = bool(getattr(config, "overwrite", False))
    staging = staging_path(output)
    record = run_options(config)
    found = inspect_output(output, result_files)
    rank, world = _rank()
    passive = world > 1 and rank != 0  # rank 0 owns the folders; the others only write where it says
    refuse_foreign(output, found, overwrite or config.resume is not None)  # (continuing one replaces too)
    leftover = inspect_staging(staging, probe_lock=not passive)
    notes: list[str] = []
    resume_spec = config.resume
    replaced = found.record["run_id"] if found.kind == "run" else None
    plan = dict(output=output, staging=staging, record=record, loss_log=loss_log, result_files=tuple(result_files),
                passive=passive, replaces=replaced is not None, replaced_run_id=replaced)

    def finished_run_guard(action: str) -> None:
        if found.kind == "run" and not overwrite:
            extra = f" (and files it did not write: {listing(found.extra)})" if found.extra else ""
            raise RunFolderError(f"--output {output} holds a finished run (run {replaced}){extra}; {action} would "
                                 "replace it: pass --overwrite to allow that, or choose another --output")

    def leftover_guard() -> bool:
        if leftover is None:
            return False
        if leftover.checkpoints and not overwrite:
            latest = leftover.checkpoints[0]
            raise RunFolderError(f"an interrupted run of {output} kept its checkpoints (up to step {latest.step}) in "
                                 f"{staging}: continue it with --resume last, or pass --overwrite to discard it")
        notes.append(f"discarding {staging}, left by an interrupted run"
                     + (" (its checkpoints too: --overwrite)" if leftover.checkpoints else " (no complete checkpoint)"))
        return True

    if resume_spec is None:
        finished_run_guard("a new run")
        discard = leftover_guard()
        return RunPlan(run_id=secrets.token_hex(16), discard_staging=discard, notes=tuple(notes), **plan)

    if resume_spec == "last":
        if leftover is not None and leftover.run_id is not None:
            if not leftover.checkpoints:
                raise RunFolderError(f"--resume last: the interrupted run in {staging} saved no complete checkpoint"
                                     + "".join(f"\n  {n}" for n in leftover.notes)
                                     + "\nstart it again without --resume (the leftover is discarded)")
            candidates, where = leftover.checkpoints, staging
            notes += leftover.notes
        elif found.kind == "run":
            candidates, skipped = sealed_checkpoints(output, found.record["run_id"], verify_hashes=False)
            notes += skipped
            where = output
            if not candidates:
                raise RunFolderError(f"--resume last: the run in {output} has no complete checkpoint"
                                     + "".join(f"\n  {n}" for n in skipped))
        else:
            raise RunFolderError(f"--resume last: there is no run to resume in {output}"
                                 + (f" (its staging folder {staging} has no run record)" if leftover else ""))
        checkpoint = None
        for ck in candidates:  # newest first: the hashes are verified now, on the chosen one only
            try:
                checkpoint = read_checkpoint(ck.path)
                break
            except CheckpointError as e:
                notes.append(f"skipped {ck.path}: {e}")
        if checkpoint is None:
            raise RunFolderError(f"--resume last: no intact checkpoint in {where}" + "".join(f"\n  {n}" for n in notes))
    else:
        checkpoint = read_checkpoint(os.path.abspath(os.path.expanduser(os.fspath(resume_spec))))
        where = None
    _check_agreement(checkpoint, record, config)

    in_staging = _within(checkpoint.path, staging) if leftover is not None else False
    if in_staging:
        walk_tree(staging)  # the folder to continue holds no link (it would be written through)
        if leftover.run_id != checkpoint.run_id:
            raise RunFolderError(f"{checkpoint.path} belongs to run {checkpoint.run_id}, but the staging folder "
                                 f"{staging} to continue holds run {leftover.run_id}")
        later = [ck.step for ck in leftover.checkpoints if ck.step > checkpoint.step]
        if later and resume_spec != "last" and not overwrite:
            raise RunFolderError(f"{staging} holds later checkpoints of this run (steps {later}); resuming from step "
                                 f"{checkpoint.step} discards them: pass --overwrite to allow that, or resume the latest")
        return RunPlan(run_id=checkpoint.run_id, resume=checkpoint, adopt_staging=True, notes=tuple(notes), **plan)
    if found.kind == "run" and found.record["run_id"] != checkpoint.run_id and _within(checkpoint.path, output):
        raise RunFolderError(f"{checkpoint.path} belongs to run {checkpoint.run_id}, not to the run recorded in "
                             f"{output} ({found.record['run_id']})")
    finished_run_guard(f"continuing from {checkpoint.path}")
    discard = leftover_guard()
    link: tuple[Checkpoint, ...] = ()
    if _within(checkpoint.path, output):
        chain, _ = sealed_checkpoints(output, checkpoint.run_id, verify_hashes=False)
        link = tuple(ck for ck in chain if ck.step <= checkpoint.step)
    return RunPlan(run_id=checkpoint.run_id, resume=checkpoint, discard_staging=discard, link=link,
                   notes=tuple(notes), **plan)


def _check_agreement(checkpoint: Checkpoint, record: dict[str, Any], config: Any) -> None:
    differences = option_differences(checkpoint.manifest, record)
    if differences:
        raise CheckpointError(f"{checkpoint.path} was saved by a run with other options: "
                              + "; ".join(differences) + ". Resume with the same options, or start a new run")
    check_optimizer_state(checkpoint, config.density, config.score)
