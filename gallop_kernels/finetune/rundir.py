"""Run folders of ``gallop finetune``: staged, published in one rename, never mixed, never written
through a link (`docs/design.md#run-folders`).

For ``--output runs/exp`` a run lives in two places, both in ``runs/`` (one filesystem, so a
rename moves it):

    runs/.exp.gallop-staging/   the run being written (the Trainer's ``output_dir``), or the
                                checkpoints of an interrupted run, kept for ``--resume last``
    runs/exp/                   the published run: every result, the loss log, the checkpoints
                                and ``gallop_run.json`` (the run id, the options, the fingerprints)

:func:`plan_run` checks everything before a model is loaded and changes nothing: the output path
(its parent exists and is a folder, the output is not a file or a link, a finished run is replaced
only with ``--overwrite``, a folder that is not a gallop run never), the staging folder (no other
run holds its lock; an interrupted run with checkpoints is continued with ``--resume`` or
discarded only with ``--overwrite``), and the checkpoint to resume from. :class:`RunFolder`
then creates the staging folder (a locked temporary folder renamed into place), gives the
Trainer a callback that seals every checkpoint with a manifest once it is fully written, and
:meth:`RunFolder.publish` renames the staging folder onto the output (an atomic exchange when it
replaces a finished run). A run that fails or is interrupted leaves the output as it was; its
staging folder survives only if the run saved a checkpoint, and a new run finds it.

Every file this module writes is written to a temporary name, fsynced and renamed; every path it
reads or replaces is checked with ``lstat``/``O_NOFOLLOW``, so a link planted in a run folder is
refused, never followed.

A checkpoint is resumable only when its manifest (``gallop_checkpoint.json``, written last)
lists exactly the files present, each with its size and SHA-256; the manifest also records the
run id and the options. ``--resume`` refuses a checkpoint without optimizer state (resuming would
silently calibrate and select again), with files changed since it was saved (e.g. another run's
``optimizer.pt``), or saved with other options, another model or other data; ``--resume last``
takes the newest sealed checkpoint of the run in this output only, skipping unsealed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from gallop_kernels.errors import UserError, signals_deferred

RUN_FILE = "gallop_run.json"
MANIFEST = "gallop_checkpoint.json"
LOCK_FILE = ".gallop-lock"
STAGING_SUFFIX = ".gallop-staging"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step
OPTIMIZER_FILE = "optimizer.pt"
REQUIRED_FILES = (OPTIMIZER_FILE, "scheduler.pt", "trainer_state.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FORMAT_VERSION = 1

MAY_CHANGE_ON_RESUME = frozenset({
    "output", "resume", "overwrite", "epochs", "max_steps", "save_steps", "logging_steps", "progress",
    "save_full", "gradient_checkpointing", "eval_data", "eval_steps", "report_to",
    "model", "data",  # compared by content (fingerprints), not by how they are spelled
})
"""Options a resumed run may change: how long it trains, how often it saves, logs and evaluates.
Every other option must equal the checkpoint's (a new option is checked unless it is listed here)."""

_SAMPLE = 1 << 16  # bytes per sample of a large file's fingerprint
_SAMPLES = 16


class RunFolderError(UserError):
    """The output folder, the staging folder or a checkpoint cannot be used as asked."""


