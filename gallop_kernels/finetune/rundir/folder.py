"""A run's staging folder, from creation (or continuation) to publishing or cleanup
(`docs/design.md#run-folders`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import Any, Iterable

from gallop_kernels.errors import signals_deferred
from gallop_kernels.finetune.rundir.files import (
    RunFolderError, exchange, folder_lock, fsync_dir, link_or_copy, lstat_or_none, open_regular, remove_run_tree,
    remove_tree, storage_failure, walk_tree, write_atomic, write_json_atomic,
)
from gallop_kernels.finetune.rundir.plan import (
    LOCK_FILE, RunPlan, inspect_output, listing, staging_path, take_lock,
)
from gallop_kernels.finetune.rundir.records import (
    CHECKPOINT_RE, FORMAT_VERSION, MANIFEST, RUN_FILE, Checkpoint, checkpoint_folders, filtered_loss_log,
    seal_checkpoint, sealed_checkpoints, unseal_checkpoint,
)


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
            self._lock = take_lock(self.path, create=True)
            self._trim_adopted()
            return
        if plan.discard_staging and lstat_or_none(self.path) is not None:
            lock = take_lock(self.path, create=True)
            try:
                remove_run_tree(self.path, RUN_FILE)
            finally:
                os.close(lock)
        parent = os.path.dirname(self.path)
        tmp = os.path.join(parent, f"{os.path.basename(self.path)}.tmp-{secrets.token_hex(4)}")
        with folder_lock(parent):  # (finish_interrupted_publish never sees it unlocked)
            os.mkdir(tmp, 0o755)
            try:
                self._lock = take_lock(tmp, create=True)
            except BaseException:
                remove_tree(tmp)
                raise
        try:
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

    def _write_record(self, folder: str, status: str, **published: Any) -> None:
        """The run record; ``published`` (when complete): ``replaces`` (the run id it replaces in
        the output, or None) and ``files`` (the top-level names the run owns)."""
        ck = self.plan.resume
        write_json_atomic(os.path.join(folder, RUN_FILE), {
            "format": "gallop-run", "version": FORMAT_VERSION, "run_id": self.plan.run_id, "status": status,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": None if ck is None else {"checkpoint": ck.path, "step": ck.step},
            **self.plan.record, **published,
        })

    @staticmethod
    def _link_checkpoint(ck: Checkpoint, dst: str) -> None:
        folders, files = walk_tree(ck.path)
        os.mkdir(dst)
        for rel in folders:
            os.mkdir(os.path.join(dst, rel))
        for rel in files:
            link_or_copy(os.path.join(ck.path, rel), os.path.join(dst, rel))

    def _abandon(self, error: BaseException | None) -> None:
        keep = self._keep or bool(self.saved_steps)
        if keep and os.path.isdir(self.path):
            if error is not None and not self._finished:
                error.add_note(f"{self.plan.output} is as it was; this run's checkpoints are kept in {self.path}: "
                               "continue with --resume last")
            return
        remove_run_tree(self.path, RUN_FILE)
        if isinstance(error, (KeyboardInterrupt, OSError)):
            error.add_note(f"{self.plan.output} is as it was")

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def publish(self) -> str:
        """Rename the staging folder onto the output (replacing the finished run the plan allows);
        returns the output path.

        Under the parent folder's lock (`files.folder_lock`): check that the output is still what
        the plan saw, write the run record as complete (with the run it replaces and the files it
        owns), then swap. A SIGKILL at any point leaves a state `finish_interrupted_publish` knows
        how to finish: the complete run still in the staging folder, or the replaced run there (the
        new record names it), or the replaced run under a ``.old-*`` name."""
        plan = self.plan
        if plan.passive:
            self.published = True
            return plan.output
        self._fsync_results()
        old = None
        with folder_lock(os.path.dirname(plan.output)):
            now = inspect_output(plan.output, plan.result_files)
            same = (now.kind in ("missing", "empty") or now.kind == "run" and plan.replaces and not now.extra
                    and now.record["run_id"] == plan.replaced_run_id)
            if not same:
                self._keep, self._finished = True, True
                raise RunFolderError(f"{plan.output} was created or changed while this run was training; the "
                                     f"finished run is kept in {self.path}")
            names = sorted({*os.listdir(self.path), RUN_FILE} - {LOCK_FILE})
            self._write_record(self.path, status="complete",
                               replaces=now.record["run_id"] if now.kind == "run" else None, files=names)
            swapped = False  # whether self.path no longer holds this run
            try:
                with signals_deferred():  # SIGINT/SIGTERM wait until the output is the new run
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.path, LOCK_FILE))  # the fd keeps the lock until released
                    if now.kind in ("missing", "empty"):
                        os.rename(self.path, plan.output)  # rename(2) replaces an empty folder
                        swapped = True
                    else:
                        old = trash_path(self.path)
                        if exchange(self.path, plan.output):
                            swapped = True
                            os.rename(self.path, old)  # the replaced run, under a name no run reads
                        else:
                            os.rename(plan.output, old)
                            try:
                                os.rename(self.path, plan.output)
                                swapped = True
                            except OSError:
                                os.rename(old, plan.output)  # put the finished run back
                                old = None
                                raise
                    fsync_dir(os.path.dirname(plan.output))
                    self.published = True
            except BaseException as error:
                if isinstance(error, KeyboardInterrupt) and self.published:
                    error.add_note(f"the run was published in {plan.output} before the interrupt took effect")
                elif not swapped:  # still ours and not published: a run to continue, never to publish later
                    with contextlib.suppress(OSError):
                        self._write_record(self.path, status="running")
                raise
            finally:
                if old is not None and self.published:
                    remove_run_tree(old, RUN_FILE)
        return plan.output

    def _fsync_results(self) -> None:
        folders, files = walk_tree(self.path)
        sealed = {f"{os.path.basename(ck)}" for _, ck in checkpoint_folders(self.path)
                  if lstat_or_none(os.path.join(ck, MANIFEST)) is not None}
        for rel in files:
            if rel.split(os.sep, 1)[0] in sealed or rel == LOCK_FILE:
                continue  # sealed checkpoints were synced when sealed
            fd = open_regular(os.path.join(self.path, rel))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for rel in [*folders, ""]:
            fsync_dir(os.path.join(self.path, rel))

    # -- the Trainer's side -----------------------------------------------------------------------

    def trainer_class(self, base: type) -> type:
        """``base`` (a ``Trainer`` class) whose checkpoint saves fail with one ``OSError`` (errno
        and the checkpoint named) when the disk is full or a size limit is hit, instead of each
        writer's own error; the partial checkpoint is removed (it was never sealed, so nothing
        could resume from it), and the sealed ones before it stay for ``--resume last``."""

        class SavesChecked(base):
            def _save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super()._save_checkpoint(*args, **kwargs)
                except Exception as error:
                    path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
                    failure = storage_failure(error, path)
                    if failure is None:
                        raise
                    with contextlib.suppress(OSError):
                        unseal_checkpoint(path)
                    raise OSError(failure.errno, f"cannot save checkpoint {path}: {failure.strerror} (a full disk, "
                                  "a quota or a file-size limit); the partial checkpoint was removed") from None

        SavesChecked.__name__ = SavesChecked.__qualname__ = base.__name__
        return SavesChecked

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
                    if lstat_or_none(stale) is not None:
                        unseal_checkpoint(stale)
                return control

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                    seal_checkpoint(path, {"run_id": folder.plan.run_id, **folder.plan.record})
                    folder.saved_steps.append(state.global_step)
                return control

        return SealCheckpoints()


# ---------------------------------------------------------------------------------------------
# What an interrupted publish (or creation) left, finished by the next run on the output
# ---------------------------------------------------------------------------------------------

TRASH_INFIX = ".old-"
TMP_INFIX = ".tmp-"


def trash_path(staging: str) -> str:
    """Where a replaced run waits to be deleted: ``.out.gallop-staging.old-<hex>``."""
    return f"{staging}{TRASH_INFIX}{secrets.token_hex(4)}"


def _record_or_none(folder: str) -> dict[str, Any] | None:
    from gallop_kernels.finetune.rundir.records import read_run_record

    try:
        return read_run_record(folder)
    except (RunFolderError, OSError):
        return None


def _lock_is_free(folder: str) -> bool:
    """No live process holds ``folder``'s staging lock (a missing lock file counts as free)."""
    import fcntl

    path = os.path.join(folder, LOCK_FILE)
    if lstat_or_none(path) is None:
        return True
    fd = open_regular(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def finish_interrupted_publish(output: str, result_files: Iterable[str] = ()) -> list[str]:
    """Finish or clean up what a run killed while publishing onto ``output`` left (a note per
    action; `docs/design.md#run-folders`). Under the parent folder's lock, as `RunFolder.publish`:

    - the staging folder holds a *complete* run (its record says so) and the output is missing,
      empty or the run it replaces: publishing was cut short before the swap; it is finished;
    - the staging folder holds the run the output's run replaced (the output's record names it):
      cut short after the swap; the replaced run is deleted, so that it can never be continued;
    - ``.out.gallop-staging.old-*`` folders holding a run record (or empty): replaced runs whose
      deletion was cut short; deleted. ``.out.gallop-staging.tmp-*`` folders whose lock no
      process holds: a staging folder that never appeared; deleted.

    A complete run in the staging folder that fits none of these is refused (the message names
    it); anything at those names without a run record is left alone, with a note. Run by
    ``gallop finetune`` before it plans, so a replaced run is gone before ``--resume last``
    looks for checkpoints. ``result_files``: as for `plan_run` (what an older run record owns)."""
    from gallop_kernels.finetune.rundir.plan import check_output

    output = check_output(output)
    parent = os.path.dirname(output)
    staging = staging_path(output)
    notes: list[str] = []
    with folder_lock(parent):
        staged = _record_or_none(staging) if os.path.isdir(staging) and not os.path.islink(staging) else None
        if staged is not None and staged.get("status") == "complete":
            found = inspect_output(output, result_files)
            if found.kind in ("missing", "empty") or (found.kind == "run" and not found.extra
                                                      and found.record["run_id"] == staged.get("replaces")):
                with signals_deferred():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(staging, LOCK_FILE))
                    if found.kind in ("missing", "empty"):
                        os.rename(staging, output)
                    else:
                        old = trash_path(staging)
                        if exchange(staging, output):
                            os.rename(staging, old)
                        else:
                            os.rename(output, old)
                            os.rename(staging, output)
                    fsync_dir(parent)
                notes.append(f"finished publishing run {staged['run_id']} in {output} (its publishing was interrupted)")
            elif found.kind == "run" and found.record.get("replaces") == staged["run_id"]:
                os.rename(staging, trash_path(staging))
                notes.append(f"removed run {staged['run_id']}, which run {found.record['run_id']} replaced in {output} "
                             "(the removal was interrupted)")
            else:
                raise RunFolderError(
                    f"{staging} holds run {staged['run_id']}, finished but not published, and {output} is not the "
                    f"run it was to replace ({staged.get('replaces')}); move {staging} away (it is a complete run "
                    "folder) and run again")
        prefix = os.path.basename(staging)
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if not name.startswith(prefix) or os.path.islink(path) or not os.path.isdir(path):
                continue
            rest = name[len(prefix):]
            if not (rest.startswith(TRASH_INFIX) or rest.startswith(TMP_INFIX)):
                continue
            left = os.listdir(path)
            ours = not left or _record_or_none(path) is not None or set(left) <= {LOCK_FILE, RUN_FILE}
            if rest.startswith(TMP_INFIX) and not _lock_is_free(path):
                continue  # another run creating its staging folder right now
            if not ours:
                notes.append(f"left {path} in place: it has no gallop run record (it holds {listing(left)})")
                continue
            remove_run_tree(path, RUN_FILE)
            if rest.startswith(TRASH_INFIX):
                notes.append(f"removed {path}, a replaced run whose removal was interrupted")
    return notes
