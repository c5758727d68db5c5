"""The declared Triton range (`ops/backends.py`, pyproject.toml): a triton older than 3.6 gets one
clear message where the Triton backend is asked for or imported, and ``backend="auto"`` runs the
torch backend instead (with that message once)."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest
import torch

from gallop_kernels.ops import backends


@pytest.fixture
def old_triton(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "3.5.1" if name == "triton" else real(name))
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    monkeypatch.setattr(backends, "_warned", set())


class _OnCuda:
    device = torch.device("cuda")


def test_in_range_versions_have_no_problem(monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    for version in ("3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.10.0+git1234", "4.0.0"):
        monkeypatch.setattr(metadata, "version", lambda name, v=version: v)
        assert backends.triton_problem() is None, version


def test_old_triton_refused_by_name_with_one_clear_message(old_triton):
    with pytest.raises(ValueError, match=r"need triton >= 3\.6 .* found triton 3\.5\.1"):
        backends.check_backend("triton")


def test_old_triton_auto_runs_torch_and_says_so_once(old_triton):
    with pytest.warns(UserWarning, match="found triton 3.5.1.*runs the torch backend"):
        assert backends.resolve("auto", [_OnCuda()]) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", [_OnCuda()]) == "torch"  # said once only
    assert backends.resolve("torch", [_OnCuda()]) == "torch"


def test_old_triton_import_of_the_triton_backend_fails_clearly(old_triton):
    pytest.importorskip("triton")
    import sys

    with pytest.raises(ImportError, match="found triton 3.5.1"):
        if "gallop_kernels.ops._triton" in sys.modules:
            importlib.reload(sys.modules["gallop_kernels.ops._triton"])
        else:
            importlib.import_module("gallop_kernels.ops._triton")
