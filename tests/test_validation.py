"""Bad input gets a clear ValueError/TypeError before any state changes (DESIGN §2)."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import SparseAdamW


def param(n: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(density=0.0), ValueError, "density"),
        (dict(density=-0.1), ValueError, "density"),
        (dict(density=1.5), ValueError, "density"),
        (dict(density=float("nan")), ValueError, "density"),
        (dict(density="1%"), TypeError, "density"),
        (dict(lr=-1e-3), ValueError, "learning rate"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(score_eps=-1.0), ValueError, "score_eps"),
        (dict(betas=(1.0, 0.999)), ValueError, "beta"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta"),
        (dict(betas=(0.9,)), ValueError, "betas"),
        (dict(score="largest"), ValueError, "unknown score"),
        (dict(backend="cuda"), ValueError, "unknown backend"),
        (dict(reselect_every=0), ValueError, "reselect_every"),
        (dict(reselect_every=2.5), TypeError, "reselect_every"),
        (dict(master_weights="always"), ValueError, "master_weights"),
        (dict(seed=1.5), TypeError, "seed"),
        # finite: inf (and values beyond float32, the kernels' precision) would poison every step
        (dict(lr=float("inf")), ValueError, "learning rate"),
        (dict(lr=1e39), ValueError, "learning rate"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(weight_decay=float("inf")), ValueError, "weight_decay"),
        (dict(weight_decay=2**2000), ValueError, "weight_decay"),
        (dict(score_eps=float("nan")), ValueError, "score_eps"),
        (dict(betas=(0.9, float("inf"))), ValueError, "beta"),
        (dict(betas=(1, 1)), ValueError, "beta"),
        (dict(state_bits=8.0), ValueError, "state_bits"),
        (dict(state_bits=True), ValueError, "state_bits"),
        (dict(master_weights=1), ValueError, "master_weights"),
        (dict(lr=torch.tensor(1e-3)), TypeError, "learning rate"),
    ],
)
def test_bad_options(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        SparseAdamW([param()], **kwargs)


def test_bad_group_option_leaves_groups_unchanged() -> None:
    opt = SparseAdamW([param()])
    with pytest.raises(ValueError, match="density"):
        opt.add_param_group({"params": [param()], "density": 2.0})
    with pytest.raises(ValueError, match="unknown option"):
        opt.add_param_group({"params": [param()], "densty": 0.1})
    assert len(opt.param_groups) == 1


def test_param_in_two_groups() -> None:
    p = param()
    with pytest.raises(ValueError, match="more than one parameter group"):
        SparseAdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="twice"):
        SparseAdamW([p, p])


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.zeros(3, dtype=torch.float64, requires_grad=True), TypeError),
        (torch.zeros(3, dtype=torch.int64), TypeError),
        (torch.zeros(4, 4, requires_grad=True).t(), ValueError),
        ("not a tensor", TypeError),
    ],
)
def test_bad_params(bad, error) -> None:
    with pytest.raises(error):
        SparseAdamW([bad])


def test_params_as_a_set_are_refused() -> None:
    with pytest.raises(TypeError, match="ordered"):
        SparseAdamW({param()})


def test_triton_without_cuda_or_interpreter(monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        SparseAdamW([param()], backend="triton")


def test_sparse_gradient_is_refused_before_any_change() -> None:
    p = param(6)
    opt = SparseAdamW([p], density=0.5)
    p.grad = torch.ones(6).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(p.detach(), torch.zeros(6))


def test_gradient_of_wrong_shape_is_refused() -> None:
    p = param(6)
    opt = SparseAdamW([p])
    p.grad = torch.ones(6)
    p.data = torch.zeros(2, 3)  # the user swapped the data under the optimizer
    with pytest.raises(ValueError, match="shape"):
        opt.step()


def test_selected_indices_of_unknown_or_unselected_param() -> None:
    p = param()
    opt = SparseAdamW([p])
    with pytest.raises(RuntimeError, match="no selection"):
        opt.selected_indices(p)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.selected_indices(param())


def test_group_edited_after_construction_is_refused_at_step() -> None:
    p = param(6)
    opt = SparseAdamW([p], density=0.5)
    p.grad = torch.ones(6)
    opt.param_groups[0]["density"] = -3  # would silently select one entry
    with pytest.raises(ValueError, match="param group 0: invalid density"):
        opt.step()
    assert len(opt.state) == 0 and "steps_since_selection" not in opt.param_groups[0]


def test_a_failing_step_advances_no_counter_and_updates_no_param() -> None:
    a, b = param(6), param(6)
    opt = SparseAdamW([{"params": [a]}, {"params": [b]}], density=0.5)
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    opt.step()
    before = (a.detach().clone(), b.detach().clone(), opt.state[a]["step"].clone())
    opt.param_groups[1]["betas"] = (1, 1)  # the second group is bad: the first must not move
    with pytest.raises(ValueError, match="param group 1.*beta"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[a]["step"], before[2])
    assert opt.param_groups[0]["steps_since_selection"] == 1


def test_param_resized_after_selection_is_refused_and_select_recovers() -> None:
    p = param(6)
    opt = SparseAdamW([p], density=0.5)
    p.grad = torch.arange(6.0)
    opt.step()
    p.data = torch.zeros(4)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="resized"):
        opt.step()
    opt.select()  # what the message advises: a new selection for the new size
    assert opt.selected_indices(p).tolist() == [0, 1]
    opt.step()
