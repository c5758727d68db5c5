"""SparseAdamW behaviour: selection, updates, groups, closures, schedulers, re-selection."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from gallop_kernels import SparseAdamW, rules
from gallop_kernels.ops.adamw import naive as adamw_naive
from gallop_kernels.ops.adamw.hyper import AdamWHyper
from gallop_kernels.ops.select import naive as select_naive

NAN = float("nan")


def make_params(dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (1,), (3, 3, 2)]
    return [
        torch.randn(s, generator=gen).to(dtype).to(device).requires_grad_() for s in shapes
    ]


def random_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(p.shape, generator=gen) * torch.randint(0, 3, p.shape, generator=gen))
        .to(p.dtype).to(p.device)
        for p in params
    ]


class ReferenceRun:
    """SparseAdamW spelled out with the oracles (naive.py) alone: select once, then masked AdamW steps."""

    def __init__(self, params, density, score="gallop", lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                 weight_decay=0.01):
        self.params = [p.detach().clone() for p in params]
        self.density, self.score = density, score
        self.hp = (lr, betas[0], betas[1], eps, weight_decay)
        self.indices = None

    def step(self, grads):
        if self.indices is None:
            self.indices = select_naive.select(self.params, grads, self.density, self.score)
            self.m = [torch.zeros(i.numel()) for i in self.indices]
            self.v = [torch.zeros(i.numel()) for i in self.indices]
            self.master = [
                p.reshape(-1)[i].float() if p.dtype != torch.float32 else None
                for p, i in zip(self.params, self.indices)
            ]
            self.t = 0
        self.t += 1
        for p, g, i, m, v, w in zip(self.params, grads, self.indices, self.m, self.v, self.master):
            adamw_naive.sparse_adamw_step(p, g, i, m, v, w, AdamWHyper(self.t, *self.hp))


def run_optimizer(opt, params, grad_seeds):
    for seed in grad_seeds:
        for p, g in zip(params, random_grads(params, seed)):
            p.grad = g
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_matches_reference_over_several_steps(backend, dtype, device, density) -> None:
    params = make_params(dtype, device)
    ref = ReferenceRun(params, density)
    opt = SparseAdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, density=density,
                      backend=backend)
    for seed in range(4):
        grads = random_grads(params, seed)
        ref.step(grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
    for p, r, i in zip(params, ref.params, ref.indices):
        assert torch.equal(opt.selected_indices(p).cpu(), i.cpu())
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
        st = opt.state[p]
        if dtype != torch.float32:
            # the param is exactly the rounded fp32 master
            assert torch.equal(p.detach().reshape(-1)[i], st["master"].to(dtype))


def test_unselected_entries_never_change(backend, dtype, device) -> None:
    params = make_params(dtype, device)
    before = [p.detach().clone() for p in params]
    opt = SparseAdamW(params, lr=0.1, weight_decay=0.1, density=0.1, backend=backend)
    run_optimizer(opt, params, range(3))
    for p, b in zip(params, before):
        keep = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
        keep[opt.selected_indices(p)] = False
        assert torch.equal(p.detach().reshape(-1)[keep], b.reshape(-1)[keep])
        changed = p.detach().reshape(-1)[~keep] != b.reshape(-1)[~keep]
        assert bool(changed.all())
    assert opt.num_selected == rules.k_for_density(sum(p.numel() for p in params), 0.1)


def test_density_one_equals_torch_adamw(backend, device) -> None:
    params = make_params(torch.float32, device)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = SparseAdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05,
                       density=1.0, backend=backend)
    theirs = torch.optim.AdamW(twins, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    for seed in range(6):
        grads = random_grads(params, seed)
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)


def test_state_grows_with_k_not_n(backend) -> None:
    def state_bytes(numel: int) -> int:
        p = torch.zeros(numel, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.zeros(numel, dtype=torch.bfloat16)
        p.grad[:100] = 1.0
        opt = SparseAdamW([p], density=100 / numel, backend=backend)
        opt.step()
        assert opt.num_selected == 100
        return sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )

    small, large = state_bytes(1_000), state_bytes(64_000)
    assert small == large
    # int32 index + fp32 m, v, master per selected entry, plus the scalar step
    assert large == 100 * 16 + 4


def test_first_step_selects_from_current_gradient(backend) -> None:
    p = torch.zeros(10, requires_grad=True)
    opt = SparseAdamW([p], lr=0.1, density=0.2, score="gradient", backend=backend)
    assert opt.num_selected == 0
    p.grad = torch.tensor([0, 0, 5.0, 0, 0, 0, 0, 0, 7.0, 0])
    opt.step()
    assert opt.selected_indices(p).tolist() == [2, 8]
    assert opt.selected_indices(p).dtype == torch.int64
    assert opt.state[p]["indices"].dtype == torch.int32
    p.grad = torch.ones(10)
    opt.step()
    assert opt.selected_indices(p).tolist() == [2, 8]  # no re-selection by default


def test_select_from_accumulated_calibration_gradients(backend) -> None:
    model = torch.nn.Linear(6, 4)
    opt = SparseAdamW(model.parameters(), density=0.25, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(8, 6, generator=gen)).pow(2).mean().backward()
    expected = select_naive.select(
        [p.detach() for p in model.parameters()], [p.grad for p in model.parameters()], 0.25
    )
    opt.select()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(opt.selected_indices(p), e)


def test_step_without_gradients_does_nothing(backend) -> None:
    p = torch.ones(5, requires_grad=True)
    opt = SparseAdamW([p], density=0.5, backend=backend)
    opt.step()
    assert opt.num_selected == 0
    assert torch.equal(p.detach(), torch.ones(5))


def test_param_groups_with_own_density_and_score(backend) -> None:
    a = torch.randn(40, requires_grad=True)
    b = torch.randn(30, requires_grad=True)
    opt = SparseAdamW(
        [{"params": [a], "density": 0.1}, {"params": [b], "density": 0.5, "score": "magnitude"}],
        lr=1e-2, backend=backend,
    )
    a.grad, b.grad = torch.randn(40), torch.randn(30)
    expected_b = select_naive.select([b.detach()], [None], 0.5, "magnitude")[0]  # before b moves
    opt.step()
    assert opt.selected_indices(a).numel() == 4
    assert torch.equal(opt.selected_indices(b), expected_b)
    c = torch.randn(20, requires_grad=True)
    opt.add_param_group({"params": [c], "density": 0.25, "score": "random", "lr": 0.5})
    c.grad = torch.randn(20)
    opt.step()
    assert torch.equal(
        opt.selected_indices(c), select_naive.select([c.detach()], [None], 0.25, "random")[0]
    )
    assert opt.state[a]["step"].item() == 2 and opt.state[c]["step"].item() == 1


def test_callable_score(backend) -> None:
    p = torch.randn(20, requires_grad=True)
    p.grad = torch.randn(20)
    expected = torch.sort(torch.topk(-p.detach(), 4).indices).values  # before p moves
    opt = SparseAdamW([p], density=0.2, score=lambda w, g: -w, backend=backend)
    opt.step()
    assert torch.equal(opt.selected_indices(p), expected)


def test_closure_is_evaluated_with_grad(backend) -> None:
    model = torch.nn.Linear(4, 1)
    opt = SparseAdamW(model.parameters(), lr=0.1, density=0.5, backend=backend)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < losses[0]


def test_lr_scheduler_drives_the_step(backend) -> None:
    p = torch.zeros(4, requires_grad=True)
    opt = SparseAdamW([p], lr=1.0, density=1.0, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    p.grad = torch.ones(4)
    opt.step()
    sched.step()
    after_first = p.detach().clone()
    assert opt.param_groups[0]["lr"] == 0.0
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.detach(), after_first)


def test_zero_grad(backend) -> None:
    p = torch.randn(4, requires_grad=True)
    opt = SparseAdamW([p], backend=backend)
    p.grad = torch.ones(4)
    opt.zero_grad()
    assert p.grad is None
    p.grad = torch.ones(4)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(4))


def test_named_parameters_name_the_bad_tensor(backend) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    opt = SparseAdamW(model.named_parameters(), density=0.5, backend=backend)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].bias.grad[0] = float("nan")
    with pytest.raises(ValueError, match=r"1\.bias"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# Re-selection (GMT)
# ---------------------------------------------------------------------------------------------


def test_reselection_uses_accumulated_gradient_and_keeps_state(backend) -> None:
    p = torch.zeros(8, requires_grad=True)
    opt = SparseAdamW([p], lr=0.1, density=0.25, score="gradient", reselect_every=2,
                      backend=backend)
    grads = [
        torch.tensor([9.0, 8, 0, 0, 0, 0, 0, 0]),   # step 1 selects {0, 1}
        torch.tensor([0.0, 3, 0, 0, 0, 0, 7, 0]),   # steps 1..2 accumulate
        torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1]),   # step 3 re-selects from mean of steps 1, 2
    ]
    p.grad = grads[0]
    opt.step()
    assert opt.selected_indices(p).tolist() == [0, 1]
    p.grad = grads[1]
    opt.step()
    m_before = opt.state[p]["exp_avg"].clone()
    # mean gradient |.|: [4.5, 5.5, 0, 0, 0, 0, 3.5, 0] -> top-2 = {0, 1}; make 6 win instead:
    assert opt.state[p]["grad_accum"].tolist() == [9.0, 11, 0, 0, 0, 0, 7, 0]
    opt.state[p]["grad_accum"][0] = 0.0  # (nudge: now {1, 6} is the top-2 of the mean)
    p.grad = grads[2]
    opt.step()
    assert opt.selected_indices(p).tolist() == [1, 6]
    st = opt.state[p]
    assert st["step"].item() == 1  # t counts from the selection
    # entry 1 kept its moment and then took one more step; entry 6 started from zero
    assert st["exp_avg"][0].item() == pytest.approx(0.9 * m_before[1].item() + 0.1 * 1.0)
    assert st["exp_avg"][1].item() == pytest.approx(0.1 * 1.0)
    assert st["grad_accum"].tolist() == [1.0] * 8


def test_reselection_keeps_master_for_staying_entries(backend) -> None:
    p = torch.randn(16).to(torch.bfloat16).requires_grad_()
    opt = SparseAdamW([p], lr=1e-3, density=0.25, score="magnitude", reselect_every=1,
                      backend=backend)
    p.grad = torch.ones(16, dtype=torch.bfloat16)
    opt.step()
    master = opt.state[p]["master"].clone()
    chosen = opt.selected_indices(p)
    opt.step()  # magnitude score: the same entries stay selected; master carried over
    assert torch.equal(opt.selected_indices(p), chosen)
    assert not torch.equal(opt.state[p]["master"], master)
    assert torch.equal(p.detach().reshape(-1)[chosen], opt.state[p]["master"].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Nothing changes on a bad score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["param", "grad"])
def test_non_finite_score_raises_and_changes_nothing(backend, where) -> None:
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    opt = SparseAdamW([{"params": [a]}, {"params": [b]}], density=0.5, backend=backend)
    a.grad, b.grad = torch.randn(10), torch.randn(6)
    if where == "param":
        with torch.no_grad():
            b[2] = float("nan")  # (an infinite weight scores 0 under gallop: finite, allowed)
    else:
        b.grad[2] = float("nan")
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="group 1 param 0"):
        opt.step()
    assert torch.equal(a.detach().view(torch.int32), before[0].view(torch.int32))
    assert torch.equal(b.detach().view(torch.int32), before[1].view(torch.int32))
    assert len(opt.state) == 0 and opt.num_selected == 0
    assert all("steps_since_selection" not in g for g in opt.param_groups)


def test_empty_param_group_is_harmless(backend) -> None:
    p = torch.randn(10, requires_grad=True)
    opt = SparseAdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], density=0.2,
                      backend=backend)
    p.grad = torch.randn(10)
    opt.select()
    opt.step()
    assert opt.num_selected == 2


# ----------------------------------------------------------------------------------------------
# Copies: deepcopy and pickle carry everything on (as torch.optim optimizers do)
# ----------------------------------------------------------------------------------------------


def _all_params(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _train_through_autograd(opt, seeds) -> None:
    """Gradients from backward, so that lean mode's hooks gather them."""
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for p in _all_params(opt):
            if p.requires_grad:
                w = torch.randn(p.shape, generator=gen).to(p.dtype)
                (p * w).float().sum().backward()
        opt.step()
        opt.zero_grad()


