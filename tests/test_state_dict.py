"""Checkpoints: weights_only loading, exact continuation, dtypes protected from torch's casting."""

from __future__ import annotations

import io

import pytest
import torch

from gallop_kernels import SparseAdamW


def make_model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def train(model, opt, steps: int, start: int, scheduler=None) -> None:
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(5, 8, generator=gen).to(next(model.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, map_location="cpu")


def options(backend: str) -> dict:
    return dict(lr=1e-2, weight_decay=0.01, density=0.2, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("reselect_every", [None, 2])
def test_resume_continues_exactly(backend, dtype, split, reselect_every) -> None:
    total = 5
    straight = make_model(dtype)
    opt = SparseAdamW(straight.parameters(), reselect_every=reselect_every, **options(backend))
    train(straight, opt, total, 0)

    first = make_model(dtype)
    opt1 = SparseAdamW(first.parameters(), reselect_every=reselect_every, **options(backend))
    train(first, opt1, split, 0)
    saved_model = roundtrip(first.state_dict())
    saved_opt = roundtrip(opt1.state_dict())

    resumed = make_model(dtype, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = SparseAdamW(resumed.parameters(), reselect_every=reselect_every, **options(backend))
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, total - split, split)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        sa, sb = opt.state[a], opt2.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]), key


def test_state_keeps_its_dtypes_for_bf16_params(backend) -> None:
    model = make_model(torch.bfloat16)
    opt = SparseAdamW(model.parameters(), **options(backend))
    train(model, opt, 2, 0)
    fresh = SparseAdamW(model.parameters(), **options(backend))
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    for p in model.parameters():
        st = fresh.state[p]
        assert st["indices"].dtype == torch.int32
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["master"].dtype == torch.float32
        assert torch.equal(st["indices"], opt.state[p]["indices"])
        assert torch.equal(st["master"], opt.state[p]["master"])


def test_state_dict_before_selection_round_trips(backend) -> None:
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), **options(backend))
    fresh = SparseAdamW(model.parameters(), **options(backend))
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert fresh.num_selected == 0
    train(model, fresh, 1, 0)
    assert fresh.num_selected > 0


def test_callable_score_survives_weights_only(backend) -> None:
    def score(p, g):
        return g.abs()

    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), score=score, **options(backend))
    train(model, opt, 1, 0)
    saved = roundtrip(opt.state_dict())
    fresh = SparseAdamW(model.parameters(), score=score, **options(backend))
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["score"] is score
    with pytest.raises(ValueError, match="callable"):
        SparseAdamW(model.parameters(), **options(backend)).load_state_dict(saved)


def test_lr_scheduler_state_resumes(backend) -> None:
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), **options(backend))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 2, 0, sched)
    fresh = SparseAdamW(model.parameters(), **options(backend))
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    fresh_sched.load_state_dict(sched.state_dict())
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def _corrupt(saved: dict, key: str, value) -> dict:
    saved = roundtrip(saved)
    saved["state"][0][key] = value
    return saved


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("indices", torch.tensor([1, 0], dtype=torch.int32), "indices|shape"),
        ("indices", torch.tensor([0, 10_000], dtype=torch.int32), "out of range|shape"),
        ("indices", torch.zeros(3), "int32/int64"),
        ("exp_avg", torch.zeros(1, dtype=torch.bfloat16), "float32"),
        ("exp_avg_sq", torch.zeros(999), "shape"),
    ],
)
def test_bad_checkpoint_is_refused_and_changes_nothing(backend, key, value, message) -> None:
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), **options(backend))
    train(model, opt, 1, 0)
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_corrupt(saved, key, value))
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_for_another_layout_is_refused(backend) -> None:
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), **options(backend))
    other = SparseAdamW(list(model.parameters())[:2], **options(backend))
    with pytest.raises(ValueError, match="params"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_trip_across_devices() -> None:
    model = make_model(torch.bfloat16).cuda()
    opt = SparseAdamW(model.parameters(), **options("auto"))
    train(model, opt, 2, 0)
    cpu_model = make_model(torch.bfloat16)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu_opt = SparseAdamW(cpu_model.parameters(), **options("torch"))
    cpu_opt.load_state_dict(roundtrip(opt.state_dict()))
    for p_gpu, p_cpu in zip(model.parameters(), cpu_model.parameters()):
        st = cpu_opt.state[p_cpu]
        assert st["exp_avg"].device.type == "cpu" and st["exp_avg"].dtype == torch.float32
        assert torch.equal(st["indices"], opt.state[p_gpu]["indices"].cpu())
    train(model, opt, 2, 2)
    train(cpu_model, cpu_opt, 2, 2)
    for a, b in zip(model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=1e-2, atol=1e-3)


def test_old_plain_number_steps_are_converted(backend) -> None:
    """Older torch checkpoints hold ``step`` as a Python number."""
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), **options(backend))
    train(model, opt, 2, 0)
    saved = roundtrip(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"] = int(entry["step"])
    twin = make_model(torch.float32)
    twin.load_state_dict(model.state_dict())
    fresh = SparseAdamW(twin.parameters(), **options(backend))
    fresh.load_state_dict(saved)
    for p in twin.parameters():
        step = fresh.state[p]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and float(step) == 2
    train(model, opt, 1, 2)
    train(twin, fresh, 1, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_lean_mode_follows_a_loaded_selection() -> None:
    """Tensors are frozen for the loaded selection (not the one before) in lean mode."""
    model = make_model(torch.float32)
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.02, lean=True, backend="torch")
    train(model, opt, 1, 0)
    frozen = [i for i, p in enumerate(model.parameters()) if not p.requires_grad]
    assert frozen
    other = make_model(torch.float32)
    other_opt = SparseAdamW(other.parameters(), lr=1e-2, density=0.9, lean=True, backend="torch")
    train(other, other_opt, 1, 0)
    assert all(p.requires_grad for p in other.parameters())
    other_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert [i for i, p in enumerate(other.parameters()) if not p.requires_grad] == frozen
