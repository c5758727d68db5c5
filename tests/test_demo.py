"""The demos: the tiny one's generated tasks and pipeline (learns B, keeps A), and the real demo's
pipeline on the random tiny chat model (every step of `gallop demo`, in seconds)."""

import io

import pytest
import torch

from gallop_kernels import toy as tasks
from gallop_kernels.chat_tasks import ID_TASKS
from gallop_kernels.demo import DemoConfig, TinyDemoConfig, print_result, run_demo, run_tiny_demo
from gallop_kernels.toy import IGNORE, NUM_SPECIAL, TASK_A, TASK_B
from gallop_kernels.toy import build_tiny_model as build_model
from gallop_kernels.toy import tiny_llama_config


def _decode(batch: tasks.Batch, length: int, num_symbols: int):
    """Split token ids back into (task token, inputs, answers) in symbol space (alphabet removed)."""
    ids = batch.input_ids
    x = (ids[:, 2:2 + length] - NUM_SPECIAL) % num_symbols
    y = (ids[:, -length:] - NUM_SPECIAL) % num_symbols
    return ids[:, 1], x, y


@pytest.mark.parametrize("split", ["train", "eval"])
def test_task_answers_are_right(split):
    S, L = 10, 6
    gen = torch.Generator().manual_seed(0)
    a = tasks.make_batch(TASK_A, 64, L, S, gen, split)
    b = tasks.make_batch(TASK_B, 64, L, S, gen, split)
    tok, x, y = _decode(a, L, S)
    assert (tok == TASK_A.token).all() and torch.equal(y, x)
    tok, x, y = _decode(b, L, S)
    assert (tok == TASK_B.token).all() and torch.equal(y, (x + 1) % S)
    # A reads and writes digits; B reads letters and writes digits.
    digits = (NUM_SPECIAL <= a.input_ids[:, 2:]) & (a.input_ids[:, 2:] < NUM_SPECIAL + S)
    assert digits[:, :L].all() and digits[:, -L:].all()
    assert (b.input_ids[:, 2:2 + L] >= NUM_SPECIAL + S).all()
    assert (b.input_ids[:, -L:] < NUM_SPECIAL + S).all()
    assert a.input_ids.max() < tasks.vocab_size(S)


def test_task_rules_by_hand():
    x = torch.tensor([[0, 1, 9, 3]])
    batch = tasks.encode(TASK_B, x, 10)
    assert tasks.render(batch.input_ids[0], 10) == "<decode> a b j d = 1 2 0 4"
    assert tasks.render(tasks.encode(TASK_A, x, 10).input_ids[0], 10) == "<copy> 0 1 9 3 = 0 1 9 3"


def test_labels_cover_only_answers():
    batch = tasks.make_batch(TASK_A, 8, 5, 10, torch.Generator().manual_seed(1))
    assert (batch.labels[:, :-5] == IGNORE).all()
    assert torch.equal(batch.labels[:, -5:], batch.input_ids[:, -5:])


def test_eval_split_is_held_out_and_deterministic():
    L, S = 4, 10
    train = tasks.sample_inputs(512, L, S, torch.Generator().manual_seed(2), "train")
    held = tasks.sample_inputs(512, L, S, torch.Generator().manual_seed(2), "eval")
    assert not tasks.is_held_out(train).any() and tasks.is_held_out(held).all()
    assert not set(map(tuple, train.tolist())) & set(map(tuple, held.tolist()))
    again = tasks.sample_inputs(512, L, S, torch.Generator().manual_seed(2), "eval")
    assert torch.equal(held, again)
    with pytest.raises(ValueError):
        tasks.sample_inputs(4, L, S, torch.Generator(), "test")


def test_accuracy_of_a_perfect_and_a_constant_model():
    batch = tasks.make_batch(TASK_A, 16, 4, 10, torch.Generator().manual_seed(3))

    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.nn.functional.one_hot(input_ids.roll(-1, 1), tasks.vocab_size(10)).float()
            return type("Out", (), {"logits": logits})

    assert tasks.accuracy(Oracle(), batch) == 1.0
    model = build_model(tiny_llama_config(tasks.vocab_size(10), hidden_size=32, num_layers=1), seed=0)
    assert 0.0 <= tasks.accuracy(model, batch) <= 1.0


TINY = dict(pretrain_steps=100, finetune_steps=100, hidden_size=64, num_symbols=6, length=4,
            batch_size=32, eval_examples=256, density=0.05, lr=5e-3, device="cpu")


