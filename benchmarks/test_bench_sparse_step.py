"""Microbenchmarks of the sparse AdamW step (kernel 4) beside the plain CUDA sparse AdamW, torch
indexing, and dense torch AdamW (fused, foreach) / bitsandbytes AdamW8bit on the same parameter."""

import pytest


@pytest.mark.cases("sparse_step")
def test_sparse_step(run_case, case):
    run_case(case)
