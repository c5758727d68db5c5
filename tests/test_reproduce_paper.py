"""`gallop reproduce` (the paper protocol): the task suite, its scoring, the metrics, the learning-rate
rule, the fronts, the plan, and the resumable smoke study on the tiny random model."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("peft")

from gallop_kernels.reproduce import paper as P  # noqa: E402
from gallop_kernels.reproduce import paper_report as PR  # noqa: E402
from gallop_kernels.reproduce import suite as S  # noqa: E402
from gallop_kernels.reproduce.cli import register  # noqa: E402
from gallop_kernels.toy import tiny_chat_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(S.CANDIDATES))
def test_every_task_has_valid_items_and_disjoint_keyed_splits(name):
    task = S.build_task(name)
    assert task.items and 0 < task.chance < 1
    parts = {p: task.split(p) for p in S.SPLITS}
    assert sum(len(v) for v in parts.values()) == len(task.items)
    keys = {p: {it.key for it in v} for p, v in parts.items()}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]
    assert task.items == S.build_task(name).items  # generated deterministically
    for it in task.items:
        assert it.choices[it.answer] not in it.choices[:it.answer] + it.choices[it.answer + 1:]


@pytest.mark.parametrize("name", S.SUITE)
def test_suite_tasks_have_enough_test_items_for_the_study(name):
    task = S.build_task(name)
    assert len(task.split("test")) >= P.PaperConfig().test_items >= 200
    assert len(task.split("train")) >= 200


def test_item_refuses_bad_choices():
    with pytest.raises(ValueError, match="distinct"):
        S.MCItem("q", "a", ("x", "x"), 0, "k")
    with pytest.raises(ValueError, match="not an index"):
        S.MCItem("q", "a", ("x", "y"), 2, "k")


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_chat_model(seed=3)
    model.eval()
    return model, tok


@torch.no_grad()
def _full_loglik(model, tok, item: S.MCItem) -> list[float]:
    """The reference: each option's log-likelihood from one unpadded forward pass of its own row."""
    out = []
    for choice in item.choices:
        enc = S.encode_completion(tok, S._messages(item), S._spaced(item.prefix, choice))
        ids = torch.tensor([enc.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        labels = torch.tensor(enc.labels[1:])
        keep = labels >= 0
        out.append(float(logp[keep].gather(1, labels[keep, None]).sum()))
    return out


def test_scoring_equals_the_log_likelihood_of_each_option(tiny):
    """Left padding, the shared prefix's cache and `logits_to_keep` change nothing: the option with
    the highest unpadded log-likelihood is the one `correct` picks, item by item."""
    model, tok = tiny
    items = S.build_task("sentiment").split("test")[:5] + S.build_task("arithmetic").split("test")[:5]
    encoded = S.encode_items(items, tok)
    got = S.correct(model, encoded, batch_rows=4)
    for item, ok in zip(items, got.tolist()):
        ll = _full_loglik(model, tok, item)
        assert ok == (max(range(len(ll)), key=lambda j: (ll[j], -j)) == item.answer)


def test_shared_prefix_gives_the_same_logits_as_whole_rows(tiny):
    model, tok = tiny
    rows = [r.ids for it in S.encode_items(S.build_task("kind").split("val")[:6], tok) for r in it.rows]
    with torch.no_grad():
        a = S._last_logits(model, rows, 2, share_prefix=True)
        b = S._last_logits(model, rows, 2, share_prefix=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_one_row_per_item_when_options_differ_in_their_last_token_only():
    """With a tokenizer that makes every option one token, an item is one shared row; with a byte
    tokenizer (options of several tokens) it is one row per option."""
    _, tok = tiny_chat_model()
    item = S.MCItem("Which?", "It is", ("ab", "cd", "ef"), 1, "k")
    enc = S.encode_item(item, tok)  # bytes: " ab" is three tokens
    assert len(enc.rows) == 3 and all(len(r.scored) == 1 for r in enc.rows)
    assert enc.training_row()[1] == enc.rows[1].scored[0]
    single = S.MCItem("Which?", "It is", ("a", "c", "e"), 2, "k")  # " a": the space and "a" tokens
    enc = S.encode_item(single, tok)
    assert len(enc.rows) == 1 and [t for t in enc.rows[0].scored] == [(t,) for t in
                                                                       [tok.convert_tokens_to_ids(c) for c in "ace"]]


def test_loss_is_the_cross_entropy_of_the_right_options_tokens(tiny):
    model, tok = tiny
    items = S.encode_items(S.build_task("sentiment").split("train")[:3], tok)
    got = S.loss(model, items)
    terms = []
    for it in items:
        ids, target = it.training_row()
        full = torch.tensor([list(ids) + [target[-1]]])
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
        n = len(target)
        positions = range(full.shape[1] - n - 1, full.shape[1] - 1)
        terms += [-logp[p, t] for p, t in zip(positions, target)]
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Schedule, metrics, the learning-rate rule, fronts
# ---------------------------------------------------------------------------------------------


def test_epoch_batches_cover_every_item_once_per_epoch():
    items = list(range(11))
    plan = P.epoch_batches(items, 4, 2, seed=0)
    assert [len(b) for b in plan] == [4, 4, 3, 4, 4, 3]
    assert sorted(x for b in plan[:3] for x in b) == items == sorted(x for b in plan[3:] for x in b)
    assert plan != P.epoch_batches(items, 4, 2, seed=1)


def test_learning_rate_warms_up_then_decays_to_zero():
    total, warmup = 20, 2
    m = [P.lr_at(s, total, warmup) for s in range(total)]
    assert m[0] == 0.5 and m[1] == 1.0 and m[2] == 1.0
    assert all(a >= b for a, b in zip(m[2:], m[3:])) and m[-1] == pytest.approx(1 / 18)


def _raw(runs, tasks=("a", "b", "c"), base=None, chance=None):
    return {"config": {"tasks": list(tasks), "collapse_threshold": 0.01},
            "vanilla": {"test": base or {"a": 0.5, "b": 0.8, "c": 0.4}, "retention": {"p": 0.5, "q": 1.0}},
            "chance": chance or {t: 0.25 for t in tasks}, "runs": runs}


def _run(id_task="a", method="gallop", rank=4, lr=1e-3, seed=0, test=None, val=0.5, retention=None):
    return {"id_task": id_task, "method": method, "rank": rank, "lr": lr, "seed": seed,
            "test": test or {"a": 0.9, "b": 0.4, "c": 0.6}, "val": val, "retention": retention or {"p": 0.5, "q": 0.5}}


def test_metrics_follow_the_papers_definitions():
    raw = _raw([])
    m = P.metrics(raw, _run(test={"a": 0.9, "b": 0.4, "c": 0.0}))
    assert m["id_accuracy"] == 0.9 and m["id_gain"] == pytest.approx(0.4)
    assert m["ood_accuracy"] == pytest.approx(0.2)
    # b: (0.8 - 0.4) / 0.8 = 0.5; c: (0.4 - 0) / 0.4 = 1
    assert m["forget_per_task"] == {"b": 0.5, "c": 1.0} and m["forget_ratio"] == pytest.approx(0.75)
    assert m["collapse_rate"] == 0.5 and m["at_chance_rate"] == 0.5
    assert m["retention"] == 0.5 and m["retention_forget"] == pytest.approx(1 / 3)
    # an OOD task lifted by fine-tuning forgets nothing (the max(0, .)), and does not offset another
    m = P.metrics(raw, _run(test={"a": 0.9, "b": 1.0, "c": 0.2}))
    assert m["forget_per_task"] == {"b": 0.0, "c": 0.5} and m["forget_ratio"] == pytest.approx(0.25)


def test_learning_rate_rule_takes_the_smallest_rate_near_the_best_validation_accuracy():
    runs = [_run(lr=lr, val=v) for lr, v in ((1e-4, 0.50), (3e-4, 0.79), (1e-3, 0.80), (3e-3, 0.81))]
    runs += [_run(lr=1e-5, val=0.99, seed=1), _run(lr=1e-5, val=0.99, rank=16),
             _run(lr=1e-5, val=0.99, method="lora")]  # other seeds, budgets and methods do not count
    assert P.choose_lr(runs, "a", "gallop", 4, tolerance=0.02) == 3e-4
    assert P.choose_lr(runs, "a", "gallop", 4, tolerance=0.0) == 3e-3
    assert P.choose_lr(runs, "b", "gallop", 4, tolerance=0.02) is None


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [(0.9, 0.1, "a"), (0.5, 0.5, "b"), (0.4, 0.4, "dominated"), (0.1, 0.9, "c"), (0.5, 0.5, "dup"),
           (0.9, 0.05, "dominated2")]
    assert P.pareto_front(pts) == ["a", "b", "c"]


def test_seed_stage_repeats_the_front_points_only():
    cfg = P.PaperConfig(tasks=("a", "b", "c"), id_tasks=("a",), methods=("gallop",), ranks=(4,),
                        lr_grid={"gallop": (1e-4, 1e-3, 3e-3)}, seeds=(0, 1, 2), full_budgets_on=())
    raw = _raw([_run(lr=1e-4, test={"a": 0.6, "b": 0.8, "c": 0.4}),
                _run(lr=1e-3, test={"a": 0.9, "b": 0.4, "c": 0.6}),
                _run(lr=3e-3, test={"a": 0.9, "b": 0.3, "c": 0.3})])  # dominated by 1e-3
    grid, seeds = P.stages(cfg, raw)
    assert [k.lr for k in grid[1]] == [1e-3, 3e-3, 1e-4]  # the middle rate first, then outwards
    assert sorted((k.lr, k.seed) for k in seeds[1]) == [(1e-4, 1), (1e-4, 2), (1e-3, 1), (1e-3, 2)]


# ---------------------------------------------------------------------------------------------
# The study: smoke run, resumption, a sitting, the report
# ---------------------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="gallop")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_smoke_study_writes_raw_table_plot_and_resumes_without_rerunning(tmp_path, capsys, monkeypatch):
    parser = _parser()
    out = tmp_path / "res"
    # one sitting of 3 runs, then the rest: the study continues where it stopped
    args = parser.parse_args(["reproduce", "--smoke", "--max-runs", "3", "--output", str(out)])
    assert args.func(args) == 0
    assert len(json.loads((out / "raw.json").read_text())["runs"]) == 3
    args = parser.parse_args(["reproduce", "--smoke", "--output", str(out)])
    assert args.func(args) == 0
    raw = json.loads((out / "raw.json").read_text())
    grid = [k for name, keys in P.stages(P.SMOKE) if "seeds" not in name for k in keys]
    keys = [P.Key.of(r) for r in raw["runs"]]
    assert len(keys) == len(set(keys)) and set(grid) <= set(keys)
    assert {k.seed for k in keys} == {0, 1}  # the seed stage ran on the front points
    assert all(k.seed == 0 or any(f == P.Key(k.id_task, k.method, k.rank, k.lr, 0)
                                  for f in P.front_keys(raw, k.id_task, k.method)) for k in keys)
    budget = raw["budgets"]["1"]
    for r in raw["runs"]:
        assert len(r["losses"]) == r["steps"] == len(r["grad_norms"])
        if r["method"] in ("lora", "gallop", "gallop_qf", "saft", "pafi", "random"):
            assert r["trainable"] == budget, r["method"]  # matched budgets
        if r["method"] == "gallop_qf":
            assert r["floor_source"] == "q4_1 (set)"
    table = (out / "table.md").read_text()
    assert "Pareto fronts" in table and "GaLLoP + quantization floor" in table and "forget ratio" in table
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    # a finished study reruns nothing; the report is a function of raw.json alone
    monkeypatch.setattr(P, "run_one", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran again")))
    assert args.func(args) == 0
    assert len(json.loads((out / "raw.json").read_text())["runs"]) == len(raw["runs"])
    (out / "table.md").unlink()
    args = parser.parse_args(["reproduce", "--report-only", "--no-plot", "--output", str(out)])
    assert args.func(args) == 0
    assert (out / "table.md").read_text() == table
    args = parser.parse_args(["reproduce", "--estimate", "--no-plot", "--output", str(out)])
    assert args.func(args) == 0
    estimate = json.loads((out / "estimate.json").read_text())
    assert estimate["runs"] == len(raw["runs"]) and estimate["cpu_hours"] > 0
    assert "Estimated early" in (out / "table.md").read_text()


def test_a_study_with_other_settings_is_refused_not_overwritten(tmp_path, capsys):
    raw = {"fingerprint": "something else", "runs": [1]}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    args = _parser().parse_args(["reproduce", "--smoke", "--output", str(tmp_path)])
    assert args.func(args) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((tmp_path / "raw.json").read_text()) == raw


def test_cost_projection_counts_what_is_left():
    raw = _raw([_run(lr=1e-4) | {"cpu_seconds": 100.0}])
    raw["config"].update(P.PaperConfig(tasks=("a", "b", "c"), id_tasks=("a",), methods=("gallop",), ranks=(4,),
                                       lr_grid={"gallop": (1e-4, 1e-3)}, seeds=(0,), full_budgets_on=()).__dict__)
    raw["config"]["lr_grid"] = {"gallop": [1e-4, 1e-3]}
    raw["vanilla"]["cpu_seconds"] = 10.0
    raw["machine"] = {"cpu": "x", "cpus": 2}
    plan = PR.planned_runs(raw)
    assert sorted((k.lr, done) for k, done in plan) == [(1e-4, True), (1e-3, False)]
    text = "\n".join(PR.cost_section(raw))
    assert "1 left would take about 0.0 CPU-hours" in text and "mean CPU min" in text
    assert not math.isnan(P.metrics(raw, raw["runs"][0])["forget_ratio"])


def test_default_plan_runs_every_rate_everywhere_for_gallop_lora_and_full_only():
    cfg = P.PaperConfig()
    grid = dict(P.stages(cfg))
    other = grid[f"{cfg.id_tasks[0]}: ranks 4, 64"]
    for method in cfg.methods:
        rates = {k.lr for k in other if k.method == method}
        if method == "full":
            assert not rates  # full fine-tuning has no budget
        elif method in cfg.every_rate_methods:
            assert rates == set(cfg.lr_grid[method])
        else:
            assert rates == set(cfg.lr_grid[method][1:4])
    assert {k.rank for k in other} == {4, 64}
    assert len(grid[f"{cfg.id_tasks[0]}: every method, rank 16"]) == 5 * len(cfg.methods)
    second = grid[f"{cfg.id_tasks[1]}: every method, rank 16"]
    assert len(second) == 5 * len(cfg.every_rate_methods) + 3 * (len(cfg.methods) - len(cfg.every_rate_methods))


def test_pilot_and_selections_write_their_records(tmp_path):
    parser = _parser()
    for flag, name in (("--pilot", "pilot.json"), ("--selections", "selections.json")):
        args = parser.parse_args(["reproduce", "--smoke", flag, "--output", str(tmp_path)])
        assert args.func(args) == 0
    pilot = json.loads((tmp_path / "pilot.json").read_text())
    assert set(pilot["tasks"]) == set(S.CANDIDATES)
    assert all(0 <= t["test"] <= 1 and t["in_suite"] == (n in S.SUITE) for n, t in pilot["tasks"].items())
    sel = json.loads((tmp_path / "selections.json").read_text())
    variants = sel["tasks"]["sentiment"]["1"]
    assert set(variants) == {"plain", "quantization floor", "smallest non-zero"}
    assert variants["plain"]["shared_with_plain"] == 1.0
    assert "What GaLLoP selects" in "\n".join(PR.extras_section(PR.read_extras(str(tmp_path))))


def test_comparison_gains_follow_the_tasks_own_runs():
    runs = [_run(lr=lr, test={"a": 0.5 + g, "b": 0.8, "c": 0.4}) for lr, g in
            ((1e-4, 0.1), (3e-4, 0.2), (1e-3, 0.3), (3e-3, -0.1))]
    raw = _raw(runs)
    assert PR.id_gains(raw, "a") == [0.2, 0.3]  # the median and the upper quantiles of the gains 0.1, 0.2, 0.3
    assert PR.id_gains(raw, "b") == []
    key, group = PR.best_ood_at_gain(raw, "a", "gallop", 0.3)
    assert key.lr == 1e-3 and len(group) == 1