@pytest.fixture(scope="module")
def tiny_result():
    return run_tiny_demo(TinyDemoConfig(**TINY))


def test_pipeline_result_is_sane(tiny_result):
    r = tiny_result
    assert r.num_params == sum(p.numel() for p in build_model(
        tiny_llama_config(tasks.vocab_size(6), hidden_size=64, max_positions=16), 0).parameters())
    assert r.num_selected == int(0.05 * r.num_params + 0.5)
    for acc in (r.acc_a_before, r.acc_a_after, r.acc_b_before, r.acc_b_after):
        assert 0.0 <= acc <= 1.0
    assert r.chance == pytest.approx(1 / 6)
    # AdamW: exp_avg + exp_avg_sq per fp32 param (+ a 4-byte step per tensor).
    n_tensors = len(list(build_model(tiny_llama_config(tasks.vocab_size(6), hidden_size=64), 0).parameters()))
    assert r.dense_state_bytes == 8 * r.num_params + 4 * n_tensors
    # SparseAdamW: at least an index and two fp32 moments per selected entry, far below AdamW.
    assert 12 * r.num_selected <= r.sparse_state_bytes < r.dense_state_bytes / 4
    assert r.pretrain_seconds > 0 and r.finetune_seconds > 0


def test_pipeline_learns_b_and_keeps_a(tiny_result):
    r = tiny_result
    assert r.acc_a_before > 0.9  # pretraining learned A
    assert r.acc_b_after > r.acc_b_before + 0.3  # fine-tuning learned (much of) B: +0.5 or more on seeds 0-4
    assert r.acc_a_after > 0.6  # and A was not wiped out


def test_pipeline_is_deterministic():
    config = TinyDemoConfig(**(TINY | dict(pretrain_steps=8, finetune_steps=8, eval_examples=64)))
    first, second = run_tiny_demo(config).as_dict(), run_tiny_demo(config).as_dict()
    untimed = {"pretrain_seconds": 0, "finetune_seconds": 0}
    assert first | untimed == second | untimed


def test_pipeline_rejects_bad_options():
    with pytest.raises(ValueError, match="density"):
        run_tiny_demo(TinyDemoConfig(**(TINY | {"density": 1.5})))
    with pytest.raises(ValueError):
        run_tiny_demo(TinyDemoConfig(**(TINY | {"calibration_batches": 0})))


# ---- the real demo's pipeline (gallop demo), on the random tiny chat model -------------------------

REAL_TINY = dict(model="tiny", steps=3, batch_size=4, calibration_batches=2, ood_items=3, density=0.05,
                 device="cpu", threads=1)


@pytest.fixture(scope="module")
def real_result():
    return run_demo(DemoConfig(**REAL_TINY))


def test_real_demo_pipeline_measures_and_trains_only_the_selection(real_result):
    r = real_result
    assert set(r.before) == set(r.after) == {DemoConfig().id_task, *DemoConfig().ood_tasks}
    assert all(0.0 <= v <= 1.0 for v in [*r.before.values(), *r.after.values()])
    assert r.num_selected == int(0.05 * r.num_targets + 0.5)  # one global group over the projections
    assert r.num_targets < r.num_params  # embeddings and norms are not selectable
    assert len(r.losses) == 3 and all(loss == loss for loss in r.losses)
    # SparseAdamW keeps an index and two fp32 moments per selected entry; AdamW 8 bytes per parameter
    assert 12 * r.num_selected <= r.sparse_state_bytes < r.adamw_state_bytes
    assert r.adamw_state_bytes == 8 * r.num_params
    answers = {it.answer for it in ID_TASKS[r.id_task].items}
    assert len(r.examples) == 3 and all(e["expected"] in answers for e in r.examples)
    out = io.StringIO()
    print_result(r, out)
    text = out.getvalue()
    for needle in (r.id_task, "known, mean (OOD)", "trained entries", "optimizer state", "time:"):
        assert needle in text


def test_real_demo_rejects_bad_options():
    with pytest.raises(ValueError, match="steps"):
        run_demo(DemoConfig(**(REAL_TINY | {"steps": -1})))
    with pytest.raises(ValueError, match="OOD"):
        run_demo(DemoConfig(**(REAL_TINY | {"ood_tasks": ("nope",)})))
    with pytest.raises(ValueError, match="density"):
        run_demo(DemoConfig(**(REAL_TINY | {"density": 0.0})))
