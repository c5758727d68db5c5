"""The records of a run folder: ``gallop_run.json`` and the sealed checkpoints.

A checkpoint is *sealed* once the Trainer has written it: its files are fsynced, then
``gallop_checkpoint.json`` (the run id, the options, the fingerprints, the size and SHA-256 of
every file) is written last. `read_checkpoint` accepts a checkpoint only when the manifest lists
exactly the files present, intact, with the optimizer state (`docs/design.md#run-folders`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from gallop_kernels.finetune.rundir.files import (
    RunFolderError, hash_fd, lstat_or_none, open_regular, fsync_dir, read_bytes, read_json, remove_tree, walk_tree,
    write_json_atomic,
)

RUN_FILE = "gallop_run.json"
MANIFEST = "gallop_checkpoint.json"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step
OPTIMIZER_FILE = "optimizer.pt"
REQUIRED_FILES = (OPTIMIZER_FILE, "scheduler.pt", "trainer_state.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FORMAT_VERSION = 1


class CheckpointError(RunFolderError):
    """A checkpoint that cannot be resumed from; the message says which and why."""

# ---------------------------------------------------------------------------------------------
# Records and checkpoints
# ---------------------------------------------------------------------------------------------


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
    st = lstat_or_none(path)
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
        fd = open_regular(full)
        try:
            size = os.fstat(fd).st_size
            if size != entry["size"]:
                raise CheckpointError(f"{full} has {size} bytes, {entry['size']} when the checkpoint was saved: "
                                      "it was changed or replaced (by another run's file?)")
            if verify_hashes and hash_fd(fd)[1] != entry["sha256"]:
                raise CheckpointError(f"{full} changed since the checkpoint was saved (another run's file?)")
        finally:
            os.close(fd)
    state = read_json(os.path.join(path, "trainer_state.json"), "trainer state")
    if not isinstance(state, dict) or state.get("global_step") != step:
        raise CheckpointError(f"{path}/trainer_state.json holds step "
                              f"{state.get('global_step') if isinstance(state, dict) else None!r}, not {step}")
    return Checkpoint(path=path, step=step, run_id=manifest["run_id"], manifest=manifest)


def weight_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a checkpoint's model weights (``model.safetensors``, a
    sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``), read from the headers where
    the format has them; :class:`CheckpointError` when they cannot be read."""
    import torch
    from safetensors import safe_open

    def header(path: str) -> dict[str, tuple[int, ...]]:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    try:
        for name in WEIGHT_FILES:
            path = os.path.join(folder, name)
            if lstat_or_none(path) is None:
                continue
            os.close(open_regular(path))  # (a link or a special file is refused)
            if name == "model.safetensors":
                return header(path)
            if name.endswith(".index.json"):
                index = read_json(path, "weights index")
                shards = sorted(set(index["weight_map"].values())) if isinstance(index, dict) else []
                if not all(isinstance(s, str) and s == os.path.basename(s) for s in shards):
                    raise ValueError("its weight_map does not name shard files in the checkpoint")
                found: dict[str, tuple[int, ...]] = {}
                for shard in shards:
                    found.update(header(os.path.join(folder, shard)) if shard.endswith(".safetensors")
                                 else {k: tuple(v.shape) for k, v in torch.load(
                                     os.path.join(folder, shard), map_location="meta", weights_only=True).items()})
                return found
            state = torch.load(path, map_location="meta", weights_only=True)
            return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except (CheckpointError, RunFolderError):
        raise
    except Exception as e:  # any unreadable weights file is the checkpoint's fault, said in one line
        raise CheckpointError(f"the model weights in {folder} cannot be read: {e}") from None
    raise CheckpointError(f"checkpoint {folder} holds no model weights ({', '.join(WEIGHT_FILES)})")


def check_resume_weights(folder: str, model: Any) -> None:
    """Every trainable tensor of ``model`` (one that requires grad) is in the checkpoint's weights
    with its shape, under its name or a tied alias; else resuming would silently start those
    tensors from the base again (the Trainer only warns about missing keys)."""
    shapes = weight_shapes(folder)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    missing = []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        names = aliases.get(id(p), ["?"])
        if not any(shapes.get(n) == tuple(p.shape) for n in names):
            missing.append(names[0] + ("" if names[0] not in shapes else f" (shape {shapes[names[0]]}, the model's "
                                                                          f"{tuple(p.shape)})"))
    if missing:
        raise CheckpointError(f"checkpoint {folder}: its model weights lack {len(missing)} trainable tensor(s) "
                              f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); resuming would "
                              "restart them from the base: refused")


def check_optimizer_state(checkpoint: Checkpoint, density: float, score: Any) -> None:
    """The checkpoint's optimizer state holds a selection made with this density and score, and its
    model weights hold at least as many tensors as the optimizer trains (an emptied weights file
    is refused here, before anything loads; `check_resume_weights` checks names and shapes once
    the model is loaded)."""
    import torch

    path = os.path.join(checkpoint.path, OPTIMIZER_FILE)
    fd = open_regular(path)
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
    trained = sum(len(g.get("params") or ()) for g in groups)
    held = len(weight_shapes(checkpoint.path))
    if held < trained:
        raise CheckpointError(f"checkpoint {checkpoint.path}: its model weights hold {held} tensor(s), fewer than the "
                              f"{trained} its optimizer trains; resuming would restart them from the base: refused")


def seal_checkpoint(path: str, record: dict[str, Any]) -> None:
    """Mark a fully written checkpoint resumable: fsync its files, then write the manifest (last)."""
    folders, present = walk_tree(path)
    files = {}
    for rel in present:
        if rel == MANIFEST:
            continue
        fd = open_regular(os.path.join(path, rel))
        try:
            os.fsync(fd)
            size, digest = hash_fd(fd)
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
