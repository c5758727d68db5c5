"""The shared rules: one check per rule, the same refusal everywhere, and the 8-bit size option."""

from __future__ import annotations

import math

import pytest
import torch

from gallop_kernels import SparseAdamW
from gallop_kernels.rules import check_count, check_fraction, check_index_set, check_score


@pytest.mark.parametrize("indices, match", [
    (torch.tensor([0.0, 2.0]), "int32/int64"),
    (torch.tensor([True, False]), "int32/int64"),
    ([0, 2], "int32/int64"),
    (torch.tensor([[0, 2]]), "one-dimensional"),
    (torch.tensor([3, 1]), "sorted and unique"),
    (torch.tensor([1, 1]), "sorted and unique"),
    (torch.tensor([-1, 2]), "out of range"),
    (torch.tensor([2, 10]), "out of range"),
])
def test_index_sets_are_sorted_unique_in_range_integers(indices, match):
    with pytest.raises(ValueError, match=match):
        check_index_set(indices, 10, "w")
    got = check_index_set(torch.tensor([0, 4, 9], dtype=torch.int32), 10, "w")
    assert got.dtype == torch.int64 and got.tolist() == [0, 4, 9]
    assert check_index_set(torch.empty(0, dtype=torch.int64), 0, "w").numel() == 0


def test_option_checks():
    for bad, error in ((0.0, ValueError), (1.5, ValueError), (math.nan, ValueError), (True, TypeError),
                       ("0.5", TypeError)):
        with pytest.raises(error):
            check_fraction(bad, "--density")
    assert check_fraction(1, "density") == 1.0
    with pytest.raises(ValueError, match="unknown --score 'fisher'"):
        check_score("fisher", "--score")
    check_score(lambda p, g: g)
    with pytest.raises(ValueError):
        check_score(lambda p, g: g, allow_callable=False)
    for bad, error in ((0, ValueError), (1.0, TypeError), (False, TypeError)):
        with pytest.raises(error):
            check_count(bad, "batch_size")
    check_count(None, "max_batches", allow_none=True)


def test_min_8bit_entries_is_an_option():
    """Tensors with fewer selected entries than ``min_8bit_entries`` keep fp32 moments."""
    pytest.importorskip("bitsandbytes")
    big, small = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(40))
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt = SparseAdamW([big, small], density=1.0, state_bits=8, min_8bit_entries=100, backend="torch")
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    default = SparseAdamW([torch.nn.Parameter(torch.randn(600))], state_bits=8)
    assert default.defaults["min_8bit_entries"] == 4096
    for bad, error in ((-1, ValueError), (True, TypeError), (2.5, TypeError)):
        with pytest.raises(error, match="min_8bit_entries"):
            SparseAdamW([big], state_bits=8, min_8bit_entries=bad)
    # A checkpoint from before the option existed loads; a new selection uses the default (4096).
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["min_8bit_entries"]
    fresh = SparseAdamW([big, small], density=1.0, state_bits=8, backend="torch")
    fresh.load_state_dict(sd)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    fresh.step()
    fresh.select()
    assert fresh.state[big]["exp_avg"].dtype == torch.float32
