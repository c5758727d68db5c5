"""`gallop finetune` options: one table for flags and config-file keys, defaults in --help, flags
over the file, the resolved config read back, and every bad option refused before anything loads."""

from __future__ import annotations

import argparse
import json

import pytest

from gallop_kernels.finetune.cli import config_from_args, register
from gallop_kernels.finetune.config import (
    DEFAULTS,
    OPTIONS,
    FinetuneConfig,
    NotAvailableYet,
    check_options,
    read_config_file,
)
from gallop_kernels.finetune.data import DataSource, parse_sources


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gallop")
    register(p.add_subparsers(dest="command", required=True))
    return p


def parse(argv):
    return parser().parse_args(["finetune", *argv])


def finetune_help() -> str:
    sub = parser()._subparsers._group_actions[0].choices["finetune"]
    return " ".join(sub.format_help().split())


def test_help_shows_every_default():
    text = finetune_help()
    text = text[text.index("options:"):]  # past the usage line
    for flag, default in [("--density", "0.01"), ("--lr", "0.0001"), ("--epochs", "1.0"), ("--batch-size", "8"),
                          ("--max-length", "512"), ("--calibration-fraction", "0.05"), ("--lr-scheduler", "linear"),
                          ("--chat-template", "auto"), ("--model", "the embedded SmolLM2-135M-Instruct")]:
        start = text.index(flag + " ")
        assert text[start:].split(" --")[0].endswith(f"(default: {default})"), flag
    assert text.count("(default:") == len(OPTIONS)
    assert "issue" not in text.lower()


def test_flags_and_config_keys_are_the_same_options():
    fields = set(FinetuneConfig.__dataclass_fields__)
    assert {o.name for o in OPTIONS} == fields
    args = parse(["--data", "a.jsonl"])
    assert config_from_args(args) == FinetuneConfig(data=["a.jsonl"])  # only given flags: the rest default
    assert DEFAULTS.model is None  # the embedded model


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: [a.jsonl:0.7, b.jsonl:0.3]\n"
                   "lr: 1e-4\n"                        # YAML 1.1 reads this as text: coerced to a float
                   "max-steps: 20\n"                   # the flag's spelling works too
                   "target_modules: q_proj,v_proj\n"
                   "report_to: none\n"
                   "lean: true\n")
    config = config_from_args(parse(["--config", str(cfg), "--lr", "3e-4", "--no-lean", "--data", "c.jsonl"]))
    assert config.lr == 3e-4 and config.max_steps == 20 and config.lean is False
    assert config.data == ["c.jsonl"]  # a repeated flag replaces the file's list
    assert config.target_modules == ["q_proj", "v_proj"]
    from_file = FinetuneConfig.from_file(cfg)
    assert from_file.lr == 1e-4 and from_file.lean is True
    assert parse_sources(from_file.data) == [DataSource("a.jsonl", 0.7), DataSource("b.jsonl", 0.3)]
    assert FinetuneConfig.from_file(cfg, lr=5e-5).lr == 5e-5


def test_the_saved_config_reads_back_to_the_same_run(tmp_path):
    config = FinetuneConfig(data=["a.jsonl:0.7", "b.jsonl:0.3"], eval_data="e.jsonl", lr=2e-4,
                            target_modules=["q_proj"], report_to="none", bits=None, seed=5)
    config.save(tmp_path / "finetune_config.json")
    saved = json.loads((tmp_path / "finetune_config.json").read_text())
    assert saved["data"] == [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}]
    assert set(saved) == set(FinetuneConfig.__dataclass_fields__)
    back = FinetuneConfig.from_file(tmp_path / "finetune_config.json")
    assert back.to_dict() == config.to_dict()


@pytest.mark.parametrize("text, match", [
    ("lerning_rate: 1\n", "unknown key 'lerning_rate'"),
    ("lr: fast\n", "lr: cannot read 'fast'"),
    ("lean: yes please\n", "lean must be true or false"),
    ("- a\n- b\n", "mapping"),
    ("data: [a\n", "not valid YAML"),
])
def test_bad_config_files_are_refused(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_config_file(path)


def test_unknown_keys_get_a_suggestion(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_step": 3}))
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        read_config_file(path)
    with pytest.raises(FileNotFoundError):
        read_config_file(tmp_path / "none.yaml")
    ok = tmp_path / "ok.json"
    ok.write_text("{}")
    with pytest.raises(ValueError, match="unknown argument 'leraning'"):
        FinetuneConfig.from_file(ok, leraning=1)


@pytest.mark.parametrize("argv, error, match", [
    (["--density", "0"], ValueError, "density"),
    (["--density", "1.5"], ValueError, "density"),
    (["--calibration-fraction", "0"], ValueError, "calibration-fraction"),
    (["--epochs", "0"], ValueError, "epochs"),
    (["--lr", "-1"], ValueError, "lr"),
    (["--max-steps", "0"], ValueError, "max-steps"),
    (["--bits", "8"], ValueError, "must be 4"),
    (["--bits", "4", "--lean"], ValueError, "redundant"),
    (["--bits", "4", "--save-full"], ValueError, "save-full"),
    (["--bits", "4", "--resume", "last"], NotAvailableYet, "not supported with --bits 4 yet"),
    (["--bits", "4", "--save-steps", "2"], NotAvailableYet, "not supported with --bits 4 yet"),
    (["--bits", "4", "--train-norms"], ValueError, "linear layers only"),
    (["--warmup-steps", "2", "--warmup-ratio", "0.1"], ValueError, "not both"),
    (["--warmup-ratio", "1"], ValueError, "warmup-ratio must be a number >= 0 and < 1"),
    (["--eval-split", "0.1", "--eval-data", "e.jsonl"], ValueError, "not both"),
    (["--eval-split", "1"], ValueError, "eval-split must be a number >= 0 and < 1"),
    (["--eval-steps", "5"], ValueError, "needs an eval set"),
    (["--report-to", "mlflow"], ValueError, "report-to must be none or any of"),
    (["--data", "b.jsonl:1"], ValueError, "every --data a weight"),
    (["--quantization-floor", "--score", "random"], ValueError, "applies to --score gallop or magnitude"),
    (["--quantization-floor", "--model", "org/some-model"], ValueError, "needs a quantized base"),
])
def test_bad_options_fail_before_anything_loads(tmp_path, argv, error, match):
    args = parse(["--data", "a.jsonl", "--output", str(tmp_path / "o"), *argv])
    with pytest.raises(error, match=match):
        check_options(config_from_args(args))


def test_bad_choices_are_usage_errors(capsys):
    for argv in (["--score", "fisher"], ["--chat-template", "maybe"], ["--lr-scheduler", "wild"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert "invalid choice" in capsys.readouterr().err


def test_missing_data_and_missing_integrations():
    with pytest.raises(ValueError, match="no training data"):
        check_options(FinetuneConfig())
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="pip install wandb"):
            check_options(FinetuneConfig(data=["a.jsonl"], report_to="wandb"))
