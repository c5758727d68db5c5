"""`gallop reproduce` in its seconds-long smoke setting: every method, the metrics, table and plot."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("peft")

from gallop_kernels.reproduce import tasks as T  # noqa: E402
from gallop_kernels.reproduce.cli import register  # noqa: E402
from gallop_kernels.reproduce.runner import METHODS, budget, build_model, smoke_config  # noqa: E402


def test_tasks_are_exact_and_split():
    import torch

    g = torch.Generator().manual_seed(0)
    ids, labels = T.make_batch(T.task_by_name("reverse/letters"), 64, 4, 6, g, "eval")
    x = ids[:, 2:6] - T.NUM_SPECIAL - 6
    assert torch.equal(ids[:, -4:] - T.NUM_SPECIAL - 6, x.flip(-1))
    assert T.is_held_out(x).all() and (labels[:, :-4] == T.IGNORE).all()
    assert T.FINETUNE_TASK not in T.PRETRAIN_TASKS
    with pytest.raises(ValueError, match="unknown task"):
        T.task_by_name("nope")


def test_budgets_match_lora():
    from peft import LoraConfig, get_peft_model

    cfg = smoke_config()
    model = build_model(cfg, 0)
    n, density = budget(model, 2)
    lora = get_peft_model(build_model(cfg, 0), LoraConfig(r=2, target_modules="all-linear"))
    assert n == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_linear = sum(m.weight.numel() for m in model.modules()
                   if isinstance(m, torch_linear()) and m is not model.get_output_embeddings())
    assert density == pytest.approx(n / n_linear)


def torch_linear():
    import torch

    return torch.nn.Linear


def test_smoke_run_writes_table_plot_and_raw(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reproduce", "--smoke", "--output", str(tmp_path)])
    assert args.func(args) == 0
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert sorted({r["method"] for r in raw["runs"]}) == sorted(METHODS)
    sparse = [r for r in raw["runs"] if r["method"] in ("gallop", "gradient", "magnitude", "random")]
    lora = [r for r in raw["runs"] if r["method"] == "lora"]
    assert all(r["trainable"] == lora[0]["trainable"] for r in sparse)  # matched budgets
    table = (tmp_path / "table.md").read_text()
    assert "| GaLLoP |" in table and "forget ratio" in table and "pretrained" in table
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "wall time" in capsys.readouterr().out

    args = parser.parse_args(["reproduce", "--smoke", "--methods", "gallop,adam", "--output", str(tmp_path)])
    assert args.func(args) == 2
    assert "unknown method" in capsys.readouterr().err
