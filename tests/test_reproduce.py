"""`gallop reproduce --protocol probes` (the earlier study): matched budgets, SIFT's exact per-tensor k,
LR choice, resume, and the smoke run. The paper protocol is tested in test_reproduce_paper.py."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("peft")

from gallop_kernels.reproduce import runner as R  # noqa: E402
from gallop_kernels.reproduce.cli import register  # noqa: E402
from gallop_kernels.toy import tiny_chat_model  # noqa: E402


def test_budget_is_loras_trainable_count(tiny_chat):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_chat
    targets = R.target_parameters(model)
    assert [n.split(".")[-2] for n, _ in targets[:7]] == list(R.TARGETS)  # q k v o gate up down of layer 0
    lora = get_peft_model(tiny_chat_model()[0], LoraConfig(r=3, target_modules=list(R.TARGETS)))
    assert R.lora_budget(targets, 3) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("density", [1e-4, 0.003, 0.0123, 0.5, 1.0])
def test_sift_groups_select_exactly_sifts_k_per_tensor(tiny_chat, density):
    from gallop_kernels import SparseAdamW

    model, _ = tiny_chat
    targets = R.target_parameters(model)
    grads = {p: torch.randn_like(p) for _, p in targets}
    opt = SparseAdamW(R.sift_groups(targets, density), lr=1e-3, score="gradient")
    opt.select(grads)
    for _, p in targets:
        k = min(int(p.numel() * density) + 1, p.numel())  # SIFT: int(numel * ratio) + 1
        chosen = opt.selected_indices(p)
        assert len(chosen) == k == R.sift_k(p.numel(), density)
        expected = torch.topk(grads[p].abs().flatten(), k).indices.sort().values  # SIFT's torch.topk(|g|)
        assert torch.equal(chosen, expected)


def test_lr_is_chosen_on_validation_accuracy_then_loss():
    runs = [{"method": "gallop", "seed": 0, "lr": 1e-4, "id_val": 0.5, "id_val_loss": 0.9},
            {"method": "gallop", "seed": 0, "lr": 3e-4, "id_val": 0.8, "id_val_loss": 0.7},
            {"method": "gallop", "seed": 0, "lr": 1e-3, "id_val": 0.8, "id_val_loss": 0.4},
            {"method": "gallop", "seed": 1, "lr": 3e-3, "id_val": 1.0, "id_val_loss": 0.1},  # not the tuning seed
            {"method": "lora", "seed": 0, "lr": 1e-2, "id_val": 1.0, "id_val_loss": 0.0}]
    assert R.choose_lr(runs, "gallop", 0) == 1e-3
    assert R.choose_lr(runs, "full", 0) is None


def test_batches_cycle_through_epochs_without_repeating_within_one():
    items = list(range(10))
    plan = R.batches(items, 4, 5, seed=0)
    assert [len(b) for b in plan] == [4] * 5
    flat = [x for b in plan for x in b]
    assert sorted(flat[:8]) == sorted(set(flat[:8]))  # the first two batches are one epoch's
    assert plan == R.batches(items, 4, 5, seed=0) and plan != R.batches(items, 4, 5, seed=1)


def _parser():
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_smoke_run_writes_table_plot_and_raw_and_resumes(tmp_path, capsys, monkeypatch):
    parser = _parser()
    args = parser.parse_args(["reproduce", "--protocol", "probes", "--smoke", "--output", str(tmp_path)])
    assert args.func(args) == 0
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert sorted({r["method"] for r in raw["runs"]}) == sorted(R.METHODS)
    budget = raw["budget"]
    for r in raw["runs"]:
        if r["method"] in ("lora", "gallop", "saft", "pafi", "random"):
            assert r["trainable"] == budget, r["method"]  # matched budgets
    sift = next(r for r in raw["runs"] if r["method"] == "sift")
    assert budget < sift["trainable"] <= budget + len(R.TARGETS) * 2  # + at most one per tensor (2 layers)
    assert set(raw["chosen_lr"]) == set(R.METHODS)
    table = (tmp_path / "table.md").read_text()
    assert "| GaLLoP |" in table and "SIFT" in table and "SAFT-like" in table and "forget ratio" in table
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    # a second run with the same settings finds every run done and trains nothing
    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(R, "run_one", no_training)
    assert args.func(args) == 0
    again = json.loads((tmp_path / "raw.json").read_text())
    assert len(again["runs"]) == len(raw["runs"]) and len(again["sessions"]) == 2


def test_bad_options_are_usage_errors(tmp_path, capsys):
    parser = _parser()
    for protocol in ("probes", "paper"):
        args = parser.parse_args(["reproduce", "--protocol", protocol, "--smoke", "--methods", "gallop,adam",
                                  "--output", str(tmp_path)])
        assert args.func(args) == 2
        assert "unknown method" in capsys.readouterr().err
        args = parser.parse_args(["reproduce", "--protocol", protocol, "--report-only",
                                  "--output", str(tmp_path / "none")])
        assert args.func(args) == 2
    for bad in (["--protocol", "probes", "--ranks", "4"], ["--rank", "4"], ["--protocol", "probes", "--pilot"]):
        args = parser.parse_args(["reproduce", "--smoke", *bad, "--output", str(tmp_path)])
        assert args.func(args) == 2
        assert "belong" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
