"""Run folders (`gallop_kernels/finetune/rundir/`): staging, publishing, sealed checkpoints, resume
checks, links never followed. No model is trained here: checkpoints are built as the Trainer lays
them out (with a real SparseAdamW state), so every case runs in milliseconds."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import pytest
import torch

from attack_support import assert_same_tree, tree_snapshot
from gallop_kernels import SparseAdamW
from gallop_kernels.errors import (
    Interrupted, UserError, describe, is_user_error, signals_deferred, terminate_as_interrupt, user_input,
)
from gallop_kernels.finetune import rundir
from gallop_kernels.finetune.pipeline import DELTA_FILE, LOSS_LOG, SUMMARY_FILE, FinetuneConfig
from gallop_kernels.finetune.rundir import (
    MANIFEST, RUN_FILE, CheckpointError, RunFolder, RunFolderError, plan_run, read_checkpoint,
)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A work folder with a model folder and a data file; the cwd is elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: sampled, not read whole
    (model / "tokenizer.json").write_text("{}")
    (work / "data.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return work


def config(place, **changes) -> FinetuneConfig:
    options = dict(model=str(place / "model"), data=str(place / "data.jsonl"), output=str(place / "out"),
                   density=0.25, save_steps=1)
    options.update(changes)
    return FinetuneConfig(**options)


def plan(cfg: FinetuneConfig) -> rundir.RunPlan:
    return plan_run(cfg, loss_log=LOSS_LOG, result_files=(DELTA_FILE, SUMMARY_FILE))


def optimizer_state(density: float = 0.25, score: str = "gallop", selected: bool = True) -> dict:
    p = torch.nn.Parameter(torch.arange(8.0) - 3.5)
    opt = SparseAdamW([p], lr=0.1, density=density, score=score)
    if selected:
        p.grad = torch.linspace(-1, 1, 8)
        opt.step()
    return opt.state_dict()


def make_checkpoint(folder, step: int, run_id: str, record: dict, *, density=0.25, seal=True, seed=0):
    """A checkpoint folder as the Trainer writes it, sealed as `RunFolder`'s callback seals it."""
    path = os.path.join(folder, f"checkpoint-{step}")
    os.makedirs(path)
    torch.save(optimizer_state(density), os.path.join(path, "optimizer.pt"))
    torch.save({"last_epoch": step + seed}, os.path.join(path, "scheduler.pt"))
    torch.save({"seed": seed}, os.path.join(path, "rng_state.pth"))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8)}, os.path.join(path, "model.safetensors"))  # the one trained tensor
    if seal:
        rundir.seal_checkpoint(path, {"run_id": run_id, **record})
    return path


def make_run(folder, cfg: FinetuneConfig, run_id: str, steps=(1, 2, 3), status="complete") -> str:
    """A published (or staged) run folder with sealed checkpoints, a loss log and results."""
    os.makedirs(folder, exist_ok=True)
    record = rundir.run_options(cfg)
    rundir.write_json_atomic(os.path.join(folder, RUN_FILE), {
        "format": "gallop-run", "version": 1, "run_id": run_id, "status": status, **record})
    for step in steps:
        make_checkpoint(folder, step, run_id, record)
    with open(os.path.join(folder, LOSS_LOG), "w") as f:
        for step in range(1, max(steps, default=0) + 1):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    with open(os.path.join(folder, DELTA_FILE), "wb") as f:
        f.write(b"delta")
    return str(folder)


def refused(place, cfg, match):
    """`plan_run` refuses ``cfg`` with a message matching ``match`` and changes nothing."""
    before = tree_snapshot(place)
    with pytest.raises(RunFolderError, match=match):
        plan(cfg)
    assert_same_tree(before, tree_snapshot(place))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_write_atomic_replaces_a_link_and_never_writes_through(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "result.json"
    link.symlink_to(target)
    rundir.write_json_atomic(str(link), {"a": 1})
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "result.json"]  # no temporary left


def test_walk_tree_refuses_links_and_special_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    assert rundir.walk_tree(str(tmp_path)) == (["a"], ["a/f"])
    (tmp_path / "a" / "l").symlink_to("/etc")
    with pytest.raises(RunFolderError, match="symbolic link"):
        rundir.walk_tree(str(tmp_path))
    (tmp_path / "a" / "l").unlink()
    os.mkfifo(tmp_path / "a" / "fifo")
    with pytest.raises(RunFolderError, match="not a regular file"):
        rundir.walk_tree(str(tmp_path))


