"""Smoke test of the real-model path: the embedded SmolLM2-135M-Instruct (when its wheel is installed,
as in CI) or a shape-identical random model (when not) goes through the chat template, the task
encoding, exact match, GaLLoP selection and SparseAdamW steps.

Selection is restricted to one layer's projections so that the test takes seconds; the full-size
selection is what `gallop demo` runs. The first run converts the GGUF into the cache (~30 s on two
CPU cores, once per machine).
"""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import chat_tasks as C
from gallop_kernels import models as M

EMBEDDED = M.embedded_gguf()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    if EMBEDDED is not None:
        pytest.importorskip("gguf")
        return M.load_model_and_tokenizer()
    from gallop_kernels.toy import byte_tokenizer

    return M.default_shaped_model(), byte_tokenizer()  # same shapes; token ids stay below the vocab size


def test_default_model_has_the_documented_shape(model_and_tokenizer):
    model, _ = model_and_tokenizer
    for key, value in M.DEFAULT_CONFIG.items():
        assert getattr(model.config, key) == pytest.approx(value, rel=1e-6), key  # the GGUF stores eps in fp32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    if EMBEDDED is not None:
        assert M.is_valid_conversion(M.converted_dir(EMBEDDED))


def test_a_few_gallop_steps_on_the_real_model(model_and_tokenizer):
    from gallop_kernels import SparseAdamW

    model, tok = model_and_tokenizer
    targets = [(n, p) for n, p in model.named_parameters()
               if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    assert len(targets) == 7
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in targets:
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in targets}
    train = C.training_items(C.CATEGORY, tok)[:2]
    batch = C.encode_items(train, tok)
    assert batch.input_ids.shape[1] <= 48  # short chat sequences
    if EMBEDDED is not None:  # the real tokenizer: system, user, assistant turns in ChatML
        assert tok.decode(batch.input_ids[0]).startswith("<|im_start|>system\n")
    opt = SparseAdamW(targets, lr=1e-3, density=0.01)
    C.loss(model, batch).backward()
    opt.select()
    opt.zero_grad()
    for _ in range(2):
        loss = C.loss(model, batch)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in targets:
        changed = (p.detach() != before[name]).flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(opt.selected_indices(p).tolist()), name  # nothing else moved
    assert 0.0 <= C.exact_match(model, C.encode_items(C.CATEGORY.split("test")[:2], tok)) <= 1.0
    for name, p in targets:  # leave the module-scoped model as it was
        p.data.copy_(before[name])
