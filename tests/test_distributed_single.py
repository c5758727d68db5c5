"""The distributed pieces that need no second process: lean clipping, attaching DDP, shard marks,
the FSDP2 memory rows. (Real ranks: tests/test_distributed_training.py.)"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from gallop_kernels import SparseAdamW


def _lean_step(max_norm: float, norm_type: float = 2.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.3, lean=True)
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()  # selects
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()  # gathered into the compact buffers
    return model, opt, x, y


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_lean_clipping_uses_the_kept_entries(norm_type):
    """The norm is that of the selected entries of the dense gradient, and clipping scales them
    exactly as torch's clip_grad_norm_ scales the dense gradient restricted to them."""
    model, opt, x, y = _lean_step(1.0)
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    dense = torch.autograd.grad(((torch.func.functional_call(
        model, dict(zip([n for n, _ in model.named_parameters()], twin)), (x,)) - y) ** 2).mean(), twin)
    kept = [g.reshape(-1)[opt.selected_indices(p)] for g, p in zip(dense, model.parameters())]
    want = torch.linalg.vector_norm(torch.cat(kept), norm_type)
    assert opt.last_grad_norm is None  # new gradients arrived since the last measurement
    got = opt.clip_grad_norm_(0.01, norm_type)
    torch.testing.assert_close(got, want)
    factor = min(1.0, 0.01 / (float(want) + 1e-6))
    for p, k in zip(model.parameters(), kept):
        torch.testing.assert_close(opt.lean_gradients.grad(p), k * factor)
    assert opt.last_grad_norm is got
    opt.step()
    assert opt.last_grad_norm is got  # until new gradients arrive
    opt.zero_grad()
    assert opt.last_grad_norm is None


def test_clipping_without_lean_is_torchs():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    twin = nn.Linear(5, 4)
    twin.load_state_dict(model.state_dict())
    opt = SparseAdamW(model.parameters(), density=0.5)
    for m in (model, twin):
        m(torch.ones(2, 5)).pow(2).sum().backward()
    got = opt.clip_grad_norm_(0.1)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    torch.testing.assert_close(got, want)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_clipping_refuses_bad_arguments_and_measures_with_inf():
    model, opt, _, _ = _lean_step(1.0)
    before = [opt.lean_gradients.grad(p).clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        opt.clip_grad_norm_(1.0, norm_type=0)
    assert float(opt.clip_grad_norm_(math.inf)) > 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(opt.lean_gradients.grad(p), b)  # inf only measures


def test_attach_ddp_checks_its_arguments():
    opt = SparseAdamW(nn.Linear(3, 2).parameters(), lean=True)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        opt.attach_ddp(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="replica_check"):
        SparseAdamW(nn.Linear(3, 2).parameters(), replica_check="yes")


def test_a_per_rank_state_dict_loads_on_its_own_shard_only():
    """A sharded group's per-rank state dict carries [rank, world]; loading it where the params
    are whole (or another shard) is refused with the way out."""
    layer = nn.Linear(4, 3)
    opt = SparseAdamW(layer.parameters(), density=0.5)
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert all("shard" not in g for g in sd["param_groups"])  # plain params: no mark
    sd["param_groups"][0]["shard"] = [1, 2]
    fresh = SparseAdamW(nn.Linear(4, 3).parameters(), density=0.5)
    with pytest.raises(ValueError, match="distributed_checkpoint"):
        fresh.load_state_dict(sd)
    assert not fresh.is_selected()


def test_swapped_params_keep_their_shapes():
    layer = nn.Linear(4, 3)
    opt = SparseAdamW(layer.parameters())
    same = nn.Parameter(layer.weight.detach().clone())  # accelerate-style swap: same shape
    same.grad = torch.ones_like(same)
    opt.param_groups[0]["params"][0] = same
    opt.step()
    assert opt.is_selected()


def test_fsdp2_memory_rows():
    from gallop_kernels.memory import model as mm
    from gallop_kernels.memory.presets import load_config
    from gallop_kernels.memory.sharded import FSDP2_METHODS, predict_fsdp2

    config = load_config("llama3-70b")
    assert round(mm.count_params(config) / 1e9, 2) == 70.55
    setup = mm.Setup()
    peaks = {k: [predict_fsdp2(config, k, setup, g).peak for g in (2, 4, 8)] for k in FSDP2_METHODS}
    for k, row in peaks.items():
        assert row[0] > row[1] > row[2], k  # more GPUs, less per GPU
    at8 = {k: row[2] for k, row in peaks.items()}
    assert at8["sparse-lean"] < at8["sparse"] < at8["adamw"] < at8["adamw-mixed"]
    n = mm.count_params(config)
    mixed = predict_fsdp2(config, "adamw-mixed", setup, 8)
    assert mixed.persistent["weights"] + mixed.persistent["optimizer_state"] == 12 * n // 8
    assert at8["adamw"] > 80e9 > at8["sparse-lean"]  # 70B: dense AdamW needs more than 8 GPUs of 80 GB
    with pytest.raises(ValueError, match="FSDP2 row"):
        predict_fsdp2(config, "lora", setup, 2)

    from gallop_kernels.memory.report import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--config", "llama3-8b", "--gpus", "2,8"]) == 0
    text = out.getvalue()
    assert "FSDP2 × 8 GPUs" in text and "prediction only" in text
    with redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exc:  # a usage error, at parse time
        main(["--config", "llama3-8b", "--gpus", "two"])
    assert exc.value.code == 2


def test_ranks_timeout_setting(monkeypatch):
    """GALLOP_RANKS_TIMEOUT_S: seconds, > 0; one process meets nobody (no process group)."""
    from gallop_kernels.optim import rendezvous

    monkeypatch.delenv("GALLOP_RANKS_TIMEOUT_S", raising=False)
    assert rendezvous.timeout_s() == rendezvous.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("GALLOP_RANKS_TIMEOUT_S", "2.5")
    assert rendezvous.timeout_s() == 2.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("GALLOP_RANKS_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="GALLOP_RANKS_TIMEOUT_S"):
            rendezvous.timeout_s()
    assert rendezvous.together("step() #1") == {}
    with pytest.raises(KeyError):
        rendezvous.agree("load_state_dict()", [None], KeyError("refused here"))
