"""Attack suite for the ``gallop`` command line: bad arguments, planted links, files where folders
should be, failing writes and signals at several points of a run.

The rules (issue 11, `docs/design.md#run-folders`): every refused input exits 2 with one message
and no traceback, before any model is loaded, and the folder before equals the folder after
(`attack_support.tree_snapshot`); a failed or interrupted run leaves the previous run exactly as it
was, keeps only sealed checkpoints worth resuming, and ``--resume last`` continues it exactly.

One tiny run is trained once per module and copied where a case needs a finished run; signals are
sent in-process (real ``os.kill``, handled exactly as in a separate process) at chosen points, plus
one separate process interrupted with SIGINT. ``-m slow`` adds many more argument vectors and more
signal points in separate processes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("accelerate")

from attack_support import assert_same_tree, tree_snapshot  # noqa: E402
from gallop_kernels.cli import main  # noqa: E402
from gallop_kernels.finetune import pipeline, rundir  # noqa: E402
from gallop_kernels.finetune.rundir import MANIFEST, RUN_FILE  # noqa: E402
from gallop_kernels.finetune.tiny import save_tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=600, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def options(model: str, data: str, **changes: str) -> list[str]:
    """The argument vector of a 3-step tiny run that saves a checkpoint every step."""
    values = {"--model": model, "--data": data, "--density": "0.05", "--lr": "1e-2", "--batch-size": "4",
              "--logging-steps": "1", "--calibration-fraction": "0.25", "--max-length": "32",
              "--save-steps": "1", "--max-steps": "3"}
    values.update(changes)
    argv = ["finetune", "--no-progress"]
    for flag, value in values.items():
        argv += [flag] if value is None else [flag, value]
    return argv


def gallop(argv: list[str]) -> tuple[int, str, str]:
    """Run ``gallop`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """A tiny model, its data and one finished 3-step run with checkpoints 1..3."""
    root = tmp_path_factory.mktemp("trained")
    model = save_tiny_model(root / "tiny", hidden_size=32, num_layers=1, max_positions=32)
    data = root / "data.jsonl"
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(14)] + [{"text": "hello world"}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = str(root / "run")
    code, _, err = gallop(options(model, str(data), **{"--output": run}))
    assert code == 0, err
    return {"model": model, "data": str(data), "run": run}


def finished_run_in(folder, trained) -> str:
    """A copy of the trained run at ``folder/out``."""
    out = os.path.join(folder, "out")
    shutil.copytree(trained["run"], out, symlinks=True)
    return out


def delta_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, pipeline.DELTA_FILE))


def no_model_loads():
    return mock.patch.object(pipeline, "resolve_model",
                             side_effect=AssertionError("a model was loaded for a refused input"))


def assert_refused(code: int, err: str) -> None:
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# Refused inputs: exit 2, one message, nothing loaded, nothing changed
# ---------------------------------------------------------------------------------------------


def workspace(root, trained) -> dict[str, Any]:
    """A folder of traps: files where folders should be, a link, a foreign folder, a finished run,
    a locked staging folder, broken data and broken checkpoints."""
    w = str(root)
    j = lambda *p: os.path.join(w, *p)  # noqa: E731
    open(j("file.txt"), "w").write("not a folder")
    os.makedirs(j("foreign"))
    open(j("foreign", "notes.txt"), "w").write("someone's notes")
    os.symlink(j("foreign"), j("link-out"))
    os.makedirs(j("emptydir"))
    os.makedirs(j("config-only"))
    open(j("config-only", "config.json"), "w").write("{}")
    run = finished_run_in(w, trained)
    broken = shutil.copytree(run, j("broken"), symlinks=True)
    os.unlink(os.path.join(broken, "checkpoint-1", "optimizer.pt"))
    os.unlink(os.path.join(broken, "checkpoint-2", MANIFEST))
    with open(os.path.join(broken, "checkpoint-3", "optimizer.pt"), "ab") as f:
        f.write(b"\0")
    os.makedirs(j(".busy.gallop-staging"))
    lock = rundir.take_lock(j(".busy.gallop-staging"), create=True)
    rows = ['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}', '{"prompt": "x",']
    open(j("bad.jsonl"), "w").write("\n".join(rows) + "\n")
    open(j("latin1.jsonl"), "wb").write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    open(j("empty.jsonl"), "w").write("\n")
    bad_values = {
        "--density": ["0", "1.5", "nan", "inf", "-0.1", "abc", ""],
        "--lr": ["nan", "inf", "-1", "0", "x"],
        "--weight-decay": ["nan", "inf", "-inf", "-1", "x"],
        "--epochs": ["nan", "inf", "0", "-1"],
        "--calibration-fraction": ["nan", "0", "2", "-inf"],
        "--batch-size": ["0", "-1", "1.5", "x"],
        "--grad-accum": ["0", "-3"],
        "--max-length": ["0", "-1"],
        "--max-steps": ["0", "-2", "x"],
        "--save-steps": ["-1", "x", "1e9999"],
        "--logging-steps": ["0"],
        "--bits": ["8", "3", "x"],
        "--score": ["fisher", "", "GALLOP"],
        "--target-modules": [""],
        "--output": [j("file.txt"), j("missing", "out"), j("foreign"), j("link-out"), run, j("file.txt", "out"),
                     j("x.gallop-staging"), j("busy"), w, j("emptydir", "..")],
        "--data": [j("missing.jsonl"), j("bad.jsonl"), j("latin1.jsonl"), j("empty.jsonl"), w],
        "--model": [j("missing-model"), j("file.txt"), j("emptydir")],
        "--resume": [j("nowhere"), os.path.join(broken, "checkpoint-1"), os.path.join(broken, "checkpoint-2"),
                     os.path.join(broken, "checkpoint-3"), j("broken"), "last"],
    }
    combos = [["--bits", "4", "--lean"], ["--bits", "4", "--save-full"], ["--bits", "4", "--train-norms"],
              ["--bits", "4"], ["--bits", "4", "--resume", "last"], ["--no-such-option"], ["--density"]]
    return {"root": w, "lock": lock, "bad": bad_values, "combos": combos, "fresh": j("fresh")}


def refused_vector(draw: Callable, ws: dict[str, Any], trained: dict[str, str]) -> list[str]:
    """An argument vector with at least one bad value (several, often)."""
    flags = sorted(ws["bad"])
    chosen = draw(st.lists(st.sampled_from(flags), min_size=1, max_size=4, unique=True))
    changes = {"--output": ws["fresh"]}
    for flag in chosen:
        changes[flag] = draw(st.sampled_from(ws["bad"][flag]))
    argv = options(trained["model"], trained["data"], **changes)
    if draw(st.booleans()):
        argv += draw(st.sampled_from(ws["combos"]))
    return argv


def check_refused_vectors(data, ws, trained) -> None:
    argv = refused_vector(data.draw, ws, trained)
    before = tree_snapshot(ws["root"])
    with no_model_loads():
        code, _, err = gallop(argv)
    assert_refused(code, err)
    assert_same_tree(before, tree_snapshot(ws["root"]))


@pytest.fixture
def traps(tmp_path, trained):
    ws = workspace(tmp_path, trained)
    yield ws
    os.close(ws["lock"])


@FAST
@given(data=st.data())
def test_refused_argument_vectors_change_nothing(traps, trained, data):
    check_refused_vectors(data, traps, trained)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_refused_argument_vectors_change_nothing_many(traps, trained, data):
    check_refused_vectors(data, traps, trained)


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "inf", "--weight-decay: must be a finite number, got inf"),
    ("--lr", "nan", "--lr: must be a finite number"),
    ("--output", "file.txt", "exists and is not a folder"),
    ("--output", "missing/out", "parent folder .* does not exist"),
    ("--output", "link-out", "is a symbolic link"),
    ("--output", "out", r"holds a finished run \(run [0-9a-f]{32}\); a new run would replace it: pass --overwrite"),
    ("--output", "busy", "another gallop run .* is writing this output"),
    ("--data", "bad.jsonl", "line 3: invalid JSON"),
    ("--data", "latin1.jsonl", "UTF-8"),
    ("--model", "config-only", None),
    ("--resume", "broken/checkpoint-1", r"no optimizer state \(optimizer.pt\): resuming without it would select"),
    ("--resume", "broken/checkpoint-2", "incomplete: it has no gallop_checkpoint.json"),
    ("--resume", "broken/checkpoint-3", "changed or replaced"),
])
def test_each_refusal_says_what_to_do(traps, trained, flag, value, message):
    """The message names the real cause (one line for paths and options)."""
    if flag in ("--output", "--data", "--model", "--resume"):
        value = os.path.join(traps["root"], value)
    argv = options(trained["model"], trained["data"], **{"--output": traps["fresh"], flag: value})
    before = tree_snapshot(traps["root"])
    code, _, err = gallop(argv)
    assert_refused(code, err)
    if message is not None:
        assert any(re.search(message, line) for line in err.splitlines()), err
    assert_same_tree(before, tree_snapshot(traps["root"]))


def test_every_number_option_of_every_command_refuses_non_finite_values(tmp_path, monkeypatch):
    from gallop_kernels.cli import build_parser

    monkeypatch.chdir(tmp_path)
    commands = build_parser()._subparsers._group_actions[0].choices
    checked = 0
    for name, sub in commands.items():
        for action in sub._actions:
            if action.type is not float:
                continue
            for value in ("inf", "-inf", "nan"):
                code, _, err = gallop([name, f"{action.option_strings[-1]}={value}"])
                assert_refused(code, err)
                assert f"{action.option_strings[-1]}: must be a finite number" in err, err
                checked += 1
    assert checked >= 3 * 8  # finetune's and the demo's float options at least
    assert os.listdir(tmp_path) == []


def test_a_refusal_after_the_model_loaded_changes_nothing(tmp_path, trained):
    """Target modules are known only once the model is loaded: still exit 2, still no change, and
    the finished run's loss log survives."""
    out = finished_run_in(tmp_path, trained)
    before = tree_snapshot(tmp_path)
    code, _, err = gallop(options(trained["model"], trained["data"], **{
        "--output": out, "--overwrite": None, "--target-modules": "no_such_proj"}))
    assert_refused(code, err)
    assert "no_such_proj" in err
    assert_same_tree(before, tree_snapshot(tmp_path))


@pytest.mark.parametrize("setup, message", [
    (lambda w: open(os.path.join(w, "res"), "w").close(), "exists and is not a folder"),
    (lambda w: open(os.path.join(w, "f"), "w").close() or "f/res", "is not a folder"),
    (lambda w: os.makedirs(os.path.join(w, "res")) or os.symlink("/etc/hostname", os.path.join(w, "res", "table.md")),
     "table.md is a symbolic link"),
])
def test_reproduce_checks_its_output_before_running(tmp_path, setup, message):
    where = setup(str(tmp_path)) or "res"
    before = tree_snapshot(tmp_path)
    with mock.patch("gallop_kernels.reproduce.runner.run_reproduction",
                    side_effect=AssertionError("the reproduction ran")):
        code, _, err = gallop(["reproduce", "--smoke", "--output", os.path.join(tmp_path, where)])
    assert_refused(code, err)
    assert message in err
    assert_same_tree(before, tree_snapshot(tmp_path))


def test_internal_errors_keep_their_traceback(tmp_path, trained):
    out = finished_run_in(tmp_path, trained)
    before = tree_snapshot(tmp_path)
    with mock.patch("transformers.Trainer.train", side_effect=RuntimeError("a bug")):
        with pytest.raises(RuntimeError, match="a bug"):
            main(options(trained["model"], trained["data"], **{"--output": out, "--overwrite": None}))
    assert_same_tree(before, tree_snapshot(tmp_path))


# ---------------------------------------------------------------------------------------------
# Faults during a run: signals at several points, failing writes
# ---------------------------------------------------------------------------------------------


def fault_at(target: Any, name: str, fault: Callable[[], None], call: int = 1):
    """Patch ``target.name`` so that its ``call``-th call first runs ``fault`` (a signal to this
    process, or an exception)."""
    original = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            fault()
        return original(*args, **kwargs)

    return mock.patch.object(target, name, wrapper)


def kill(sig: int) -> Callable[[], None]:
    def send() -> None:
        os.kill(os.getpid(), sig)
        for _ in range(50):  # the handler raises within this (unless the signal is being held)
            time.sleep(0.01)
    return send


@pytest.fixture(autouse=True)
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here, even when pytest was started with it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def no_space() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "gallop_delta.safetensors")


def _points():
    from transformers import Trainer

    from gallop_kernels import SparseAdamW
    from gallop_kernels.adapter import folder as adapter_folder

    return {
        "loading the model": (pipeline, "load_model", kill(signal.SIGINT), 1, 130, []),
        "the second step": (SparseAdamW, "step", kill(signal.SIGTERM), 2, 143, [1]),
        "writing checkpoint 2": (Trainer, "_save_rng_state", kill(signal.SIGINT), 2, 130, [1]),
        "sealing checkpoint 1": (rundir.folder, "seal_checkpoint", kill(signal.SIGTERM), 1, 143, []),
        "a full disk": (adapter_folder, "save_delta", no_space, 1, 1, [1, 2, 3]),
    }


POINTS = ["loading the model", "the second step", "writing checkpoint 2", "sealing checkpoint 1", "a full disk"]


@pytest.mark.parametrize("point", POINTS)
def test_a_failed_or_interrupted_run_leaves_the_finished_run_intact(tmp_path, trained, point):
    target, name, fault, call, status, sealed = _points()[point]
    out = finished_run_in(tmp_path, trained)
    before = tree_snapshot(out)
    with fault_at(target, name, fault, call):
        code, _, err = gallop(options(trained["model"], trained["data"], **{"--output": out, "--overwrite": None}))
    assert code == status, err
    assert "Traceback" not in err and f"{out} is as it was" in err
    assert_same_tree(before, tree_snapshot(out))
    staging = rundir.staging_path(out)
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + ([os.path.basename(staging)] if sealed else []))
    if sealed:
        assert "continue with --resume last" in err
        found, _ = rundir.sealed_checkpoints(staging, None)
        assert [ck.step for ck in found] == sorted(sealed, reverse=True)


def test_an_interrupted_run_resumes_exactly_and_alone(tmp_path, trained):
    """Interrupted while writing checkpoint 2, with a checkpoint of an earlier, different run
    planted in its staging folder: ``--resume last`` takes checkpoint 1 of this run, drops the
    rest, and finishes with exactly the delta of the uninterrupted run."""
    from transformers import Trainer

    out = finished_run_in(tmp_path, trained)
    argv = options(trained["model"], trained["data"], **{"--output": out})
    with fault_at(Trainer, "_save_rng_state", kill(signal.SIGINT), 2):
        assert gallop(argv + ["--overwrite"])[0] == 130
    staging = rundir.staging_path(out)
    interrupted = rundir.read_run_record(staging)["run_id"]
    shutil.copytree(os.path.join(trained["run"], "checkpoint-3"), os.path.join(staging, "checkpoint-3"))
    code, _, err = gallop(argv + ["--resume", "last"])  # (no --overwrite needed to continue)
    assert code == 0, err
    assert "checkpoint-3: it belongs to another run" in err and "checkpoint-2 is incomplete" in err
    record = rundir.read_run_record(out)
    assert record["run_id"] == interrupted and record["resumed_from"]["step"] == 1
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2",
                                                                              "checkpoint-3"]
    log = [json.loads(line) for line in open(os.path.join(out, pipeline.LOSS_LOG))]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    expected, got = delta_tensors(trained["run"]), delta_tensors(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not os.path.exists(staging)


def test_an_interrupt_while_publishing_waits_for_the_rename(tmp_path, trained):
    """SIGINT during the publishing renames is held until they are done: the output is the whole
    new run, the old one is gone, nothing else is left."""
    out = finished_run_in(tmp_path, trained)
    old_id = rundir.read_run_record(out)["run_id"]
    with fault_at(rundir.folder, "exchange", kill(signal.SIGINT)):
        code, _, err = gallop(options(trained["model"], trained["data"], **{"--output": out, "--overwrite": None}))
    assert code == 130 and "published" in err, err
    assert os.listdir(tmp_path) == ["out"]
    record = rundir.read_run_record(out)
    assert record["status"] == "complete" and record["run_id"] != old_id
    for step in (1, 2, 3):
        rundir.read_checkpoint(os.path.join(out, f"checkpoint-{step}"))


def test_planted_links_are_never_written_through(tmp_path, trained):
    """Links planted in the output and in an interrupted run's staging folder: the run refuses to
    continue through them, and a replacing run removes the links, not their targets."""
    out = finished_run_in(tmp_path, trained)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (pipeline.LOSS_LOG, pipeline.SELECTION_FILE, pipeline.DELTA_FILE):
        os.unlink(os.path.join(out, name))
        os.symlink(victim, os.path.join(out, name))
    staging = rundir.staging_path(out)
    shutil.copytree(out, staging, symlinks=True)
    record = rundir.read_run_record(staging)
    rundir.write_json_atomic(os.path.join(staging, RUN_FILE), {**record, "status": "running"})  # interrupted
    argv = options(trained["model"], trained["data"], **{"--output": out})
    before = tree_snapshot(tmp_path)
    code, _, err = gallop(argv + ["--resume", "last"])
    assert_refused(code, err)
    assert "symbolic link" in err
    assert_same_tree(before, tree_snapshot(tmp_path))
    code, _, err = gallop(argv + ["--overwrite"])
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not any(os.path.islink(os.path.join(out, n)) for n in os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["out", "victim.txt"]
    # the saved config replays the run, not its --overwrite: replaying it is refused
    saved = os.path.join(out, "finetune_config.json")
    assert json.load(open(saved))["overwrite"] is False
    before = tree_snapshot(tmp_path)
    code, _, err = gallop(["finetune", "--config", saved, "--no-progress"])
    assert_refused(code, err)
    assert "holds a finished run" in err
    assert_same_tree(before, tree_snapshot(tmp_path))


# ---------------------------------------------------------------------------------------------
# A separate process, interrupted for real
# ---------------------------------------------------------------------------------------------


def interrupt_process(tmp_path, trained, sig: int, wait_for: Callable[[str], str]) -> tuple[int, str, str]:
    """Start ``gallop finetune`` over a finished run, send ``sig`` once ``wait_for(staging)``
    exists; returns (status, stderr, output folder)."""
    out = finished_run_in(tmp_path, trained)
    before = tree_snapshot(out)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    argv = options(trained["model"], trained["data"], **{"--output": out, "--overwrite": None, "--max-steps": "400"})
    proc = subprocess.Popen([sys.executable, "-m", "gallop_kernels", *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marker = wait_for(rundir.staging_path(out))
    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert_same_tree(before, tree_snapshot(out))
    return proc.returncode, err, out


def test_sigint_in_a_separate_process_keeps_the_finished_run(tmp_path, trained):
    code, err, out = interrupt_process(tmp_path, trained, signal.SIGINT,
                                       lambda s: os.path.join(s, "checkpoint-2", MANIFEST))
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    staging = rundir.staging_path(out)
    found, _ = rundir.sealed_checkpoints(staging, rundir.read_run_record(staging)["run_id"])
    assert found and found[-1].step == 1  # every sealed checkpoint reads back; the newest may be later
    for _, path in rundir.checkpoint_folders(staging):
        if path not in {ck.path for ck in found}:
            with pytest.raises(rundir.CheckpointError, match="incomplete"):
                rundir.read_checkpoint(path)


@pytest.mark.slow
@pytest.mark.parametrize("sig, marker", [
    (signal.SIGTERM, lambda s: os.path.join(s, "checkpoint-1", MANIFEST)),
    (signal.SIGINT, lambda s: os.path.join(s, RUN_FILE)),  # as soon as the staging folder exists
    (signal.SIGTERM, lambda s: os.path.join(s, "checkpoint-3", "optimizer.pt")),  # mid-save
])
def test_signals_in_a_separate_process(tmp_path, trained, sig, marker):
    code, err, out = interrupt_process(tmp_path, trained, sig, marker)
    assert code == 128 + sig and "Traceback" not in err, err
    staging = rundir.staging_path(out)
    if os.path.exists(staging):
        found, _ = rundir.sealed_checkpoints(staging, rundir.read_run_record(staging)["run_id"])
        assert found, "a staging folder is kept only for a sealed checkpoint"


# ---------------------------------------------------------------------------------------------
# A full disk or a file-size limit while a checkpoint is saved (issue 17, case 7)
# ---------------------------------------------------------------------------------------------

FSIZE_CHILD = ("import resource, sys; limit = int(sys.argv[1]); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
               "from gallop_kernels.cli import main; sys.exit(main(sys.argv[2:]))")


def test_a_file_size_limit_while_saving_a_checkpoint_is_one_message(tmp_path, trained):
    """A real RLIMIT_FSIZE below the checkpoint's weights file: safetensors fails with its own
    error type; gallop says it in one line (exit 1), removes the partial checkpoint and leaves
    the finished run in the output byte for byte as it was."""
    out = finished_run_in(tmp_path, trained)
    before = tree_snapshot(out)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    argv = options(trained["model"], trained["data"], **{"--output": out, "--overwrite": None})
    first = os.path.join(out, "checkpoint-1")
    sizes = {name: os.path.getsize(os.path.join(first, name)) for name in os.listdir(first)}
    limit = sizes["model.safetensors"] - 1
    assert sorted(sizes.values())[-2] < limit  # only the weights file reaches the limit
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(limit), *argv], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr, proc.stderr
    assert re.search(r"error: cannot save checkpoint .*checkpoint-1: File too large", proc.stderr), proc.stderr
    assert f"{out} is as it was" in proc.stderr
    assert_same_tree(before, tree_snapshot(out))
    assert os.listdir(tmp_path) == ["out"]


def test_a_full_disk_at_a_later_checkpoint_keeps_the_earlier_ones_for_resume(tmp_path, trained):
    """ENOSPC (as safetensors reports it) while checkpoint 2 is written: one message, exit 1;
    checkpoint 1 stays sealed and `--resume last` finishes with exactly the uninterrupted delta."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def full() -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = finished_run_in(tmp_path, trained)
    argv = options(trained["model"], trained["data"], **{"--output": out})
    with fault_at(modeling_utils, "safe_save_file", full, call=2):
        code, _, err = gallop(argv + ["--overwrite"])
    assert code == 1 and "Traceback" not in err, err
    assert "cannot save checkpoint" in err and "No space left on device" in err and "--resume last" in err, err
    staging = rundir.staging_path(out)
    assert [ck.step for ck in rundir.sealed_checkpoints(staging, None)[0]] == [1]
    assert not os.path.exists(os.path.join(staging, "checkpoint-2"))  # the partial one is gone
    code, _, err = gallop(argv + ["--resume", "last"])
    assert code == 0, err
    expected, got = delta_tensors(trained["run"]), delta_tensors(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


# ---------------------------------------------------------------------------------------------
# Issue 17, cases 1 and 8 through the command
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("contents", ["trainer-output", "summary-file"])
def test_overwrite_never_replaces_a_folder_that_only_looks_like_a_run(tmp_path, trained, contents, overwrite):
    """A Hugging Face Trainer output (checkpoint-500/) or any folder with a finetune_summary.json,
    plus the user's notes: refused with and without --overwrite (exit 2, the files named), and
    every byte stays where it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("precious notes")
    if contents == "trainer-output":
        shutil.copytree(os.path.join(trained["run"], "checkpoint-3"), out / "checkpoint-500")
    else:
        (out / "finetune_summary.json").write_text('{"steps": 3}')
    before = tree_snapshot(tmp_path)
    with no_model_loads():
        code, _, err = gallop(options(trained["model"], trained["data"], **{"--output": str(out)})
                              + (["--overwrite"] if overwrite else []))
    assert_refused(code, err)
    assert "is not a gallop run folder" in err and "my_notes.txt" in err, err
    assert_same_tree(before, tree_snapshot(tmp_path))


def _reseal(path: str) -> None:
    with open(os.path.join(path, MANIFEST)) as f:
        rundir.seal_checkpoint(path, json.load(f))


@pytest.mark.parametrize("edit", ["emptied", "renamed"])
def test_resume_refuses_weights_that_do_not_cover_the_trained_tensors(tmp_path, trained, edit):
    """The newest checkpoint's weights file emptied (or its tensors renamed), the manifest re-sealed:
    `--resume last` refuses (exit 2) instead of training on from the base behind a warning; the
    output is unchanged. An emptied file is refused before the model loads."""
    from safetensors.torch import load_file, save_file

    out = finished_run_in(tmp_path, trained)
    ck = os.path.join(out, "checkpoint-3")
    weights = os.path.join(ck, "model.safetensors")
    tensors = load_file(weights)
    save_file({} if edit == "emptied" else {f"x.{k}": v for k, v in tensors.items()}, weights)
    _reseal(ck)
    before = tree_snapshot(tmp_path)
    with (no_model_loads() if edit == "emptied" else contextlib.nullcontext()):
        code, _, err = gallop(options(trained["model"], trained["data"], **{"--output": out})
                              + ["--resume", "last", "--overwrite"])
    assert_refused(code, err)
    assert ("fewer than the" if edit == "emptied" else "lack") in err and "restart them from the base" in err, err
    assert_same_tree(before, tree_snapshot(tmp_path))
