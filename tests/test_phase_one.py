"""Phase one written once: the subset, the sinks, the reduction step, and one meaning of targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gallop_kernels import SparseAdamW
from gallop_kernels.integrations.bitsandbytes import select_sparse_delta_from_dataset
from gallop_kernels.integrations.targets import resolve_targets, select_trainable
from gallop_kernels.ops.select import naive as select_naive
from gallop_kernels.phase_one import (
    DeviceGradients,
    HostGradients,
    calibrate_dataset,
    calibration_subset,
    optimizer_sink,
    select_from_sink,
)

IN, HIDDEN, VOCAB = 6, 8, 5


class Toy(nn.Module):
    """A linear projector outside any ModuleList, two blocks, and an output head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(IN, HIDDEN)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(2)])
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, x, labels):
        h = self.proj(x)
        for block in self.blocks:
            h = block(h)
        loss = nn.functional.cross_entropy(self.head(self.norm(h)), labels)
        return {"loss": loss}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randint(0, VOCAB, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class FakeRanks:
    """Rank 0 of two whose partner holds the same gradients: the sum doubles every tensor."""

    world_size, rank = 2, 0

    def __init__(self) -> None:
        self.reduced: list[tuple[int, ...]] = []

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        self.reduced.append(tuple(tensor.shape))
        tensor.mul_(2)


def test_all_linear_means_what_peft_means():
    """Every linear layer but the output head, inside a ModuleList or not, as PEFT resolves it."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    toy = Toy()
    assert [n for n, _ in resolve_targets(toy)] == ["proj", "blocks.0.0", "blocks.1.0"]
    assert select_trainable(toy) == ["proj.weight", "blocks.0.0.weight", "blocks.1.0.weight"]

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    llama = LlamaForCausalLM(cfg)
    ours = {n for n, _ in resolve_targets(llama)}
    lora = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
              for n, _ in lora.named_modules() if n.endswith(".lora_A")}
    assert ours == theirs and "lm_head" not in ours and len(ours) == 14


def test_target_lists_and_regexes():
    toy = Toy()
    assert [n for n, _ in resolve_targets(toy, ["0", "head"])] == ["blocks.0.0", "blocks.1.0", "head"]
    assert [n for n, _ in resolve_targets(toy, r"blocks\.1\..*")] == ["blocks.1.0"]
    with pytest.raises(ValueError, match="'norm' matched no linear module; it is a LayerNorm"):
        resolve_targets(toy, ["proj", "norm"])
    with pytest.raises(ValueError, match="'nope' matched no linear module"):
        resolve_targets(toy, ["nope"])
    with pytest.raises(ValueError, match="matched no linear module"):
        resolve_targets(toy, "0")  # a string is a regex over the full name, as in PEFT
    with pytest.raises(TypeError):
        resolve_targets(toy, [3])


def test_reduction_is_one_step_over_every_parameter():
    """Under several ranks each rank takes every world_size-th example of the subset and every
    trainable tensor is reduced once, in order, also those without a gradient."""
    data, model = Data(), Toy()
    select_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    params.append(nn.Parameter(torch.zeros(3)))  # in the optimizer, never reached by the loss
    opt = SparseAdamW(params, density=0.2)
    ranks = FakeRanks()
    sink = optimizer_sink(opt)
    assert isinstance(sink, DeviceGradients)
    rng = torch.get_rng_state()
    n = calibrate_dataset(model, sink, data, collate, fraction=0.5, batch_size=2, collective=ranks)
    assert n == 6 and ranks.reduced == [tuple(p.shape) for p in params]
    assert torch.equal(torch.get_rng_state(), rng)

    # What rank 0 accumulated before the (doubling) reduction: its half of the subset.
    subset = calibration_subset(len(data), 0.5, 0)[0::2]
    reference_model = Toy()
    select_trainable(reference_model)
    batch = collate([data[i] for i in subset])
    (reference_model(**batch)["loss"] * (len(subset) / 6)).backward()
    for p, q in zip(params, [p for p in reference_model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, 2 * q.grad)
    assert torch.equal(params[-1].grad, torch.zeros(3))


def test_a_sink_that_cannot_reduce_refuses_before_any_batch():
    model = Toy()
    opt = SparseAdamW(model.parameters(), lean=True)

    class Unreducible(HostGradients):
        reducible = False

    sink = Unreducible(opt)
    calls = []

    def loss_fn(m, inputs):
        calls.append(1)
        return m(**inputs)["loss"]

    with pytest.raises(NotImplementedError, match="torch.distributed"):
        calibrate_dataset(model, sink, Data(), collate, collective=FakeRanks(), loss_fn=loss_fn)
    assert calls == [] and not opt.is_selected()


def test_host_buffers_are_reduced_like_device_gradients():
    """Lean mode's host-offload calibration sums its host buffers over the ranks, every
    trainable tensor once and in order (the DDP path; real ranks: tests/test_distributed_*)."""
    model = Toy()
    select_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SparseAdamW(params, density=0.2, lean=True)
    sink, ranks = optimizer_sink(opt), FakeRanks()
    assert isinstance(sink, HostGradients)
    calibrate_dataset(model, sink, Data(), collate, fraction=0.5, batch_size=2, collective=ranks)
    assert ranks.reduced == [tuple(p.shape) for p in params]
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("lean", [False, True], ids=["device-grads", "host-buffers"])
def test_both_representations_select_the_same_entries(lean):
    """SparseAdamW on the targeted weights (device .grad or host buffers) and the sparse delta on
    the same frozen weights take the same subset, weights and loss, so they select one set."""
    data = Data()
    plain = Toy()
    select_trainable(plain)
    opt = SparseAdamW([p for p in plain.parameters() if p.requires_grad], density=0.1, lean=lean)
    plain.eval()
    sink = optimizer_sink(opt)
    calibrate_dataset(plain, sink, data, collate, fraction=0.75, batch_size=4, seed=1)
    select_from_sink(opt, sink)
    assert not plain.training  # restored

    delta = Toy()
    delta.requires_grad_(False)
    wrapped, n = select_sparse_delta_from_dataset(delta, data, collate, 0.1, fraction=0.75, batch_size=4, seed=1)
    assert n == 9 and list(wrapped) == ["proj", "blocks.0.0", "blocks.1.0"]
    for (name, layer), p in zip(wrapped.items(), [p for p in plain.parameters() if p.requires_grad]):
        assert torch.equal(layer.delta_indices.to(torch.int64), opt.selected_indices(p)), name
    assert sum(m.delta_indices.numel() for m in wrapped.values()) == opt.num_selected


def test_selection_from_host_buffers_equals_the_reference():
    """`calibrate` (host buffers) selects what the reference selects from the mean gradient."""
    data = Data()
    model = Toy()
    opt = SparseAdamW(list(model.parameters()), density=0.15)
    from gallop_kernels import calibrate

    batches = [collate([data[i] for i in range(s, s + 4)]) for s in (0, 4, 8)]
    assert calibrate(opt, batches, lambda b: model(**b)["loss"]) == 3
    expected = Toy()
    for b in batches:
        (expected(**b)["loss"] / 3).backward()
    want = select_naive.select([p.detach() for p in expected.parameters()],
                            [p.grad for p in expected.parameters()], 0.15)
    for p, w in zip(model.parameters(), want):
        assert torch.equal(opt.selected_indices(p), w)


class Tokens(nn.Module):
    """A loss that is the mean over a batch's label tokens (-100: ignored), as a causal LM's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": loss}


def _token_data(n: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (7,), generator=g)
        labels = ids.clone()
        labels[1 + i % 6:] = -100  # 1 to 6 label tokens
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _token_gradients(batch_size: int, units) -> list[torch.Tensor]:
    model = Tokens()
    sink = DeviceGradients(model.parameters())
    calibrate_dataset(model, sink, _token_data(), collate, fraction=1.0, batch_size=batch_size,
                      units=units)
    return [p.grad.clone() for p in model.parameters()]


def test_units_make_the_mean_gradient_independent_of_the_batch_size():
    """Weighted by label tokens, every batch size gives the mean over all tokens (to rounding);
    weighted by examples (the default) it does not, when examples have different lengths."""
    def label_tokens(batch):
        return int(batch["labels"].ne(-100).sum())

    by_tokens = {b: _token_gradients(b, label_tokens) for b in (1, 2, 9)}
    for b in (1, 2):
        for got, want in zip(by_tokens[b], by_tokens[9]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    by_examples = [_token_gradients(b, None) for b in (1, 9)]
    assert not torch.allclose(by_examples[0][1], by_examples[1][1], rtol=1e-3)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3", torch.tensor([1, 2])])
def test_bad_unit_counts_are_refused_before_any_batch(bad):
    model = Tokens()
    calls = []

    def loss_fn(m, inputs):
        calls.append(1)
        return m(**inputs)["loss"]

    with pytest.raises(ValueError, match="count >= 0"):
        calibrate_dataset(model, DeviceGradients(model.parameters()), _token_data(), collate,
                          fraction=1.0, loss_fn=loss_fn, units=lambda batch: bad)
    assert calls == []
    with pytest.raises(ValueError, match="every label"):
        calibrate_dataset(model, DeviceGradients(model.parameters()), _token_data(), collate,
                          fraction=1.0, loss_fn=loss_fn, units=lambda batch: 0)
    assert calls == []
