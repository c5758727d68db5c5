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

from gallop_kernels.finetune.rundir.files import (
    RunFolderError, file_sha256, read_json, remove_tree, storage_failure, walk_tree, write_atomic, write_json_atomic,
)
from gallop_kernels.finetune.rundir.folder import RunFolder, finish_interrupted_publish
from gallop_kernels.finetune.rundir.identity import (
    MAY_CHANGE_ON_RESUME, data_fingerprint, model_fingerprint, option_differences, run_options,
)
from gallop_kernels.finetune.rundir.plan import (
    LOCK_FILE, STAGING_SUFFIX, RunPlan, check_output, check_writable_folder, inspect_output, inspect_staging, plan_run,
    staging_path, take_lock,
)
from gallop_kernels.finetune.rundir.records import (
    MANIFEST, RUN_FILE, Checkpoint, CheckpointError, check_optimizer_state, check_resume_weights, checkpoint_folders,
    filtered_loss_log,
    read_checkpoint, read_run_record, seal_checkpoint, sealed_checkpoints, unseal_checkpoint,
)

__all__ = ["Checkpoint", "CheckpointError", "LOCK_FILE", "MANIFEST", "MAY_CHANGE_ON_RESUME", "RUN_FILE",
           "RunFolder", "RunFolderError", "RunPlan", "STAGING_SUFFIX", "check_optimizer_state", "check_resume_weights", "check_output",
           "check_writable_folder", "checkpoint_folders", "data_fingerprint", "file_sha256", "filtered_loss_log", "finish_interrupted_publish",
           "inspect_output", "inspect_staging", "model_fingerprint", "option_differences", "plan_run", "read_checkpoint",
           "read_json", "read_run_record", "remove_tree", "run_options", "seal_checkpoint", "sealed_checkpoints",
           "staging_path", "storage_failure", "take_lock", "unseal_checkpoint", "walk_tree", "write_atomic", "write_json_atomic"]