class CheckpointError(RunFolderError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Files: never through a link, always complete
# ---------------------------------------------------------------------------------------------


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _open_regular(path: str, flags: int = os.O_RDONLY) -> int:
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
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``path`` completely or not at all: a temporary file in the same folder, fsync, rename.
    A link at ``path`` is replaced, never written through."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder or ".")


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


def _hash_fd(fd: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def file_sha256(path: str) -> str:
    fd = _open_regular(path)
    try:
        return _hash_fd(fd)[1]
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Delete a folder we own; links inside are removed, never followed (``shutil.rmtree``)."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


# ---------------------------------------------------------------------------------------------
# Fingerprints: what the model and the data are, by content, not by path
# ---------------------------------------------------------------------------------------------


def sampled_sha256(path: str) -> str:
    """SHA-256 of a file's size and of evenly spread samples (all of it when small): cheap for a
    model's weights, and different for another model of the same shapes."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256(str(size).encode())
        if size <= _SAMPLE * _SAMPLES:
            digest.update(os.pread(fd, size, 0))
        else:
            for i in range(_SAMPLES):
                digest.update(os.pread(fd, _SAMPLE, (size - _SAMPLE) * i // (_SAMPLES - 1)))
        return digest.hexdigest()
    finally:
        os.close(fd)


def model_fingerprint(spec: str | None) -> str:
    """A local model folder or file by its content (names, sizes, samples); anything else (the
    embedded default, a hub id) by its name."""
    if spec is None:
        return "embedded"
    path = os.path.expanduser(os.fspath(spec))
    st = _lstat(path)
    if st is not None and os.path.isdir(path):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                digest.update(f"{name}\0{sampled_sha256(os.path.realpath(full))}\0".encode())
        return "folder:" + digest.hexdigest()
    if st is not None and os.path.isfile(path):
        return "file:" + sampled_sha256(os.path.realpath(path))
    return f"name:{spec}"


def _source(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        for candidate in (text, text.rsplit(":", 1)[0]):  # "file.jsonl:0.7" names a weighted file
            path = os.path.expanduser(candidate)
            if os.path.isfile(path):
                return {"sha256": file_sha256(os.path.realpath(path)), "rest": text[len(candidate):]}
        return text
    if isinstance(value, (list, tuple)):
        return [_source(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _source(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return value


def data_fingerprint(data: Any) -> str:
    """The training data by content: every file named in ``data`` by its SHA-256."""
    return hashlib.sha256(json.dumps(_source(data), sort_keys=True, default=str).encode()).hexdigest()


def run_options(config: Any) -> dict[str, Any]:
    """The options that decide a run's trajectory, as plain JSON values (``MAY_CHANGE_ON_RESUME``
    left out), with the model and data fingerprints."""
    values = dataclasses.asdict(config)
    options = {k: v for k, v in values.items() if k not in MAY_CHANGE_ON_RESUME}
    options = json.loads(json.dumps(options, default=str))
    return {"options": options, "model": values.get("model"), "data": values.get("data"),
            "model_fingerprint": model_fingerprint(values.get("model")),
            "data_fingerprint": data_fingerprint(values.get("data"))}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def option_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a checkpoint was saved with and this run asks differently, one phrase each."""
    out = []
    old, new = saved.get("options", {}), current["options"]
    for key in sorted(set(old) & set(new)):  # an option newer or older than the checkpoint is not compared
        if old[key] != new[key]:
            out.append(f"{_flag(key)} was {json.dumps(old[key])}, now {json.dumps(new[key])}")
    if saved.get("model_fingerprint") != current["model_fingerprint"]:
        out.append(f"--model is another model (the checkpoint's: {saved.get('model')!r})")
    if saved.get("data_fingerprint") != current["data_fingerprint"]:
        out.append(f"--data is other data (the checkpoint's: {saved.get('data')!r}; a file's content counts)")
    return out


# ---------------------------------------------------------------------------------------------
# Records and checkpoints
# ---------------------------------------------------------------------------------------------


def read_json(path: str, what: str) -> Any:
    """A JSON file read without following a link; a parse error names the line and column."""
    try:
        text = read_bytes(path).decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def read_run_record(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, RUN_FILE)
    record = read_json(path, "run record")
    if (not isinstance(record, dict) or record.get("format") != "gallop-run"
            or not isinstance(record.get("run_id"), str) or not record["run_id"]):
        raise RunFolderError(f"{path} is not a gallop run record")
    if record.get("version") != FORMAT_VERSION:
        raise RunFolderError(f"{path} has version {record.get('version')!r}; this gallop reads version "
                             f"{FORMAT_VERSION}")
    return record


@dataclass(frozen=True)
class Checkpoint:
    """A sealed checkpoint: its folder, step, run id and manifest."""

    path: str
    step: int
    run_id: str
    manifest: dict[str, Any]


def checkpoint_folders(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every ``checkpoint-N`` entry in ``folder``, newest first (links included,
    so that the caller can say why it skips them)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = CHECKPOINT_RE.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found, reverse=True)


def read_checkpoint(path: str, *, verify_hashes: bool = True) -> Checkpoint:
    """The checkpoint at ``path`` if it is sealed and intact, else :class:`CheckpointError` saying
    what is wrong (not sealed, a file missing, changed or added, no optimizer state, a link)."""
    path = os.path.normpath(path)
    st = _lstat(path)
    if st is None:
        raise CheckpointError(f"checkpoint {path} does not exist")
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is a symbolic link; give the folder itself")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a folder")
    m = CHECKPOINT_RE.fullmatch(os.path.basename(path))
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (checkpoint-<step>)")
    step = int(m.group(1))
    try:
        _, present = walk_tree(path)
    except RunFolderError as e:
        raise CheckpointError(f"checkpoint {path} cannot be used: {e}") from None
    if MANIFEST not in present:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}, so it was interrupted "
                              "while being saved (or written by another tool)")
    try:
        manifest = read_json(os.path.join(path, MANIFEST), "checkpoint manifest")
    except RunFolderError as e:
        raise CheckpointError(str(e)) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != "gallop-checkpoint"
            or manifest.get("version") != FORMAT_VERSION or not isinstance(files, dict)
            or not isinstance(manifest.get("run_id"), str) or not isinstance(manifest.get("options"), dict)
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values())):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is not a gallop checkpoint manifest "
                              f"(version {FORMAT_VERSION})")
    if manifest.get("step") != step:
        raise CheckpointError(f"checkpoint {path} holds step {manifest.get('step')!r}, not {step}: it was renamed "
                              "or copied from another place")
    present = [f for f in present if f != MANIFEST]
    if OPTIMIZER_FILE not in present:
        raise CheckpointError(f"checkpoint {path} has no optimizer state ({OPTIMIZER_FILE}): resuming without it "
                              "would select new entries and restart the schedule, so it is refused")
    missing = sorted(set(files) - set(present))
    added = sorted(set(present) - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}")
    if added:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(added)}, which were not part of it when it was "
                              "saved")
    lacking = [f for f in REQUIRED_FILES if f not in files]
    if lacking or not any(w in files for w in WEIGHT_FILES):
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(lacking) or 'model weights'}: it cannot resume a run")
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        fd = _open_regular(full)
        try:
            size = os.fstat(fd).st_size
            if size != entry["size"]:
                raise CheckpointError(f"{full} has {size} bytes, {entry['size']} when the checkpoint was saved: "
                                      "it was changed or replaced (by another run's file?)")
            if verify_hashes and _hash_fd(fd)[1] != entry["sha256"]:
                raise CheckpointError(f"{full} changed since the checkpoint was saved (another run's file?)")
        finally:
            os.close(fd)
    state = read_json(os.path.join(path, "trainer_state.json"), "trainer state")
    if not isinstance(state, dict) or state.get("global_step") != step:
        raise CheckpointError(f"{path}/trainer_state.json holds step "
                              f"{state.get('global_step') if isinstance(state, dict) else None!r}, not {step}")
    return Checkpoint(path=path, step=step, run_id=manifest["run_id"], manifest=manifest)


