"""Test configuration. Runs before any test module imports triton or gallop_kernels."""

import os

import torch

# The Triton interpreter is chosen when `@triton.jit` decorates, so it has to be switched on before
# any kernel module is imported. Without a GPU every kernel then runs on the CPU, in numpy.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same global RNG state: a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Every optimizer behaviour test runs on both backends (Triton in its interpreter on CPU).
    Only a machine without the triton package skips the Triton half; a launcher that fails to
    import fails the tests."""
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


@pytest.fixture
def tiny_chat():
    """``(model, tokenizer)``: a random tiny Llama with the byte-level chat tokenizer (`gallop_kernels/toy.py`),
    fresh for each test. The real-model pipeline (chat template, tasks, methods) runs on it in seconds."""
    from gallop_kernels.toy import tiny_chat_model

    return tiny_chat_model()