def test_loss_log_keeps_whole_lines_up_to_the_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4, "lo')
    assert rundir.filtered_loss_log(str(log), 2) == b'{"step": 1}\n{"step": 2}\n'
    assert rundir.filtered_loss_log(str(log), 9).count(b"\n") == 3  # the torn last line is dropped


def test_fingerprints_are_by_content(place, tmp_path):
    model = str(place / "model")
    first = rundir.model_fingerprint(model)
    moved = tmp_path / "moved"
    os.rename(model, moved)
    assert rundir.model_fingerprint(str(moved)) == first  # a path is not an identity
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 1  # the first sample: another model of the same shapes
    weights.write_bytes(bytes(data))
    assert rundir.model_fingerprint(str(moved)) != first
    assert rundir.model_fingerprint(None) == "embedded" and rundir.model_fingerprint("org/name") == "name:org/name"
    d = str(place / "data.jsonl")
    before = rundir.data_fingerprint(d)
    assert rundir.data_fingerprint([d + ":0.5"]) != before  # a weight is part of the data
    (place / "data.jsonl").write_text('{"text": "c"}\n')
    assert rundir.data_fingerprint(d) != before


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _remove(name):
    return lambda ck: os.unlink(os.path.join(ck, name))


def _append(name):
    def change(ck):
        with open(os.path.join(ck, name), "ab") as f:
            f.write(b"!")
    return change


def _swap_optimizer(ck):  # another run's optimizer.pt, same size
    torch.save(optimizer_state(density=0.25, score="gradient"), os.path.join(ck, "optimizer.pt"))


def _link(name):
    def change(ck):
        outside = os.path.join(os.path.dirname(os.path.dirname(ck)), "outside")
        os.replace(os.path.join(ck, name), outside)
        os.symlink(outside, os.path.join(ck, name))
    return change


def _corrupt_manifest(ck):
    with open(os.path.join(ck, MANIFEST), "w") as f:
        f.write('{\n  "format": "gallop-checkpoint",\n  "files": {\n')


def _rename(ck):
    os.rename(ck, ck[: ck.rindex("-")] + "-7")


def _flip_byte(name):
    def change(ck):
        path = os.path.join(ck, name)
        data = bytearray(open(path, "rb").read())
        data[-1] ^= 0xFF
        open(path, "wb").write(bytes(data))
    return change


