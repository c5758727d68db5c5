"""`gallop finetune`: data validation, clear errors before training, and one tiny end-to-end run."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch

pytest.importorskip("accelerate")

from gallop_kernels.finetune.cli import register  # noqa: E402
from gallop_kernels.finetune.data import DataError, load_jsonl, load_records, tokenize  # noqa: E402
from gallop_kernels.finetune.pipeline import (  # noqa: E402
    FinetuneConfig, NotAvailableYet, prepare, run_finetune,
)
from gallop_kernels.finetune.tiny import byte_tokenizer, save_tiny_model  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["finetune", *argv])


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def good_data(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(14)] + [{"text": "hello world"}] * 2
    return write_jsonl(tmp_path / "good.jsonl", rows)


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "response": "b"},
        "{not json",
        "",
        {"prompt": "only a prompt"},
        "[1, 2]",
        {"text": ""},
        {"text": "x", "prompt": "y", "response": "z"},
        {"foo": 1},
        {"text": "fine"},
    ])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert "6 malformed line(s) of 9" in msg
    for n, why in [(2, "invalid JSON"), (4, "missing 'response'"), (5, "expected a JSON object"), (6, "'text' must be a non-empty"),
                   (7, "has both"), (8, "needs 'text'")]:
        assert f"line {n}: {why}" in msg, (n, msg)
    assert "line 1:" not in msg and "line 3:" not in msg and "line 9:" not in msg


def test_data_sources(tmp_path, good_data):
    records = load_jsonl(good_data)
    assert len(records) == 16 and records[0].prompt == "0+1=" and records[-1].prompt is None
    with pytest.raises(FileNotFoundError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_jsonl(tmp_path / "latin1.jsonl")
    # labels cover the response (and EOS) only
    tok = byte_tokenizer()
    ex = tokenize(records[:1], tok, max_length=64)[0]
    n_prompt = len(tok("0+1=")["input_ids"])
    assert (ex["labels"][:n_prompt] == -100).all()
    assert ex["labels"][n_prompt:].tolist() == tok("1")["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("argv, error, match", [
    (["--density", "0"], ValueError, "density"),
    (["--density", "1.5"], ValueError, "density"),
    (["--score", "fisher"], ValueError, "unknown --score"),
    (["--calibration-fraction", "0"], ValueError, "calibration-fraction"),
    (["--epochs", "0"], ValueError, "epochs"),
    (["--lr", "-1"], ValueError, "lr"),
    (["--bits", "8"], ValueError, "must be 4"),
    (["--bits", "4", "--lean"], ValueError, "redundant"),
    (["--bits", "4", "--save-full"], ValueError, "save-full"),
    (["--bits", "4", "--resume", "last"], NotAvailableYet, "not supported with --bits 4 yet"),
    (["--bits", "4", "--save-steps", "2"], NotAvailableYet, "not supported with --bits 4 yet"),
    (["--bits", "4", "--train-norms"], ValueError, "linear layers only"),
])
def test_bad_options_fail_before_anything_loads(tmp_path, good_data, argv, error, match):
    from gallop_kernels.finetune.cli import config_from_args

    args = parse(["--model", str(tmp_path / "no-model"), "--data", good_data, "--output", str(tmp_path / "o"), *argv])
    with pytest.raises(error, match=match):
        prepare(config_from_args(args))


def test_cli_reports_errors_and_trains_nothing(tmp_path, good_data, capsys):
    out = tmp_path / "out"
    args = parse(["--model", str(tmp_path / "nowhere"), "--data", good_data, "--output", str(out)])
    assert args.func(args) == 2
    assert "model path not found" in capsys.readouterr().err
    model_dir = tmp_path / "empty-model"
    model_dir.mkdir()
    args = parse(["--model", str(model_dir), "--data", good_data, "--output", str(out)])
    assert args.func(args) == 2 and "config.json" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, "oops"])
    args = parse(["--model", str(model_dir), "--data", bad, "--output", str(out)])
    assert args.func(args) == 2
    assert "config.json" in capsys.readouterr().err  # the model is checked before the data
    with open(model_dir / "config.json", "w") as f:
        f.write("{}")
    args = parse(["--model", str(model_dir), "--data", bad, "--output", str(out)])
    assert args.func(args) == 2 and "line 2: invalid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_end_to_end_tiny_finetune_saves_a_delta_that_rebuilds_the_model(tmp_path, good_data, capsys):
    from transformers import AutoModelForCausalLM

    from gallop_kernels.delta import apply_delta, load_delta

    model_dir = save_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, max_positions=32)
    out = tmp_path / "out"
    args = parse(["--model", model_dir, "--data", good_data, "--output", str(out), "--density", "0.05",
                  "--lr", "1e-2", "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
                  "--calibration-fraction", "0.25", "--save-full", "--no-progress", "--max-length", "32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "selection (from the mean gradient of 4 calibration example(s))" in printed
    assert "self_attn.q_proj.weight" in printed and "wrote" in printed

    log = [json.loads(line) for line in open(out / "loss_log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    summary = json.load(open(out / "selection.json"))
    delta = load_delta(out / "gallop_delta.safetensors")
    assert delta.num_entries == sum(r["selected"] for r in summary.values())
    assert delta.metadata["base_model"] == model_dir and delta.metadata["score"] == "gallop"

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), tuned.parameters()))
    apply_delta(base, delta)
    for (n, p), q in zip(base.named_parameters(), tuned.parameters()):
        assert torch.equal(p, q), n


def test_datasets_names_are_guarded():
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed; loading a name would need the network")
    with pytest.raises(DataError, match="pip install datasets"):
        load_records("someone/some-dataset")


def test_lean_finetune_trains_the_same_weights(tmp_path, good_data):
    """--lean changes memory, not the result (fp32 tiny model, clipping off in both runs)."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, max_positions=32)
    tuned = []
    for lean in (False, True):
        out = tmp_path / f"out-{lean}"
        config = FinetuneConfig(model=model_dir, data=good_data, output=str(out), density=0.05, lr=1e-2,
                                max_steps=3, batch_size=4, calibration_fraction=0.25, save_full=True,
                                progress=False, max_length=32, lean=lean, max_grad_norm=0.0)
        run_finetune(config, out=io.StringIO())
        tuned.append(AutoModelForCausalLM.from_pretrained(out / "model"))
    for p, q in zip(*(m.parameters() for m in tuned)):
        assert torch.equal(p, q)


def test_4bit_finetune_saves_a_delta_that_rebuilds_the_trained_model(tmp_path, good_data, capsys, monkeypatch):
    """--bits 4: NF4 base, select_sparse_delta, Trainer on the delta; the saved delta rebuilds the model."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gallop_kernels.delta import load_delta
    from gallop_kernels.integrations import bitsandbytes as bnb_delta

    model_dir = save_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, max_positions=32)
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
    args = parse(["--model", model_dir, "--data", good_data, "--output", str(out), "--bits", "4", "--density", "0.05",
                  "--lr", "1e-2", "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1",
                  "--calibration-fraction", "0.25", "--no-progress", "--max-length", "32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
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
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32,
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
