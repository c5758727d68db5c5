"""Lean mode and host calibration: less memory, the same result."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import SparseAdamW, calibrate
from gallop_kernels.ops.select import naive as select_naive


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 2),
    ).to(dtype)


def batch(i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(i)).to(dtype)


def loss_of(model, x) -> torch.Tensor:
    return model(x).float().pow(2).mean()


def train(model, opt, steps: int, micro_batches: int, dtype=torch.float32) -> None:
    for step in range(steps):
        for j in range(micro_batches):
            loss_of(model, batch(100 * step + j, dtype)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("reselect_every", [None, 2])
def test_lean_changes_no_result(backend, reselect_every) -> None:
    plain, lean = make_model(), make_model()
    kwargs = dict(lr=1e-2, density=0.1, reselect_every=reselect_every, backend=backend)
    opt_plain = SparseAdamW(plain.parameters(), **kwargs)
    opt_lean = SparseAdamW(lean.parameters(), lean=True, **kwargs)
    train(plain, opt_plain, 5, micro_batches=2)
    train(lean, opt_lean, 5, micro_batches=2)
    for a, b in zip(plain.parameters(), lean.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.parameters(), lean.parameters()):
        assert torch.equal(opt_plain.selected_indices(a), opt_lean.selected_indices(b))


def test_lean_bf16_without_accumulation_changes_no_result(backend) -> None:
    plain, lean = make_model(torch.bfloat16), make_model(torch.bfloat16)
    opt_plain = SparseAdamW(plain.parameters(), lr=1e-2, density=0.2, backend=backend)
    opt_lean = SparseAdamW(lean.parameters(), lr=1e-2, density=0.2, backend=backend, lean=True)
    train(plain, opt_plain, 4, micro_batches=1, dtype=torch.bfloat16)
    train(lean, opt_lean, 4, micro_batches=1, dtype=torch.bfloat16)
    for a, b in zip(plain.parameters(), lean.parameters()):
        assert torch.equal(a, b)


def test_dense_gradients_are_freed_one_at_a_time() -> None:
    model = make_model()
    params = list(model.parameters())
    alive_at_hook = []

    def observe(p):  # registered before lean's hook: sees each dense gradient as it lands
        alive_at_hook.append(sum(q.grad is not None for q in params))

    for p in params:
        p.register_post_accumulate_grad_hook(observe)
    opt = SparseAdamW(params, lr=1e-2, density=0.3, lean=True)
    train(model, opt, 1, micro_batches=2)  # first step: host sums, then selection
    assert alive_at_hook and max(alive_at_hook) == 1
    alive_at_hook.clear()
    loss_of(model, batch(7)).backward()
    assert alive_at_hook and max(alive_at_hook) == 1
    assert all(p.grad is None for p in params)
    state_k = sum(opt.state[p]["indices"].numel() for p in params if p.requires_grad)
    assert opt.lean_gradients.buffer_bytes() == 4 * state_k


def test_the_first_step_selects_from_host_sums() -> None:
    """Before the first selection each gradient moves to a host buffer as it lands (the model's
    dense gradient never lives at once): the first step selects from the host sums what plain
    mode selects from .grad; clipping and select() read them; zero_grad() discards them."""
    plain, lean = make_model(), make_model()
    opt_plain = SparseAdamW(plain.parameters(), lr=1e-2, density=0.1)
    opt_lean = SparseAdamW(lean.parameters(), lr=1e-2, density=0.1, lean=True)
    for j in range(2):
        loss_of(plain, batch(j)).backward()
        loss_of(lean, batch(j)).backward()
    assert all(p.grad is None for p in lean.parameters()) and not opt_lean.is_selected()
    norm = opt_lean.clip_grad_norm_(float("inf"))  # (measures only)
    torch.testing.assert_close(norm, opt_plain.clip_grad_norm_(float("inf")))
    opt_plain.step()
    opt_lean.step()
    for a, b in zip(plain.parameters(), lean.parameters()):
        assert torch.equal(opt_plain.selected_indices(a), opt_lean.selected_indices(b))
        assert torch.equal(a, b)
    assert all(p.grad is None for p in lean.parameters())

    model = make_model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, lean=True)
    loss_of(model, batch(5)).backward()
    opt.zero_grad()
    opt.step()
    assert not opt.is_selected()  # the host sums went with zero_grad()
    loss_of(model, batch(5)).backward()
    opt.select()
    twin = make_model()
    loss_of(twin, batch(5)).backward()
    want = select_naive.select([p.detach() for p in twin.parameters()],
                               [p.grad for p in twin.parameters()], 0.1)
    for p, w in zip(model.parameters(), want):
        assert torch.equal(opt.selected_indices(p), w)

    model = make_model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, lean=True)
    loss_of(model, batch(6)).backward()
    p = next(model.parameters())
    p.grad = torch.ones_like(p)  # set by hand while its host sum waits: refused, nothing changes
    with pytest.raises(ValueError, match="moved the gradient"):
        opt.step()
    assert not opt.is_selected()


def test_tensors_without_selection_are_frozen_and_can_be_unfrozen() -> None:
    model = make_model()
    params = list(model.parameters())
    opt = SparseAdamW(params, lr=1e-2, density=0.005, score="gradient", lean=True)  # k = 1
    for p in params:
        p.grad = torch.zeros_like(p)
    params[2].grad[0, 0] = 1.0  # only the second layer's weight has a gradient
    opt.step()
    assert [p.requires_grad for p in params] == [i == 2 for i in range(len(params))]
    opt.unfreeze()
    assert all(p.requires_grad for p in params)


def test_zero_grad_clears_compact_gradients() -> None:
    model = make_model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.5, lean=True)
    train(model, opt, 1, micro_batches=1)
    loss_of(model, batch(3)).backward()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # nothing accumulated since zero_grad: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_calibrate_selects_from_the_mean_gradient_on_the_host(backend) -> None:
    model = make_model()
    params = list(model.parameters())
    expected_model = make_model()
    for i in range(3):
        loss_of(expected_model, batch(i)).backward()
    mean = [p.grad / 3 for p in expected_model.parameters()]
    expected = select_naive.select([p.detach() for p in params], mean, 0.2)

    alive_at_hook = []
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda p: alive_at_hook.append(sum(q.grad is not None for q in params))
        )
    opt = SparseAdamW(params, lr=1e-2, density=0.2, backend=backend, lean=True)
    used = calibrate(opt, (batch(i) for i in range(5)), lambda x: loss_of(model, x), max_batches=3)
    assert used == 3
    assert max(alive_at_hook) == 1
    assert all(p.grad is None for p in params)
    for p, e in zip(params, expected):
        assert torch.equal(opt.selected_indices(p), e)
    train(model, opt, 2, micro_batches=1)  # then trains as usual


def test_calibrate_without_batches() -> None:
    model = make_model()
    opt = SparseAdamW(model.parameters())
    with pytest.raises(ValueError, match="no batches"):
        calibrate(opt, [], lambda x: loss_of(model, x))
    assert opt.num_selected == 0


def test_step_consumes_compact_gradients_like_model_zero_grad() -> None:
    """The Trainer calls model.zero_grad(), which cannot clear lean mode's compact buffers."""
    plain, lean = make_model(), make_model()
    opt_plain = SparseAdamW(plain.parameters(), lr=1e-2, density=0.2)
    opt_lean = SparseAdamW(lean.parameters(), lr=1e-2, density=0.2, lean=True)
    for step in range(4):
        for model, opt in ((plain, opt_plain), (lean, opt_lean)):
            loss_of(model, batch(step)).backward()
            opt.step()
            model.zero_grad()
    for a, b in zip(plain.parameters(), lean.parameters()):
        assert torch.equal(a, b)


def test_public_state_for_callers() -> None:
    """is_selected, paused_lean and frozen: what phase one and the integrations ask the optimizer."""
    model = make_model()
    params = list(model.parameters())
    opt = SparseAdamW(params, lr=1e-2, density=0.005, score="gradient", lean=True)  # k = 1
    assert not opt.is_selected() and opt.frozen == []
    for p in params:
        p.grad = torch.zeros_like(p)
    params[2].grad[0, 0] = 1.0
    opt.step()
    assert opt.is_selected() and opt.is_selected(opt.param_groups[0])
    assert opt.frozen == [p for i, p in enumerate(params) if i != 2]
    with opt.paused_lean():  # the dense gradient stays where autograd put it
        loss_of(model, batch(1)).backward()
        assert params[2].grad is not None
    opt.zero_grad()
    loss_of(model, batch(1)).backward()  # lean again: gathered and freed in the hook
    assert params[2].grad is None
    with SparseAdamW(params).paused_lean():  # no lean mode: nothing to pause
        pass
