"""GaLLoP inside the Hugging Face Trainer: phase one, target modules, resume, bf16/checkpointing."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from gallop_kernels import SparseAdamW  # noqa: E402
from gallop_kernels.toy import tiny_llama_config  # noqa: E402
from gallop_kernels.integrations.transformers import (  # noqa: E402
    GallopCallback,
    format_selection_summary,
    gallop_optimizer_cls_and_kwargs,
    layer_type,
    select_trainable,
    selection_summary,
    unwrap_optimizer,
)
from gallop_kernels.phase_one import calibration_subset  # noqa: E402

VOCAB, SEQ = 24, 10


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = tiny_llama_config(VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_positions=SEQ)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class ToyData(torch.utils.data.Dataset):
    """Sequences whose second half copies the first; the loss covers the second half."""

    def __init__(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(3, VOCAB, (n, SEQ // 2), generator=g)
        self.ids = torch.cat([half, half], 1)
        self.labels = self.ids.clone()
        self.labels[:, : SEQ // 2] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def make_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def make_trainer(model, args, data, density=0.05, fraction=0.25, **opt):
    cb = GallopCallback(calibration_fraction=fraction)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=gallop_optimizer_cls_and_kwargs(args, density=density, **opt),
                      callbacks=[cb])
    return trainer, cb


def test_select_trainable_default_is_all_linear_but_head():
    model = tiny_llama()
    names = select_trainable(model)
    assert len(names) == 2 * 7 and all(n.endswith("proj.weight") for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "lm_head.weight" in frozen and "model.embed_tokens.weight" in frozen
    assert any("norm" in n for n in frozen)

    names = select_trainable(model, ["q_proj", "v_proj", "lm_head"], embeddings=True, norms=True)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "model.norm.weight" in names and "model.layers.0.input_layernorm.weight" in names
    assert not any("k_proj" in n or "mlp" in n for n in names)
    names = select_trainable(model, r".*layers\.1\.mlp\..*")
    assert sorted(names) == [f"model.layers.1.mlp.{m}_proj.weight" for m in ("down", "gate", "up")]
    with pytest.raises(ValueError, match="matched no linear module"):
        select_trainable(model, ["nonexistent"])


def test_layer_type_and_calibration_subset():
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    assert layer_type("lm_head.weight") == "lm_head.weight"
    assert layer_type("model.embed_tokens.weight") == "embed_tokens.weight"
    idx = calibration_subset(100, 0.05, seed=3)
    assert len(idx) == 5 and idx == sorted(idx) and idx == calibration_subset(100, 0.05, seed=3)
    assert len(calibration_subset(3, 0.01, 0)) == 1
    with pytest.raises(ValueError):
        calibration_subset(10, 0.0, 0)


def test_bad_options_fail_before_training(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="density"):
        gallop_optimizer_cls_and_kwargs(args, density=1.5)
    with pytest.raises(ValueError, match="score"):
        gallop_optimizer_cls_and_kwargs(args, score="nope")
    with pytest.raises(ValueError, match="calibration_fraction"):
        GallopCallback(calibration_fraction=0)
    with pytest.raises(TypeError, match="SparseAdamW"):
        unwrap_optimizer(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))


def test_phase_one_selects_from_the_mean_calibration_gradient(tmp_path):
    data = ToyData(32)
    model = tiny_llama()
    select_trainable(model)
    reference = tiny_llama()
    select_trainable(reference)
    args = make_args(tmp_path, max_steps=1)
    trainer, cb = make_trainer(model, args, data, density=0.05, fraction=0.25)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert not cb.resumed and cb.num_examples == 8

    # The same selection by hand: mean gradient over the same 8 examples, one group per param set.
    idx = calibration_subset(len(data), 0.25, seed=args.seed)
    batch = {k: torch.stack([data[i][k] for i in idx]) for k in ("input_ids", "labels")}
    # the callback averages per-batch losses weighted by batch share; batches of 2 examples
    for s in range(0, 8, 2):
        part = {k: v[s:s + 2] for k, v in batch.items()}
        (reference(**part).loss * (2 / 8)).backward()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = SparseAdamW(ref_params, density=0.05)
    ref_opt.select()
    got = [p for p in model.parameters() if p.requires_grad]
    for p, q in zip(got, ref_params):
        assert torch.equal(opt.selected_indices(p), ref_opt.selected_indices(q))
    summary = selection_summary(model, opt)
    assert sum(r["selected"] for r in summary.values()) == opt.num_selected == round(0.05 * sum(p.numel() for p in got))
    assert "self_attn.q_proj.weight" in summary and "total" in format_selection_summary(summary)

    # Frozen parameters never changed, trained ones only at selected entries.
    fresh = tiny_llama()
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        changed = (p.detach() != q.detach()).reshape(-1).nonzero().reshape(-1)
        if not p.requires_grad:
            assert changed.numel() == 0, n
        else:
            assert set(changed.tolist()) <= set(opt.selected_indices(p).tolist()), n


def test_three_steps_save_resume_three_steps_equals_six(tmp_path):
    data = ToyData(24)  # 6 optimizer steps per epoch (batch 2 x accumulation 2)

    model = tiny_llama()
    select_trainable(model)
    args = make_args(tmp_path / "a", save_strategy="steps", save_steps=3)
    trainer, _ = make_trainer(model, args, data, weight_decay=0.0)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert any("indices" in s for s in saved["state"].values())

    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    select_trainable(resumed)
    args_b = make_args(tmp_path / "b", save_strategy="steps", save_steps=3)
    trainer_b, cb_b = make_trainer(resumed, args_b, data, weight_decay=0.0)
    trainer_b.train(resume_from_checkpoint=str(ckpt))
    assert cb_b.resumed

    opt_a, opt_b = unwrap_optimizer(trainer.optimizer), unwrap_optimizer(trainer_b.optimizer)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
        if p.requires_grad:
            assert torch.equal(opt_a.selected_indices(p), opt_b.selected_indices(q))
    losses_a = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in trainer_b.state.log_history if "loss" in h]
    assert losses_a[3:] == pytest.approx(losses_b[-3:], rel=1e-6)


def test_bf16_gradient_checkpointing_and_accumulation(tmp_path):
    data = ToyData(16)
    model = tiny_llama()
    select_trainable(model, embeddings=True)  # embeddings trained too; gradient flows through checkpoints
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fields = TrainingArguments.__dataclass_fields__  # transformers 5 renamed gradient_checkpointing
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = make_args(tmp_path, max_steps=2, bf16=True, **{ckpt: True},
                     gradient_accumulation_steps=3, lr_scheduler_type="cosine")
    trainer, cb = make_trainer(model, args, data, density=0.1)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert cb.summary["embed_tokens.weight"]["selected"] > 0
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    assert any("embed_tokens" in n for n in changed)
    assert opt.num_selected > 0 and trainer.lr_scheduler.get_last_lr()[0] < args.learning_rate


def test_optimizer_state_is_sparse(tmp_path):
    model = tiny_llama()
    select_trainable(model)
    trainer, _ = make_trainer(model, make_args(tmp_path, max_steps=1), ToyData(8), density=0.02)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    n_state = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert n_state == 2 * opt.num_selected
