"""Microbenchmarks of the whole SparseAdamW.step(): the selection step (select() + step()) and the
steady step, beside dense torch AdamW (fused, foreach) and bitsandbytes AdamW8bit on the same
multi-tensor model."""

import pytest


@pytest.mark.cases("optimizer", kernels=("optimizer_select_step",))
def test_selection_step(run_case, case):
    run_case(case)


@pytest.mark.cases("optimizer", kernels=("optimizer_steady_step",))
def test_steady_step(run_case, case):
    run_case(case)
