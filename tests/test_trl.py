"""TRL's SFTTrainer with SparseAdamW end to end: chat data, completion-only loss, GaLLoP's phase
one through GallopCallback, only selected entries trained, and the saved delta rebuilding the model.
Skipped without trl (`pip install -e ".[trl]"`)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gallop_kernels.delta import apply_delta, extract_delta, load_delta, save_delta  # noqa: E402
from gallop_kernels.integrations.transformers import (  # noqa: E402
    GallopCallback,
    gallop_optimizer_cls_and_kwargs,
    select_trainable,
)
from gallop_kernels.optim.unwrap import unwrap_optimizer  # noqa: E402
from gallop_kernels.toy import tiny_chat_model  # noqa: E402


def conversations(n: int) -> list[dict]:
    return [{"prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i}+{i}="}],
             "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(n)]


def test_sft_trainer_with_sparse_adamw_trains_the_selection_and_saves_a_delta(tmp_path):
    model, tok = tiny_chat_model(seed=0, hidden_size=32, num_layers=1, max_positions=128)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = select_trainable(model)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                         completion_only_loss=True, use_cpu=True, bf16=False, disable_tqdm=True, max_length=96)
    lines = []
    callback = GallopCallback(calibration_fraction=0.5, log=lines.append)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(conversations(12)),
                             processing_class=tok,
                             optimizer_cls_and_kwargs=gallop_optimizer_cls_and_kwargs(args, density=0.05),
                             callbacks=[callback])

    # completion-only: the prompt (system + user turns, chat-templated) is masked, the answer is not
    example = trainer.train_dataset[3]
    labels, ids = example.get("labels"), example["input_ids"]
    if labels is None:  # older TRL marks the completion with a mask instead of labels
        labels = [t if m else -100 for t, m in zip(ids, example["completion_mask"])]
    trained = tok.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained.startswith("6</s>") and "3+3=" not in trained
    assert tok.decode(ids).startswith("<s>system\nAdd.</s>\n<s>user\n3+3=</s>")

    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert callback.num_examples == 6 and opt.num_selected > 0
    assert any(line.startswith("phase one: selected ") for line in lines), lines
    assert all(r["loss"] == r["loss"] for r in trainer.state.log_history if "loss" in r)  # finite, logged

    changed = 0
    for name, p in model.named_parameters():  # only the selected entries of the trainable weights moved
        moved = (p.detach() != base[name]).flatten().nonzero().flatten()
        if name not in trainable:
            assert moved.numel() == 0, name
            continue
        assert set(moved.tolist()) <= set(opt.selected_indices(p).tolist()), name
        changed += moved.numel()
    assert changed > 0

    path = tmp_path / "out" / "gallop_delta.safetensors"
    save_delta(path, extract_delta(model, trainer.optimizer, base_model="tiny-chat"))
    fresh, _ = tiny_chat_model(seed=0, hidden_size=32, num_layers=1, max_positions=128)
    apply_delta(fresh, load_delta(path), expected_base="tiny-chat")
    for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