def _pickled(opt):
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(lean=True), dict(lean=True, reselect_every=2)],
    ids=["plain", "lean", "lean-reselect"],
)
def test_copies_continue_exactly_like_the_original(backend, copy_fn, options) -> None:
    params = make_params(torch.bfloat16, torch.device("cpu"))
    opt = SparseAdamW(params, lr=1e-2, density=0.3, backend=backend, **options)
    _train_through_autograd(opt, [0, 1])
    clone = copy_fn(opt)
    assert clone.backend == backend and clone.lean == opt.lean
    assert all(a is not b for a, b in zip(_all_params(opt), _all_params(clone)))
    _train_through_autograd(opt, [2, 3, 4])
    _train_through_autograd(clone, [2, 3, 4])
    for a, b in zip(_all_params(opt), _all_params(clone)):
        assert torch.equal(a, b)
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], clone.state[b][key]), key
    if opt.lean:  # the copy's own hooks gathered its gradients, and freed them
        assert clone.lean_gradients.buffer_bytes() == opt.lean_gradients.buffer_bytes() > 0


def test_copy_of_lean_optimizer_keeps_pending_gradients_and_frozen_tensors() -> None:
    params = make_params(torch.float32, torch.device("cpu"))
    opt = SparseAdamW(params, lr=1e-2, density=0.02, lean=True, backend="torch")
    _train_through_autograd(opt, [0])
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    assert frozen  # a tensor without selected entries is frozen
    (params[0] * 2).sum().backward()  # a pending compact gradient
    clone = copy.deepcopy(opt)
    copies = _all_params(clone)
    assert [i for i, p in enumerate(copies) if not p.requires_grad] == frozen
    assert clone.lean_gradients.gathered(copies[0]) and copies[0].grad is None
    clone.unfreeze()
    assert all(p.requires_grad for p in copies) and not all(p.requires_grad for p in params)
    opt.step()
    clone.step()
    assert torch.equal(params[0], copies[0])


def test_nonfinite_gradients_keep_torch_adamw_semantics(backend) -> None:
    """Documented: after selection, a NaN gradient flows into the selected entries (no per-step
    check, which would cost a host synchronisation on a GPU), as in torch.optim.AdamW."""
    p = torch.zeros(4, requires_grad=True)
    opt = SparseAdamW([p], lr=0.1, density=0.5, score="gradient", backend=backend)
    p.grad = torch.tensor([1.0, 0.0, 2.0, 0.0])
    opt.step()
    p.grad = torch.tensor([NAN, 0.0, 1.0, 0.0])
    opt.step()
    assert torch.isnan(p[0]) and torch.isfinite(p[1:]).all()
