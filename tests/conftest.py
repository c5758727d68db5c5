"""Test configuration. Runs before any test module imports triton or gallop_kernels."""

import os

import torch

# The Triton interpreter is chosen when `@triton.jit` decorates, so it has to be switched on before
# any kernel module is imported. Without a GPU every kernel then runs on the CPU, in numpy.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