@pytest.mark.parametrize("change, match", [
    (_remove(MANIFEST), "incomplete: it has no gallop_checkpoint.json"),
    (_remove("optimizer.pt"), r"no optimizer state \(optimizer.pt\)"),
    (_remove("scheduler.pt"), "missing scheduler.pt"),
    (_append("optimizer.pt"), "bytes"),
    (_swap_optimizer, "changed since the checkpoint was saved|bytes"),
    (_flip_byte("trainer_state.json"), "changed since the checkpoint was saved"),
    (lambda ck: open(os.path.join(ck, "extra.bin"), "wb").close(), "extra.bin, which were not part of it"),
    (_link("optimizer.pt"), "symbolic link"),
    (_corrupt_manifest, r"invalid JSON \(.* at line 4, column 1"),
    (_rename, "holds step 3, not 7"),
])
def test_a_checkpoint_that_is_not_what_was_sealed_is_refused(place, change, match):
    cfg = config(place)
    ck = make_checkpoint(str(place), 3, "r1", rundir.run_options(cfg))
    assert read_checkpoint(ck).step == 3
    change(ck)
    path = ck if os.path.exists(ck) else ck[: ck.rindex("-")] + "-7"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_the_optimizer_state_must_hold_this_selection(place):
    cfg = config(place)
    ck = read_checkpoint(make_checkpoint(str(place), 1, "r1", rundir.run_options(cfg)))
    rundir.check_optimizer_state(ck, 0.25, "gallop")
    with pytest.raises(CheckpointError, match="density 0.25 and score 'gallop', this run asks 0.5"):
        rundir.check_optimizer_state(ck, 0.5, "gallop")
    torch.save(optimizer_state(selected=False), os.path.join(ck.path, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="holds no selection"):
        rundir.check_optimizer_state(ck, 0.25, "gallop")
    open(os.path.join(ck.path, "optimizer.pt"), "wb").write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read as an optimizer state"):
        rundir.check_optimizer_state(ck, 0.25, "gallop")


# ---------------------------------------------------------------------------------------------
# Plans: every refusal before anything changes
# ---------------------------------------------------------------------------------------------


def test_a_new_output_is_planned_without_touching_anything(place):
    before = tree_snapshot(place)
    p = plan(config(place))
    assert_same_tree(before, tree_snapshot(place))
    assert p.output == str(place / "out") and p.staging == str(place / ".out.gallop-staging")
    assert p.resume is None and not p.replaces and len(p.run_id) == 32


@pytest.mark.parametrize("setup, output, match", [
    (lambda w: (w / "out").write_text("x"), "out", "exists and is not a folder"),
    (lambda w: (w / "out").symlink_to(w / "model"), "out", "is a symbolic link"),
    (lambda w: None, "missing/out", "parent folder .* does not exist"),
    (lambda w: (w / "file").write_text("x"), "file/out", "is not a folder"),
    (lambda w: (w / "out").mkdir() or (w / "out" / "notes.txt").write_text("mine"), "out", "not a gallop run"),
    (lambda w: None, "model", "not a gallop run"),
    (lambda w: None, "x.gallop-staging", "staging folders"),
    (lambda w: (w / ".out.gallop-staging").symlink_to(w / "model"), "out", "is a symbolic link, but gallop keeps"),
    (lambda w: (w / ".out.gallop-staging").write_text("x"), "out", "is not a folder, but gallop keeps"),
])
def test_bad_output_locations_are_refused(place, setup, output, match):
    setup(place)
    refused(place, config(place, output=str(place / output)), match)


def test_the_current_folder_is_never_an_output(place, monkeypatch):
    (place / "inside").mkdir()
    monkeypatch.chdir(place / "inside")
    refused(place, config(place, output=str(place / "inside")), "current folder")
    refused(place, config(place, output=str(place)), "current folder")


def test_a_finished_run_is_replaced_only_with_overwrite(place):
    make_run(place / "out", config(place), "a" * 32)
    refused(place, config(place), "holds a finished run .* pass --overwrite")
    p = plan(config(place, overwrite=True))
    assert p.replaces and p.resume is None and p.run_id != "a" * 32
    # without its run record a folder is not a run, whatever it holds: refused even with --overwrite
    os.unlink(place / "out" / RUN_FILE)
    for overwrite in (False, True):
        refused(place, config(place, overwrite=overwrite),
                r"is not a gallop run folder: it holds checkpoint-1, checkpoint-2, checkpoint-3, "
                r"gallop_delta.safetensors, loss_log.jsonl")


@pytest.mark.parametrize("names", [
    ("checkpoint-500/", "my_notes.txt"),  # an ordinary Hugging Face Trainer output, plus the user's notes
    ("finetune_summary.json", "my_notes.txt"),
    ("gallop_delta.safetensors",),
    (RUN_FILE + "!broken", "my_notes.txt"),  # a run record that is not one
    (RUN_FILE + "!foreign", "my_notes.txt"),  # another tool's file of the same name
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_only_looks_like_a_run_is_never_replaced(place, names, overwrite):
    """Issue 17, case 1: only gallop_run.json with a run id marks a run folder; --overwrite never
    removes anything else, and the refusal names what would have been removed."""
    out = place / "out"
    out.mkdir()
    for name in names:
        if name.endswith("/"):
            (out / name).mkdir()
            (out / name / "trainer_state.json").write_text('{"global_step": 500}')
        elif name.endswith("!broken"):
            (out / RUN_FILE).write_text('{"format": "gallop-run", "version": 1, "run_id": ')
        elif name.endswith("!foreign"):
            (out / RUN_FILE).write_text('{"run": 7}')
        else:
            (out / name).write_text("precious")
    refused(place, config(place, overwrite=overwrite), r"is not a gallop run folder.*it holds .*(my_notes.txt|gallop_delta)")


@pytest.mark.parametrize("listed", [True, False])
def test_overwrite_replaces_a_run_only_when_it_holds_nothing_else(place, listed):
    """A run folder the user added files to: --overwrite refuses, naming them (a record written by
    this version lists the run's own files; an older record is judged by the names a run writes)."""
    make_run(place / "out", config(place), "a" * 32)
    record = json.loads((place / "out" / RUN_FILE).read_text())
    if listed:
        record["files"] = sorted(os.listdir(place / "out"))
        (place / "out" / RUN_FILE).write_text(json.dumps(record))
    (place / "out" / "my_notes.txt").write_text("precious")
    refused(place, config(place, overwrite=True), r"files that run did not write: my_notes.txt")
    refused(place, config(place), r"holds a finished run .*files it did not write: my_notes.txt.*--overwrite")
    os.unlink(place / "out" / "my_notes.txt")
    assert plan(config(place, overwrite=True)).replaced_run_id == "a" * 32


def test_a_staging_folder_without_a_run_record_is_not_discarded(place):
    staging = place / ".out.gallop-staging"
    staging.mkdir()
    (staging / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        refused(place, config(place, overwrite=overwrite), r"is not a gallop staging folder .* notes.txt")
    os.unlink(staging / "notes.txt")  # an empty folder at that name holds nothing to lose
    assert plan(config(place)).discard_staging


def test_an_interrupted_run_is_continued_or_discarded_explicitly(place):
    cfg = config(place)
    staging = str(place / ".out.gallop-staging")
    make_run(staging, cfg, "b" * 32, steps=(2, 4), status="running")
    make_checkpoint(staging, 6, "b" * 32, rundir.run_options(cfg), seal=False)  # interrupted mid-save
    refused(place, cfg, r"kept its checkpoints \(up to step 4\).*--resume last")
    assert plan(config(place, overwrite=True)).discard_staging
    p = plan(config(place, resume="last"))
    assert p.adopt_staging and p.resume.step == 4 and p.run_id == "b" * 32
    assert any("checkpoint-6" in n and "incomplete" in n for n in p.notes)
    # an explicit earlier checkpoint would drop the later ones: asked for explicitly
    refused(place, config(place, resume=os.path.join(staging, "checkpoint-2")), r"later checkpoints .*\[4\]")
    assert plan(config(place, resume=os.path.join(staging, "checkpoint-2"), overwrite=True)).resume.step == 2


def test_a_locked_staging_folder_belongs_to_a_running_run(place):
    staging = place / ".out.gallop-staging"
    staging.mkdir()
    fd = rundir.take_lock(str(staging), create=True)
    try:
        refused(place, config(place), rf"another gallop run \(process {os.getpid()}\) is writing")
        refused(place, config(place, resume="last"), "another gallop run")
    finally:
        os.close(fd)
    assert plan(config(place)).discard_staging  # lock released: a leftover without checkpoints


def test_resume_last_takes_the_newest_intact_checkpoint_of_this_run_only(place):
    cfg = config(place)
    out = make_run(place / "out", cfg, "c" * 32, steps=(1, 2, 3))
    make_checkpoint(out, 9, "d" * 32, rundir.run_options(cfg))  # an earlier, different run's
    os.unlink(os.path.join(out, "checkpoint-3", MANIFEST))  # interrupted while saving
    _append("optimizer.pt")(os.path.join(out, "checkpoint-2"))  # changed after it was saved
    refused(place, config(place, resume="last"), "would replace it: pass --overwrite")
    p = plan(config(place, resume="last", overwrite=True))
    assert p.resume.step == 1 and p.run_id == "c" * 32 and p.replaces
    assert [ck.step for ck in p.link] == [1]  # the run's own chain up to the resume point is kept
    notes = "\n".join(p.notes)
    assert "checkpoint-9: it belongs to another run" in notes and "checkpoint-3: " in notes
    assert "checkpoint-2: " in notes and "bytes" in notes


@pytest.mark.parametrize("changes, match", [
    ({"density": 0.5}, "--density was 0.25, now 0.5"),
    ({"score": "magnitude"}, '--score was "gallop", now "magnitude"'),
    ({"target_modules": ["q_proj"]}, "--target-modules"),
    ({"lr": 2e-4}, "--lr was 0.0001, now 0.0002"),
    ({"seed": 1}, "--seed"),
    ({"lean": True}, "--lean"),
])
def test_a_checkpoint_saved_with_other_options_is_refused(place, changes, match):
    make_run(place / "out", config(place), "e" * 32, steps=(1,))
    refused(place, config(place, resume="last", overwrite=True, **changes), match)
    refused(place, config(place, resume=str(place / "out" / "checkpoint-1"), overwrite=True, **changes), match)


def test_options_that_only_say_how_long_may_change(place):
    make_run(place / "out", config(place), "e" * 32, steps=(1,))
    p = plan(config(place, resume="last", overwrite=True, max_steps=50, save_steps=7, logging_steps=3,
                    epochs=4.0, save_full=True, gradient_checkpointing=True))
    assert p.resume.step == 1


def test_another_model_or_other_data_is_refused(place):
    make_run(place / "out", config(place), "e" * 32, steps=(1,))
    with open(place / "data.jsonl", "a") as f:
        f.write('{"text": "c"}\n')
    refused(place, config(place, resume="last", overwrite=True), "--data is other data")
    make_run(place / "out2", config(place, output=str(place / "out2")), "f" * 32, steps=(1,))
    (place / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    refused(place, config(place, output=str(place / "out2"), resume="last", overwrite=True), "--model is another model")


def test_an_optimizer_without_selection_is_refused_even_when_sealed(place):
    cfg = config(place)
    out = make_run(place / "out", cfg, "e" * 32, steps=())
    ck = make_checkpoint(out, 1, "e" * 32, rundir.run_options(cfg), seal=False)
    torch.save(optimizer_state(selected=False), os.path.join(ck, "optimizer.pt"))
    rundir.seal_checkpoint(ck, {"run_id": "e" * 32, **rundir.run_options(cfg)})
    refused(place, config(place, resume="last", overwrite=True), "holds no selection")


@pytest.mark.parametrize("weights, match", [
    ({}, r"weights hold 0 tensor\(s\), fewer than the 1 its optimizer trains"),
    (b"not a safetensors file", "model weights in .* cannot be read"),
])
def test_a_checkpoint_whose_weights_do_not_cover_the_trained_tensors_is_refused(place, weights, match):
    """Issue 17, case 8: the weights file emptied (or garbled) and the manifest re-sealed: the seal
    holds, but resuming would restart the trained tensors from the base; refused before anything."""
    from safetensors.torch import save_file

    cfg = config(place)
    out = make_run(place / "out", cfg, "e" * 32, steps=(1,))
    ck = os.path.join(out, "checkpoint-1")
    path = os.path.join(ck, "model.safetensors")
    if isinstance(weights, dict):
        save_file(weights, path)
    else:
        open(path, "wb").write(weights)
    rundir.seal_checkpoint(ck, json.load(open(os.path.join(ck, MANIFEST))))  # re-sealed: the files agree again
    refused(place, config(place, resume="last", overwrite=True), match)


def test_resume_weights_are_checked_by_name_and_shape_once_the_model_is_loaded(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)
    save_file({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    rundir.check_resume_weights(str(tmp_path), model)  # the frozen layer need not be there
    save_file({"0.weight": torch.zeros(4, 3), "1.bias": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lack 2 trainable tensor\(s\) \(0.weight \(shape \(4, 3\), the "
                                              r"model's \(3, 4\)\), 0.bias\)"):
        rundir.check_resume_weights(str(tmp_path), model)


def test_resume_from_a_checkpoint_elsewhere_continues_its_run(place):
    cfg = config(place, output=str(place / "old"))
    make_run(place / "old", cfg, "a1" * 16, steps=(1, 2))
    p = plan(config(place, resume=str(place / "old" / "checkpoint-2")))
    assert p.run_id == "a1" * 16 and p.resume.step == 2 and not p.link and not p.replaces
    refused(place, config(place, resume=str(place / "old" / "checkpoint-5")), "does not exist")
    refused(place, config(place, resume=str(place / "old")), "not a checkpoint folder")


# ---------------------------------------------------------------------------------------------
# The run folder's life
# ---------------------------------------------------------------------------------------------


def test_a_run_is_staged_then_published_whole(place):
    p = plan(config(place))
    with RunFolder(p) as run:
        assert sorted(os.listdir(run.path)) == [".gallop-lock", RUN_FILE]
        assert not os.path.exists(p.output)
        rundir.write_json_atomic(os.path.join(run.path, "result.json"), {"ok": True})
        assert run.final(os.path.join(run.path, "result.json")) == os.path.join(p.output, "result.json")
        run.publish()
    assert sorted(os.listdir(place)) == ["data.jsonl", "model", "out"]  # nothing else left behind
    assert sorted(os.listdir(p.output)) == [RUN_FILE, "result.json"]
    record = rundir.read_run_record(p.output)
    assert record["status"] == "complete" and record["run_id"] == p.run_id


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_replaces_a_finished_run_in_one_step(place, monkeypatch, exchange):
    make_run(place / "out", config(place), "a" * 32)
    if not exchange:  # a filesystem without renameat2(RENAME_EXCHANGE): two renames, signals held
        monkeypatch.setattr(rundir.folder, "exchange", lambda a, b: False)
    p = plan(config(place, overwrite=True))
    with RunFolder(p) as run:
        open(os.path.join(run.path, "new"), "w").close()
        run.publish()
    assert sorted(os.listdir(p.output)) == [RUN_FILE, "new"]
    assert sorted(os.listdir(place)) == ["data.jsonl", "model", "out"]


def test_a_failed_run_leaves_everything_as_it_was(place):
    make_run(place / "out", config(place), "a" * 32)
    before = tree_snapshot(place)
    with pytest.raises(RuntimeError, match="boom"):
        with RunFolder(plan(config(place, overwrite=True))) as run:
            open(os.path.join(run.path, DELTA_FILE), "w").write("half")
            raise RuntimeError("boom")
    assert_same_tree(before, tree_snapshot(place))


def test_an_interrupted_run_keeps_the_checkpoints_it_saved(place):
    p = plan(config(place))
    with pytest.raises(Interrupted) as err:
        with terminate_as_interrupt(), RunFolder(p) as run:
            make_checkpoint(run.path, 1, p.run_id, p.record)
            run.saved_steps.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(5)  # the signal arrives first
    assert "continue with --resume last" in "\n".join(err.value.__notes__)
    assert not os.path.exists(p.output)
    assert plan(config(place, resume="last")).resume.step == 1


def test_the_output_changed_during_the_run_is_not_replaced(place):
    p = plan(config(place))
    with pytest.raises(RunFolderError, match="created or changed while this run was training"):
        with RunFolder(p) as run:
            os.mkdir(p.output)
            open(os.path.join(p.output, "someone-elses"), "w").close()
            run.publish()
    assert os.listdir(p.output) == ["someone-elses"]
    assert os.path.exists(os.path.join(p.staging, RUN_FILE))  # the finished run is kept


def test_continuing_an_interrupted_run_trims_what_came_after_the_checkpoint(place):
    cfg = config(place)
    staging = make_run(place / ".out.gallop-staging", cfg, "b" * 32, steps=(2, 4), status="running")
    make_checkpoint(staging, 6, "b" * 32, rundir.run_options(cfg), seal=False)
    p = plan(config(place, resume=os.path.join(staging, "checkpoint-2"), overwrite=True))
    with RunFolder(p) as run:
        assert run.resume_from == os.path.join(staging, "checkpoint-2")
        assert sorted(os.listdir(staging)) == [".gallop-lock", "checkpoint-2", RUN_FILE, LOSS_LOG]
        assert [json.loads(line)["step"] for line in open(run.loss_log)] == [1, 2]
        run.publish()
    assert rundir.read_run_record(p.output)["resumed_from"]["step"] == 2


def test_continuing_a_finished_run_links_its_checkpoints_and_log(place):
    out = make_run(place / "out", config(place), "c" * 32, steps=(1, 2, 3))
    p = plan(config(place, resume=os.path.join(out, "checkpoint-2"), overwrite=True))
    with RunFolder(p) as run:
        assert run.resume_from == os.path.join(run.path, "checkpoint-2")  # the linked copy survives publishing
        assert sorted(n for n in os.listdir(run.path) if n.startswith("checkpoint")) == ["checkpoint-1",
                                                                                          "checkpoint-2"]
        assert os.stat(os.path.join(run.path, "checkpoint-2", "optimizer.pt")).st_nlink == 2
        assert [json.loads(line)["step"] for line in open(run.loss_log)] == [1, 2]
        read_checkpoint(run.resume_from)
        run.publish()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]


def test_a_failed_continuation_of_a_finished_run_removes_its_links(place):
    out = make_run(place / "out", config(place), "c" * 32, steps=(1, 2))
    before = tree_snapshot(place)
    with pytest.raises(ValueError):
        with RunFolder(plan(config(place, resume=os.path.join(out, "checkpoint-2"), overwrite=True))):
            raise ValueError("the model did not load")
    assert_same_tree(before, tree_snapshot(place))


def test_planted_links_in_a_staging_folder_are_refused_not_followed(place, tmp_path):
    cfg = config(place)
    staging = make_run(place / ".out.gallop-staging", cfg, "b" * 32, steps=(1,), status="running")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.unlink(os.path.join(staging, LOSS_LOG))
    os.symlink(victim, os.path.join(staging, LOSS_LOG))
    refused(place, config(place, resume="last"), "symbolic link")
    assert victim.read_text() == "precious" and os.path.islink(os.path.join(staging, LOSS_LOG))
    # a fresh run discards the leftover (with --overwrite, as it has a checkpoint): the link goes, not its target
    with RunFolder(plan(config(place, overwrite=True))) as run:
        run.publish()
    assert victim.read_text() == "precious" and not os.path.exists(staging)


def test_the_trainer_callback_seals_and_clears_checkpoints(place):
    from types import SimpleNamespace

    p = plan(config(place))
    with RunFolder(p) as run:
        callback = run.callback()
        args = SimpleNamespace(output_dir=run.path)
        state = SimpleNamespace(global_step=1, is_world_process_zero=True)
        control = SimpleNamespace(should_save=True)
        make_checkpoint(run.path, 1, p.run_id, p.record, seal=False)  # what the Trainer wrote
        callback.on_save(args, state, control)
        assert read_checkpoint(os.path.join(run.path, "checkpoint-1")).run_id == p.run_id
        assert run.saved_steps == [1]
        callback.on_step_end(args, state, control)  # the same step is about to be saved again
        assert not os.path.exists(os.path.join(run.path, "checkpoint-1"))


def test_a_resumed_run_without_selection_stops_before_training(place):
    from types import SimpleNamespace

    out = make_run(place / "out", config(place), "c" * 32, steps=(1,))
    with RunFolder(plan(config(place, resume=os.path.join(out, "checkpoint-1"), overwrite=True))) as run:
        fresh = SparseAdamW([torch.nn.Parameter(torch.ones(4))], density=0.5)
        with pytest.raises(RuntimeError, match="no selection after loading it"):
            run.callback().on_train_begin(SimpleNamespace(), SimpleNamespace(), SimpleNamespace(), optimizer=fresh)
        loaded = SparseAdamW([torch.nn.Parameter(torch.ones(8))], lr=0.1, density=0.25)
        loaded.load_state_dict(optimizer_state())
        run.callback().on_train_begin(SimpleNamespace(), SimpleNamespace(), SimpleNamespace(), optimizer=loaded)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_user_input_marks_the_users_errors():
    class DataError(ValueError):
        pass

    with pytest.raises(DataError, match="line 3") as err:  # the type callers catch stays
        with user_input():
            raise DataError("line 3")
    assert is_user_error(err.value)
    with pytest.raises(FileNotFoundError) as err:
        with user_input():
            open("/nowhere")
    assert is_user_error(err.value) and describe(err.value) == "/nowhere: No such file or directory"
    with pytest.raises(RuntimeError) as err:
        with user_input():
            raise RuntimeError("bug")
    assert not is_user_error(err.value) and is_user_error(UserError("x"))
    assert not is_user_error(ValueError("raised outside: a bug"))
    assert describe(KeyError("k")) == "k"


def test_signals_are_held_until_the_renames_are_done():
    done = []
    with pytest.raises(Interrupted):
        with terminate_as_interrupt(), signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(0.2)  # not raised here
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handler is back


# ---------------------------------------------------------------------------------------------
# SIGKILL while a run's staging folder appears or while it is published (issue 17, case 7)
# ---------------------------------------------------------------------------------------------

KILLED_CHILD = r"""
import os, pathlib, signal, sys
sys.path.insert(0, sys.argv[3])
import test_rundir as T
from gallop_kernels.finetune import rundir
from gallop_kernels.finetune.rundir import files, folder

place, point = pathlib.Path(sys.argv[1]), sys.argv[2]
os.chdir(place.parent / "cwd")
plan = T.plan(T.config(place, overwrite=True))


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def after(real, calls=1):
    count = {"n": 0}
    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            die()
        return real(*args, **kwargs)
    return wrapper


if point == "creating the staging folder":
    folder.RunFolder._write_record = die
with rundir.RunFolder(plan) as run:
    T.make_checkpoint(run.path, 1, plan.run_id, plan.record)
    (pathlib.Path(run.path) / "result.txt").write_text("new")
    if point == "before the swap":
        folder.exchange = die
    elif point == "after the swap":
        folder.exchange = after(folder.exchange, calls=1)
        folder.os.rename = after(os.rename, calls=0)
    elif point == "between the two renames (no RENAME_EXCHANGE)":
        folder.exchange = lambda a, b: False
        folder.os.rename = after(os.rename, calls=1)
    elif point == "after the replaced run was set aside":
        folder.remove_run_tree = die
    elif point == "while deleting the replaced run":
        files.remove_tree = after(files.remove_tree, calls=2)
    run.publish()
"""

KILL_STATES = {  # what is left ({leftover: holds the old run}, output holds the old run)
    "creating the staging folder": ({".out.gallop-staging.tmp-X": None}, True),  # (locked, no record yet)
    "before the swap": ({".out.gallop-staging": False}, True),
    "after the swap": ({".out.gallop-staging": True}, False),
    "between the two renames (no RENAME_EXCHANGE)": ({".out.gallop-staging": False, ".out.gallop-staging.old-X": True},
                                                     False),
    "after the replaced run was set aside": ({".out.gallop-staging.old-X": True}, False),
    "while deleting the replaced run": ({".out.gallop-staging.old-X": True}, False),
}


def finish(place) -> list[str]:
    return rundir.finish_interrupted_publish(str(place / "out"), (DELTA_FILE, SUMMARY_FILE, LOSS_LOG))


KILL_POINTS = ["creating the staging folder", "before the swap", "after the swap",
               "between the two renames (no RENAME_EXCHANGE)", "after the replaced run was set aside",
               "while deleting the replaced run"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_publish_killed_at_any_point_is_finished_by_the_next_run(place, point):
    """SIGKILL at each point of creating and publishing a run over a finished one: before the next
    run looks at anything, `finish_interrupted_publish` leaves either the old run (killed before
    the new one was complete) or the new one, nothing else; `--resume last --overwrite` never
    continues the replaced run, not even in between."""
    import subprocess
    import sys

    make_run(place / "out", config(place), "a" * 32)
    old_record = (place / "out" / RUN_FILE).read_bytes()
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(place), point, tests], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = {re.sub(r"-[0-9a-f]{8}$", "-X", n): (rundir.read_run_record(str(place / n))["run_id"] == "a" * 32
                                                 if os.path.exists(place / n / RUN_FILE) else None)
            for n in os.listdir(place) if n.startswith(".out")}
    out_is_old = os.path.exists(place / "out") and rundir.read_run_record(str(place / "out"))["run_id"] == "a" * 32
    assert (left, out_is_old) == KILL_STATES[point]  # the kill happened where it says
    try:  # in between: a plan may refuse, or continue the new run; never the replaced one
        between = plan(config(place, resume="last", overwrite=True))
        assert between.run_id != "a" * 32 or point == "creating the staging folder"  # (nothing replaced yet)
    except RunFolderError as e:
        assert "finished but not yet published" in str(e), e
    notes = finish(place)
    assert sorted(os.listdir(place)) == ["data.jsonl", "model", "out"], notes
    record = rundir.read_run_record(str(place / "out"))
    if point == "creating the staging folder":
        assert (place / "out" / RUN_FILE).read_bytes() == old_record  # the finished run, untouched
        return
    assert record["run_id"] != "a" * 32 and record["status"] == "complete" and record["replaces"] == "a" * 32
    assert (place / "out" / "result.txt").read_text() == "new"
    assert sorted(os.listdir(place / "out")) == sorted(record["files"])
    p = plan(config(place, resume="last", overwrite=True))
    assert p.run_id == record["run_id"] and p.resume.step == 1
    assert finish(place) == []  # nothing left to do


def test_a_complete_run_in_the_staging_folder_is_never_continued(place):
    """A staging folder whose run is complete (publishing cut short) is refused by the plan and,
    when it fits neither the output nor what the output replaced, by the recovery too."""
    make_run(place / "out", config(place), "a" * 32)
    make_run(place / ".out.gallop-staging", config(place), "b" * 32, status="complete")
    refused(place, config(place, resume="last", overwrite=True), "finished but not yet published")
    before = tree_snapshot(place)
    with pytest.raises(RunFolderError, match="finished but not published, and .* is not the run it was to replace"):
        finish(place)
    assert_same_tree(before, tree_snapshot(place))


def test_leftovers_without_a_run_record_are_left_alone(place):
    trash = place / ".out.gallop-staging.old-1234abcd"
    trash.mkdir()
    (trash / "notes.txt").write_text("precious")
    notes = finish(place)
    assert (trash / "notes.txt").read_text() == "precious"
    assert any("no gallop run record" in n for n in notes)


STORAGE_CHILD = r"""
import errno, os, resource, sys
import torch
from gallop_kernels.finetune.rundir import storage_failure
folder = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    torch.save({"x": torch.zeros(100_000)}, os.path.join(folder, "optimizer.pt"))
except RuntimeError as error:  # torch.save loses the errno: "unexpected pos ..."
    failure = storage_failure(error, folder)
    print(errno.errorcode[failure.errno] if failure else "none", "|", error)
"""


def test_storage_failures_are_recognised_whatever_the_writer(tmp_path):
    """torch.save under a real file-size limit, safetensors' and Python's errors: all become one
    OSError with the errno; other errors are not storage failures."""
    import errno
    import subprocess
    import sys

    from safetensors import SafetensorError

    child = subprocess.run([sys.executable, "-c", STORAGE_CHILD, str(tmp_path)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                               os.path.abspath(__file__)))})
    assert child.stdout.startswith("EFBIG |"), child.stdout + child.stderr
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert rundir.storage_failure(full, str(tmp_path)).errno == errno.ENOSPC
    assert rundir.storage_failure(OSError(errno.EDQUOT, "quota"), str(tmp_path)).errno == errno.EDQUOT
    assert rundir.storage_failure(RuntimeError("a bug"), str(tmp_path)) is None
    assert rundir.storage_failure(OSError(errno.ENOENT, "gone"), str(tmp_path)) is None
