"""Version-1 delta files (absolute values, no fingerprint), as the previous writer produced them,
still load and apply as before; they convert to version 2 given their base.

The files in tests/fixtures/delta_v1 were written by `save_delta` at commit c7e2953 (see make.py
there): a SparseAdamW fine-tune of a tiny MLP in fp32 and bf16, with its base and trained states.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

from gallop_kernels.delta import (  # noqa: E402
    apply_delta, combine_deltas, load_delta, merge_delta, save_delta, to_difference, unmerge_delta,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "delta_v1")
TAGS = ["float32", "bfloat16"]


def mlp(state):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(state["0.weight"].dtype)
    model.load_state_dict(state)
    return model


def fixture(tag):
    base = load_file(os.path.join(FIXTURES, f"base_{tag}.safetensors"))
    trained = load_file(os.path.join(FIXTURES, f"trained_{tag}.safetensors"))
    return base, trained, os.path.join(FIXTURES, f"delta_{tag}.safetensors")


def assert_state(model, state):
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n


@pytest.mark.parametrize("tag", TAGS)
def test_version_1_files_load_and_apply_as_before(tag):
    base, trained, path = fixture(tag)
    delta = load_delta(path)
    assert delta.metadata["version"] == "1" and delta.kind == "absolute" and not delta.base
    assert delta.metadata["base_model"] == "fixture-mlp" and delta.metadata["task"] == "fixture"
    model = mlp(base)
    with pytest.warns(UserWarning, match="no base fingerprint"):
        apply_delta(model, path)
    assert_state(model, trained)
    model = mlp(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_delta(model, delta, check_base=False)  # the explicit opt-out is silent
    assert_state(model, trained)


@pytest.mark.parametrize("tag", TAGS)
def test_version_1_scale_merge_and_unmerge(tag):
    base, trained, path = fixture(tag)
    delta = load_delta(path)
    model = mlp(base)
    apply_delta(model, delta, scale=0.5, check_base=False)
    for name, idx in delta.indices.items():
        b = base[name].reshape(-1).clone()
        b[idx.long()] = (b[idx.long()].double()
                         + 0.5 * (delta.values[name].double() - b[idx.long()].double())).to(b.dtype)
        assert torch.equal(model.get_parameter(name).reshape(-1), b), name
    model = mlp(base)
    restore = merge_delta(model, delta, check_base=False)
    assert_state(model, trained)
    unmerge_delta(model, restore)
    assert_state(model, base)


@pytest.mark.parametrize("tag", TAGS)
def test_version_1_converts_to_differences(tag, tmp_path):
    base, trained, path = fixture(tag)
    with pytest.raises(ValueError, match="to_difference"):
        combine_deltas([path])
    converted = to_difference(path, os.path.join(FIXTURES, f"base_{tag}.safetensors"))
    assert converted.metadata["version"] == "3" and converted.kind == "difference" and converted.base
    assert converted.metadata["converted_from_version"] == "1" and converted.metadata["task"] == "fixture"
    save_delta(tmp_path / "v2.safetensors", converted)
    model = mlp(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_delta(model, tmp_path / "v2.safetensors")
    assert_state(model, trained)
    with pytest.raises(ValueError, match="another base"):  # now the base is checked
        apply_delta(mlp(trained), converted)
    with pytest.raises(ValueError, match="already stores differences"):
        to_difference(converted, base)


def test_version_1_round_trips_as_version_1(tmp_path):
    _, _, path = fixture("float32")
    delta = load_delta(path)
    save_delta(tmp_path / "again.safetensors", delta)
    again = load_delta(tmp_path / "again.safetensors")
    assert again.metadata == delta.metadata
    for name in delta.indices:
        assert torch.equal(again.indices[name], delta.indices[name])
        assert torch.equal(again.values[name], delta.values[name])


def test_version_1_user_keys_that_version_2_reserves_are_still_read(tmp_path):
    """Version 1 reserved only format and version: a user key such as "kind" stays the user's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, trained, path = fixture("float32")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({"kind": "chat", "base_fingerprint": "mine", "modules": "q_proj"})
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    delta = load_delta(tmp_path / "old.safetensors")
    assert delta.kind == "absolute" and delta.modules == {}
    model = mlp(base)
    apply_delta(model, delta, check_base=False)
    assert_state(model, trained)