def check_optimizer_state(checkpoint: Checkpoint, density: float, score: Any) -> None:
    """The checkpoint's optimizer state holds a selection made with this density and score."""
    import torch

    path = os.path.join(checkpoint.path, OPTIMIZER_FILE)
    fd = _open_regular(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the checkpoint's fault, said in one line
        raise CheckpointError(f"{path} cannot be read as an optimizer state: {e}") from None
    finally:
        os.close(fd)
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{path} is not an optimizer state dict")
    if not any("steps_since_selection" in g for g in groups):
        raise CheckpointError(f"{path} holds no selection (not a SparseAdamW state that has selected): resuming "
                              "from it would calibrate and select again, so it is refused")
    for i, g in enumerate(groups):
        if g.get("params") and (g.get("density") != density or g.get("score") != score):
            raise CheckpointError(f"{path}: param group {i} was trained with density {g.get('density')!r} and score "
                                  f"{g.get('score')!r}, this run asks {density!r} and {score!r}")


def seal_checkpoint(path: str, record: dict[str, Any]) -> None:
    """Mark a fully written checkpoint resumable: fsync its files, then write the manifest (last)."""
    folders, present = walk_tree(path)
    files = {}
    for rel in present:
        if rel == MANIFEST:
            continue
        fd = _open_regular(os.path.join(path, rel))
        try:
            os.fsync(fd)
            size, digest = _hash_fd(fd)
        finally:
            os.close(fd)
        files[rel] = {"size": size, "sha256": digest}
    for rel in [*folders, ""]:
        fsync_dir(os.path.join(path, rel))
    m = CHECKPOINT_RE.fullmatch(os.path.basename(os.path.normpath(path)))
    manifest = {"format": "gallop-checkpoint", "version": FORMAT_VERSION, "step": int(m.group(1)) if m else None,
                **{k: record[k] for k in ("run_id", "options", "model", "data", "model_fingerprint",
                                          "data_fingerprint")},
                "files": files}
    write_json_atomic(os.path.join(path, MANIFEST), manifest)


def unseal_checkpoint(path: str) -> None:
    """Forget a checkpoint about to be written again: its manifest first, then the folder."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, MANIFEST))
    remove_tree(path)


def sealed_checkpoints(folder: str, run_id: str | None, *, verify_hashes: bool = True
                       ) -> tuple[list[Checkpoint], list[str]]:
    """The sealed checkpoints in ``folder`` (of ``run_id`` when given), newest first, and a note
    for each one skipped."""
    found, skipped = [], []
    for _, path in checkpoint_folders(folder):
        try:
            ck = read_checkpoint(path, verify_hashes=verify_hashes)
        except CheckpointError as e:
            skipped.append(f"skipped {path}: {e}")
            continue
        if run_id is not None and ck.run_id != run_id:
            skipped.append(f"skipped {path}: it belongs to another run ({ck.run_id}) than the one in this folder")
            continue
        found.append(ck)
    return found, skipped


def filtered_loss_log(source: str, up_to_step: int) -> bytes:
    """The lines of a loss log up to ``up_to_step`` (what a resumed run keeps); a torn last line is dropped."""
    if not os.path.isfile(source) or os.path.islink(source):
        return b""
    kept = []
    for line in read_bytes(source).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= up_to_step:
            kept.append(line + b"\n")
    return b"".join(kept)


# ---------------------------------------------------------------------------------------------
# The output folder and its staging folder, as found
# ---------------------------------------------------------------------------------------------


def staging_path(output: str) -> str:
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}{STAGING_SUFFIX}")


@dataclass(frozen=True)
class Found:
    """What is at a path: ``kind`` is missing, empty, run, results (gallop results without a run
    record, written before run records existed) or foreign."""

    kind: str
    record: dict[str, Any] | None = None


def inspect_output(output: str, result_files: Iterable[str] = ()) -> Found:
    st = _lstat(output)
    if st is None:
        return Found("missing")
    if stat.S_ISLNK(st.st_mode):
        raise RunFolderError(f"--output {output} is a symbolic link; give the folder itself (gallop replaces the "
                             "output folder when a run finishes and does not follow links)")
    if not stat.S_ISDIR(st.st_mode):
        raise RunFolderError(f"--output {output} exists and is not a folder")
    names = os.listdir(output)
    if not names:
        return Found("empty")
    if RUN_FILE in names:
        try:
            return Found("run", read_run_record(output))
        except RunFolderError:
            return Found("results")  # a damaged record: still gallop's, replaced only with --overwrite
    if any(n in names for n in result_files) or any(CHECKPOINT_RE.fullmatch(n) for n in names):
        return Found("results")
    return Found("foreign")


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid:
            return f" (process {pid})"
    return ""


def _take_lock(folder: str, *, create: bool) -> int:
    """The staging folder's lock, held by this process until the fd is closed (``flock``: it is
    released when a killed process's fds close, so a crash never leaves a stale lock)."""
    path = os.path.join(folder, LOCK_FILE)
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = _open_regular(path, flags)
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
    if _lstat(path) is None:
        return
    fd = _open_regular(path, os.O_RDONLY)
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
    st = _lstat(staging)
    if st is None:
        return None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise RunFolderError(f"{staging} is {what}, but gallop keeps a run's staging folder at that name: remove it")
    if probe_lock:
        _staging_in_use(staging)
    try:
        run_id = read_run_record(staging)["run_id"]
    except (RunFolderError, OSError):
        run_id = None
    checkpoints, notes = sealed_checkpoints(staging, run_id, verify_hashes=False) if run_id else ([], [])
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
    replaces: bool = False  # publishing replaces the run (or results) in the output folder
    link: tuple[Checkpoint, ...] = ()  # the output's checkpoints up to the resume point, linked into staging
    notes: tuple[str, ...] = field(default_factory=tuple)
    result_files: tuple[str, ...] = ()  # names that mark a folder as gallop results (no run record)
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
            st = _lstat(os.path.join(path, name))
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
    overwrite = bool(getattr(config, "overwrite", False))
    staging = staging_path(output)
    record = run_options(config)
    found = inspect_output(output, result_files)
    rank, world = _rank()
    passive = world > 1 and rank != 0  # rank 0 owns the folders; the others only write where it says
    if found.kind == "foreign":
        raise RunFolderError(f"--output {output} holds files that are not a gallop run; gallop replaces the "
                             "output folder when a run finishes, so choose an empty or new folder")
    leftover = inspect_staging(staging, probe_lock=not passive)
    notes: list[str] = []
    resume_spec = config.resume
    plan = dict(output=output, staging=staging, record=record, loss_log=loss_log, result_files=tuple(result_files),
                passive=passive)

    def finished_run_guard(action: str) -> None:
        if found.kind in ("run", "results") and not overwrite:
            what = (f"a finished run (run {found.record['run_id']})" if found.kind == "run"
                    else "the results of an earlier run")
            raise RunFolderError(f"--output {output} holds {what}; {action} would replace it: pass --overwrite to "
                                 "allow that, or choose another --output")

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
        return RunPlan(run_id=secrets.token_hex(16), discard_staging=discard, replaces=found.kind in ("run", "results"),
                       notes=tuple(notes), **plan)

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
        return RunPlan(run_id=checkpoint.run_id, resume=checkpoint, adopt_staging=True,
                       replaces=found.kind in ("run", "results"), notes=tuple(notes), **plan)
    if found.kind == "run" and found.record["run_id"] != checkpoint.run_id and _within(checkpoint.path, output):
        raise RunFolderError(f"{checkpoint.path} belongs to run {checkpoint.run_id}, not to the run recorded in "
                             f"{output} ({found.record['run_id']})")
    finished_run_guard(f"continuing from {checkpoint.path}")
    discard = leftover_guard()
    link: tuple[Checkpoint, ...] = ()
    if _within(checkpoint.path, output):
        chain, _ = sealed_checkpoints(output, checkpoint.run_id, verify_hashes=False)
        link = tuple(ck for ck in chain if ck.step <= checkpoint.step)
    return RunPlan(run_id=checkpoint.run_id, resume=checkpoint, discard_staging=discard,
                   replaces=found.kind in ("run", "results"), link=link, notes=tuple(notes), **plan)


def _check_agreement(checkpoint: Checkpoint, record: dict[str, Any], config: Any) -> None:
    differences = option_differences(checkpoint.manifest, record)
    if differences:
        raise CheckpointError(f"{checkpoint.path} was saved by a run with other options: "
                              + "; ".join(differences) + ". Resume with the same options, or start a new run")
    check_optimizer_state(checkpoint, config.density, config.score)


# ---------------------------------------------------------------------------------------------
# The run folder: staging, checkpoints, publishing
# ---------------------------------------------------------------------------------------------


class RunFolder:
    """The staging folder of one run, from creation (or adoption) to publishing or cleanup.

    Use as a context manager; call :meth:`publish` when every result is written. Leaving the block
    without publishing (an error, SIGINT, SIGTERM via `errors.terminate_as_interrupt`) keeps the
    output untouched and the staging folder only if this run saved a checkpoint there (or it was an
    interrupted run's to begin with); a note on the exception says where.
    """

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.path = plan.staging
        self.published = False
        self.saved_steps: list[int] = []
        self._lock: int | None = None
        self._keep = plan.adopt_staging
        self._finished = False  # complete but not published: the error says where it is

    # -- paths the run writes -------------------------------------------------------------------

    @property
    def loss_log(self) -> str:
        return os.path.join(self.path, self.plan.loss_log)

    @property
    def resume_from(self) -> str | None:
        """The checkpoint folder to hand to ``Trainer.train(resume_from_checkpoint=...)``."""
        ck = self.plan.resume
        if ck is None:
            return None
        if self.plan.link and not self.plan.adopt_staging:
            return os.path.join(self.path, os.path.basename(ck.path))  # the linked copy
        return ck.path

    def final(self, path: str) -> str:
        """Where a path written in the staging folder is once the run is published."""
        rel = os.path.relpath(path, self.path)
        return self.plan.output if rel == "." else os.path.join(self.plan.output, rel)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "RunFolder":
        if not self.plan.passive:
            try:
                self._open()
            except BaseException:
                self._release()
                raise
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        try:
            if not self.published and not self.plan.passive:
                self._abandon(error)
        finally:
            self._release()
        return False

    def _open(self) -> None:
        plan = self.plan
        if plan.adopt_staging:
            walk_tree(self.path)  # refuse links planted in the folder we continue (before writing the lock)
            self._lock = _take_lock(self.path, create=True)
            self._trim_adopted()
            return
        if plan.discard_staging and _lstat(self.path) is not None:
            lock = _take_lock(self.path, create=True)
            try:
                remove_tree(self.path)
            finally:
                os.close(lock)
        parent = os.path.dirname(self.path)
        tmp = os.path.join(parent, f"{os.path.basename(self.path)}.tmp-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o755)
        try:
            self._lock = _take_lock(tmp, create=True)
            self._write_record(tmp, status="running")
            for ck in plan.link:
                self._link_checkpoint(ck, os.path.join(tmp, os.path.basename(ck.path)))
            if plan.resume is not None:
                log = filtered_loss_log(os.path.join(os.path.dirname(plan.resume.path), plan.loss_log),
                                        plan.resume.step)
                if log:
                    write_atomic(os.path.join(tmp, plan.loss_log), log)
            try:
                os.rename(tmp, self.path)  # the staging folder appears whole, already locked
            except OSError as e:
                raise RunFolderError(f"cannot create the staging folder {self.path}: {e.strerror} (another run "
                                     "started at the same time?)") from None
            fsync_dir(parent)
        except BaseException:
            remove_tree(tmp)
            raise

    def _trim_adopted(self) -> None:
        """Continue an interrupted run: keep its sealed checkpoints up to the resume step, drop the
        rest (unsealed or later checkpoints, partial results) and the loss log past that step."""
        step = self.plan.resume.step
        keep = {os.path.basename(ck.path) for ck in sealed_checkpoints(self.path, self.plan.run_id,
                                                                       verify_hashes=False)[0] if ck.step <= step}
        for name in os.listdir(self.path):
            if name in keep or name in (RUN_FILE, LOCK_FILE, self.plan.loss_log):
                continue
            target = os.path.join(self.path, name)
            if CHECKPOINT_RE.fullmatch(name):
                unseal_checkpoint(target)
            else:
                remove_tree(target)
        write_atomic(self.loss_log, filtered_loss_log(self.loss_log, step))
        self._write_record(self.path, status="running")

    def _write_record(self, folder: str, status: str) -> None:
        ck = self.plan.resume
        write_json_atomic(os.path.join(folder, RUN_FILE), {
            "format": "gallop-run", "version": FORMAT_VERSION, "run_id": self.plan.run_id, "status": status,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": None if ck is None else {"checkpoint": ck.path, "step": ck.step},
            **self.plan.record,
        })

    @staticmethod
    def _link_checkpoint(ck: Checkpoint, dst: str) -> None:
        folders, files = walk_tree(ck.path)
        os.mkdir(dst)
        for rel in folders:
            os.mkdir(os.path.join(dst, rel))
        for rel in files:
            _link_or_copy(os.path.join(ck.path, rel), os.path.join(dst, rel))

    def _abandon(self, error: BaseException | None) -> None:
        keep = self._keep or bool(self.saved_steps)
        if keep and os.path.isdir(self.path):
            if error is not None and not self._finished:
                error.add_note(f"{self.plan.output} is as it was; this run's checkpoints are kept in {self.path}: "
                               "continue with --resume last")
            return
        remove_tree(self.path)
        if isinstance(error, (KeyboardInterrupt, OSError)):
            error.add_note(f"{self.plan.output} is as it was")

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def publish(self) -> str:
        """Rename the staging folder onto the output (replacing the finished run the plan allows);
        returns the output path."""
        plan = self.plan
        if plan.passive:
            self.published = True
            return plan.output
        self._write_record(self.path, status="complete")
        self._fsync_results()
        now = inspect_output(plan.output, plan.result_files)
        expected = {"missing", "empty"} | ({"run", "results"} if plan.replaces else set())
        if now.kind not in expected:
            self._keep, self._finished = True, True
            raise RunFolderError(f"{plan.output} was created or changed while this run was training; the finished run "
                                 f"is kept in {self.path}")
        old = None
        try:
            with signals_deferred():  # SIGINT/SIGTERM wait until the output is the new run
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, LOCK_FILE))  # the fd keeps the lock until released
                if now.kind in ("missing", "empty"):
                    os.rename(self.path, plan.output)  # rename(2) replaces an empty folder
                else:
                    trash = f"{self.path}.old-{secrets.token_hex(4)}"
                    if _exchange(self.path, plan.output):
                        os.rename(self.path, trash)  # the replaced run, under a name no run reads
                    else:
                        os.rename(plan.output, trash)
                        try:
                            os.rename(self.path, plan.output)
                        except OSError:
                            os.rename(trash, plan.output)  # put the finished run back
                            raise
                    old = trash
                fsync_dir(os.path.dirname(plan.output))
                self.published = True
        except KeyboardInterrupt as interrupt:
            if self.published:
                interrupt.add_note(f"the run was published in {plan.output} before the interrupt took effect")
            raise
        finally:
            if old is not None:
                remove_tree(old)
        return plan.output

    def _fsync_results(self) -> None:
        folders, files = walk_tree(self.path)
        sealed = {f"{os.path.basename(ck)}" for _, ck in checkpoint_folders(self.path)
                  if _lstat(os.path.join(ck, MANIFEST)) is not None}
        for rel in files:
            if rel.split(os.sep, 1)[0] in sealed or rel == LOCK_FILE:
                continue  # sealed checkpoints were synced when sealed
            fd = _open_regular(os.path.join(self.path, rel))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for rel in [*folders, ""]:
            fsync_dir(os.path.join(self.path, rel))

    # -- the Trainer's side -----------------------------------------------------------------------

    def callback(self) -> Any:
        """A ``TrainerCallback`` that seals every checkpoint once the Trainer has written it, clears
        a stale checkpoint of the same step before it is written again, and refuses to start a
        resumed run whose optimizer has no selection (no silent re-calibration)."""
        from transformers import TrainerCallback

        folder = self

        class SealCheckpoints(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if folder.plan.resume is not None and optimizer is not None:
                    from gallop_kernels.optim.unwrap import unwrap_optimizer

                    try:
                        opt = unwrap_optimizer(optimizer)
                    except TypeError:  # not SparseAdamW (the 4-bit path's AdamW): nothing to check
                        return control
                    if not opt.is_selected():
                        raise RuntimeError(f"resuming from {folder.resume_from}, but the optimizer holds no "
                                           "selection after loading it: refusing to calibrate again")
                return control

            def on_step_end(self, args, state, control, **kwargs):
                if control.should_save and state.is_world_process_zero:
                    stale = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                    if _lstat(stale) is not None:
                        unseal_checkpoint(stale)
                return control

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                    seal_checkpoint(path, {"run_id": folder.plan.run_id, **folder.plan.record})
                    folder.saved_steps.append(state.global_step)
                return control

        return SealCheckpoints()


def _exchange(a: str, b: str) -> bool:
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


__all__ = ["Checkpoint", "CheckpointError", "MANIFEST", "RUN_FILE", "RunFolder", "RunFolderError", "RunPlan",
           "check_output", "check_writable_folder", "data_fingerprint", "model_fingerprint", "plan_run", "read_checkpoint", "seal_checkpoint",
           "write_atomic", "write_json_atomic"]
