"""The `gallop` command line: help, errors and a tiny demo run."""

import runpy
import sys

import pytest

from gallop_kernels.cli import build_parser, main

DEMO_OPTIONS = ["--tiny", "--model", "--seed", "--density", "--score", "--pretrain-steps", "--steps",
                "--finetune-steps", "--lr", "--pretrain-lr", "--batch-size", "--calibration-batches",
                "--ood-items", "--eval-examples", "--device", "--backend", "--threads", "--quiet"]


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in DEMO_OPTIONS:
        assert option in out


def test_top_level_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["demo", "--density", "0"], "--density"),
    (["demo", "--density", "1.5"], "--density"),
    (["demo", "--density", "abc"], "--density"),
    (["demo", "--score", "best"], "--score"),
    (["demo", "--finetune-steps", "-1"], "--finetune-steps"),
    (["demo", "--no-such-option"], "unrecognized"),
    ([], "required"),
])
def test_bad_options_exit_nonzero_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_optimizer_validation_becomes_a_usage_error(capsys):
    # A negative lr passes argparse; SparseAdamW rejects it with ValueError before any training.
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--tiny", "--lr", "-1", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lr" in err and "Traceback" not in err


def test_tiny_demo_runs_and_prints(capsys):
    code = main(["demo", "--tiny", "--quiet", "--pretrain-steps", "5", "--finetune-steps", "3",
                 "--eval-examples", "32", "--batch-size", "8", "--calibration-batches", "2", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    for text in ("task B", "task A", "trained entries", "optimizer state", "torch.optim.AdamW"):
        assert text in out


def test_real_demo_without_its_model_says_what_to_do(capsys, tmp_path):
    assert main(["demo", "--quiet", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # options of the tiny demo only
        main(["demo", "--pretrain-steps", "3"])
    assert exc.value.code == 2 and "--tiny" in capsys.readouterr().err


def test_python_dash_m_entry_point(monkeypatch, capsys):
    # What `python -m gallop_kernels demo --help` runs, in-process (a subprocess would re-import torch).
    monkeypatch.setattr(sys, "argv", ["gallop_kernels", "demo", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("gallop_kernels", run_name="__main__")
    assert exc.value.code == 0
    assert "--density" in capsys.readouterr().out


def test_parser_has_subcommand_structure():
    parser = build_parser()
    assert parser.parse_args(["demo"]).command == "demo"
