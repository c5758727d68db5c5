"""Microbenchmarks of selection: kernels 1-3 alone (GPU) and the whole selection, each beside
torch.topk / kthvalue / sort (chunked where they cannot take the size) and the CUB baseline."""

import pytest


@pytest.mark.cases("selection", kernels=("score_histogram",))
def test_score_histogram(run_case, case):
    run_case(case)


@pytest.mark.cases("selection", kernels=("radix_select",))
def test_threshold_select(run_case, case):
    run_case(case)


@pytest.mark.cases("selection", kernels=("compaction",))
def test_compaction(run_case, case):
    run_case(case)


@pytest.mark.cases("selection", kernels=("selection",))
def test_selection(run_case, case):
    run_case(case)
