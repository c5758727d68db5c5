"""Attack suite for step() and select(): every refused input leaves the optimizer exactly as it was.

Hypothesis generates the attacks by kind (wrong types; NaN, infinite, negative and huge values;
wrong shapes, dtypes, devices and layouts; params edited, resized or moved after selection;
options deleted or edited in a group; optimizer state entries deleted or replaced), against
small optimizers in every state they can be met in (before selection, selected, bf16 with master
copies, fp16 without, re-selecting, lean with pending compact gradients, 8-bit moments, an empty
group). Each property asserts that the call raises ``ValueError``/``TypeError`` and that a
complete snapshot (`attack_support.snapshot`) is unchanged. The default run is derandomized and
small; ``-m slow`` runs the same properties with many more examples.

A table in torch.optim's error-test style then runs named cases on both backends and checks that
the optimizer, once the bad edit is undone, steps exactly like an untouched copy.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from attack_support import (
    BAD_OPTIONS, BAD_STEPS, CONFIGS, INF, NAN, REFUSED, assert_same, backward, base,
    property_tests, refusal_kind, set_grads, snapshot,
)
from hypothesis import currently_in_test_context, event
from hypothesis import strategies as st

SELECTED = [c for c in CONFIGS if c != "fresh"]


def _ready(data, configs) -> tuple:
    """(optimizer, op): a base setup with valid gradients, made the way its training loop makes
    them, and the call under attack. select() refuses lean mode's pending compact gradients
    (tested separately), so for select() they are dropped and dense gradients set."""
    config = data.draw(st.sampled_from(configs), label="config")
    op = data.draw(st.sampled_from(["step", "select"]), label="op")
    opt = base(config)
    (backward if opt.lean else set_grads)(opt, 7)
    if op == "select" and opt.lean:
        opt.zero_grad()
        set_grads(opt, 3)
    return opt, op


def _refused(opt, op: str, *args, match: str | None = None) -> None:
    """``op`` raises ValueError/TypeError and changes nothing; the message names what is wrong."""
    before = snapshot(opt)
    with pytest.raises(REFUSED) as info:
        getattr(opt, op)(*args)
    if currently_in_test_context():
        event(f"{op}: {refusal_kind(info.value)}")
    assert_same(before, snapshot(opt))
    if match is not None:
        assert re.search(match, str(info.value)), (match, str(info.value))


# ----------------------------------------------------------------------------------------------
# Property 1: options edited in a group (or deleted) are refused by step() and select()
# ----------------------------------------------------------------------------------------------


def _group_edit_property(data) -> None:
    opt, op = _ready(data, CONFIGS)
    i = data.draw(st.integers(0, len(opt.param_groups) - 1), label="group")
    key = data.draw(st.sampled_from(sorted(BAD_OPTIONS)), label="option")
    if data.draw(st.integers(0, 4), label="delete") == 0:
        del opt.param_groups[i][key]
    else:
        opt.param_groups[i][key] = data.draw(BAD_OPTIONS[key], label="value")
    _refused(opt, op, match=f"param group {i}")


test_group_edits_change_nothing, test_group_edits_change_nothing_many = (
    property_tests(_group_edit_property))


# ----------------------------------------------------------------------------------------------
# Property 2: params and gradients that no longer fit
# ----------------------------------------------------------------------------------------------


def _other_shape(data, shape: torch.Size, same_numel_ok: bool) -> tuple[int, ...]:
    numel = math.prod(shape)
    return data.draw(
        st.lists(st.integers(1, 9), max_size=3).map(tuple).filter(
            lambda s: tuple(s) != tuple(shape) and (same_numel_ok or math.prod(s) != numel)
        ),
        label="shape",
    )


def _swap_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Give ``p`` a gradient torch would not let one assign (by swapping its data around it)."""
    data = p.data
    p.data = torch.empty(grad.shape, dtype=grad.dtype)
    p.grad = grad
    p.data = data


PARAM_ATTACKS = (
    "grad_sparse", "grad_float64", "grad_shape", "grad_nan_at_selection", "param_resized",
    "param_float64", "param_non_contiguous", "param_replaced_by_meta", "param_to_bf16",
    "param_appended", "param_in_two_groups", "non_tensor_param", "params_not_a_list",
)


def _param_attack(data, opt, attack: str, op: str) -> str | None:
    """Apply one attack; returns a word the refusal's message must contain, or None where the
    edit is valid for ``op`` in this state (select() re-selects a resized or retyped param, and
    a param put into a group directly; before selection, so does step())."""
    groups = opt.param_groups
    i = data.draw(st.integers(0, len(groups) - 1), label="group")
    if not groups[i]["params"]:
        i = 0
    params = groups[i]["params"]
    selected = "steps_since_selection" in groups[i]
    strict = selected and op == "step"  # a step reads the old selection; select() replaces it
    j = data.draw(st.integers(0, len(params) - 1), label="param")
    p = params[j]
    if attack == "grad_sparse":
        p.grad = torch.zeros_like(p).to_sparse()
        return "sparse"
    if attack == "grad_float64":
        _swap_grad(p, torch.zeros(p.shape, dtype=torch.float64))
        return "dtype"
    if attack == "grad_shape":
        _swap_grad(p, torch.zeros(_other_shape(data, p.shape, same_numel_ok=True), dtype=p.dtype))
        return "shape"
    if attack == "grad_nan_at_selection":
        reselect = groups[i]["reselect_every"] is not None
        if op == "step" and selected and not reselect:
            return _param_attack(data, opt, "grad_sparse", op)  # (a step would not select)
        bad = data.draw(st.sampled_from([NAN, INF, -INF]), label="bad")
        if op == "step" and selected:  # a due re-selection scores the accumulated gradient
            accum = opt.state[p]["grad_accum"]
            accum[data.draw(st.integers(0, accum.numel() - 1), label="at")] = bad
            groups[i]["steps_since_selection"] = groups[i]["reselect_every"]
            return "NaN/infinite"
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        grad.view(-1)[data.draw(st.integers(0, p.numel() - 1), label="at")] = bad
        p.grad = grad
        return "NaN/infinite"
    if attack == "param_resized":
        p.data = torch.zeros(_other_shape(data, p.shape, same_numel_ok=False), dtype=p.dtype)
        p.grad = torch.ones_like(p) if p.requires_grad else None
        return "resized" if strict else None
    if attack == "param_float64":
        p.data = p.data.double()
        return "float64"
    if attack == "param_non_contiguous":
        if p.dim() < 2:
            p.data = torch.zeros(2 * p.numel() + 2, dtype=p.dtype)[::2][: max(p.numel(), 2)]
        else:
            p.data = p.data.transpose(0, 1).contiguous().transpose(0, 1)
        return "non-contiguous"
    if attack == "param_replaced_by_meta":
        params[j] = torch.zeros(p.shape, dtype=p.dtype, device="meta",
                                              requires_grad=True)
        return "meta"
    if attack == "param_to_bf16":
        if p.dtype != torch.float32:
            p.data = p.data.double()
            return "float64"
        p.data = p.data.to(torch.bfloat16)
        if p.grad is not None:
            _swap_grad(p, p.grad.to(torch.bfloat16))
        return "master copy" if strict and groups[i]["master_weights"] is not False else None
    if attack == "param_appended":
        extra = torch.zeros(4, requires_grad=True)
        extra.grad = torch.ones(4)
        params.append(extra)
        return "add_param_group" if strict else None
    if attack == "param_in_two_groups":
        k = (i + 1) % len(groups)
        groups[k]["params"].append(p)
        return "also in param group" if k != i else "twice"
    if attack == "non_tensor_param":
        params.append(data.draw(st.sampled_from([1.0, None, "w", [torch.zeros(2)]])))
        return "tensors"
    if attack == "params_not_a_list":
        groups[i]["params"] = tuple(params)
        return "list"
    raise AssertionError(attack)


def _param_property(data) -> None:
    opt, op = _ready(data, CONFIGS)
    attack = data.draw(st.sampled_from(PARAM_ATTACKS), label="attack")
    word = _param_attack(data, opt, attack, op)
    if word is None:  # a valid edit in this state: it must go through
        getattr(opt, op)()
        return
    _refused(opt, op, match=word)


test_param_and_grad_attacks_change_nothing, test_param_and_grad_attacks_change_nothing_many = (
    property_tests(_param_property))


# ----------------------------------------------------------------------------------------------
# Property 3: optimizer state edited so that it no longer fits
# ----------------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
ALLOWED = {
    "indices": {torch.int32, torch.int64},
    "exp_avg": {torch.float32, torch.uint8},
    "exp_avg_sq": {torch.float32, torch.uint8},
}
def _state_attack(data, opt) -> tuple[str, str]:
    params = [p for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
    p = data.draw(st.sampled_from(params), label="param")
    st_ = opt.state[p]
    key = data.draw(st.sampled_from(sorted(st_)), label="key")
    value = st_[key]
    kind = data.draw(st.sampled_from(["delete", "dtype", "shape", "device", "strided", "type"]),
                     label="kind")
    if key == "step":
        if kind == "delete":
            del st_[key]
        else:
            st_[key] = data.draw(BAD_STEPS, label="step")
        return key, kind
    if kind == "delete":
        del st_[key]
    elif kind == "dtype":
        allowed = ALLOWED.get(key, {torch.float32})
        dtype = data.draw(st.sampled_from([d for d in ALL_DTYPES if d not in allowed]))
        st_[key] = value.to(dtype)
    elif kind == "shape":
        n = value.numel()
        shape = data.draw(st.sampled_from([(n + 1,), (1, n), (n, 1)] + ([(n - 1,)] if n else [])))
        st_[key] = torch.zeros(shape, dtype=value.dtype)
    elif kind == "device":
        st_[key] = value.to("meta")
    elif kind == "strided":
        wide = torch.zeros(2 * value.numel(), dtype=value.dtype)
        wide[::2] = value
        st_[key] = wide[::2]
        if value.numel() <= 1:  # (a 0/1-element view is contiguous: make it wrong otherwise)
            st_[key] = torch.zeros((2, 1), dtype=value.dtype)[:, 0].unsqueeze(0)
    else:
        st_[key] = data.draw(st.sampled_from([None, 1.0, [0], "indices", value.tolist()]))
    return key, kind


def _valid_for_select(key: str, kind: str) -> bool:
    """select() replaces the state; it reads only what it carries over (indices, moments,
    master), and a missing selection or master copy just means nothing to carry."""
    return key in ("step", "grad_accum") or (kind == "delete" and key in ("indices", "master"))


def _state_property(data) -> None:
    opt, op = _ready(data, SELECTED)
    key, kind = _state_attack(data, opt)
    if op == "select" and _valid_for_select(key, kind):
        opt.select()
        return
    _refused(opt, op, match="indices|exp_avg" if key == "indices" else key)


test_unfitting_state_changes_nothing, test_unfitting_state_changes_nothing_many = (
    property_tests(_state_property))


# ----------------------------------------------------------------------------------------------
# Property 4: select(gradients=...) with a mapping that does not fit
# ----------------------------------------------------------------------------------------------


def _mapping_property(data) -> None:
    config = data.draw(st.sampled_from(["fresh", "fp32", "bf16", "reselect"]), label="config")
    opt = base(config)
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = {p: torch.randn(p.shape) for p in params}
    p = data.draw(st.sampled_from(params), label="param")
    kind = data.draw(st.sampled_from(
        ["foreign_key", "string_key", "shape", "sparse", "float64", "int", "not_tensor",
         "not_mapping", "nan"]), label="kind")
    if kind == "foreign_key":
        grads[torch.zeros(p.shape)] = torch.ones(p.shape)
    elif kind == "string_key":
        grads["weight"] = torch.ones(p.shape)
    elif kind == "shape":
        grads[p] = torch.ones(_other_shape(data, p.shape, same_numel_ok=True))
    elif kind == "sparse":
        grads[p] = torch.ones(p.shape).to_sparse()
    elif kind == "float64":
        grads[p] = torch.ones(p.shape, dtype=torch.float64)
    elif kind == "int":
        grads[p] = torch.ones(p.shape, dtype=torch.int64)
    elif kind == "not_tensor":
        grads[p] = data.draw(st.sampled_from([None, 1.0, [1.0], "g"]))
        if grads[p] is None:  # None means "no gradient", which is valid: use something else
            grads[p] = 0
    elif kind == "not_mapping":
        grads = list(grads.values())
    else:
        grads[p].view(-1)[data.draw(st.integers(0, p.numel() - 1))] = data.draw(
            st.sampled_from([NAN, INF, -INF]))
    _refused(opt, "select", grads)


test_bad_gradient_mappings_change_nothing, test_bad_gradient_mappings_change_nothing_many = (
    property_tests(_mapping_property))


# ----------------------------------------------------------------------------------------------
# A table, torch.optim style, on both backends: refused, unchanged, and fine once undone
# ----------------------------------------------------------------------------------------------


def _edit_option(key, value):
    def edit(opt):
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        return lambda: opt.param_groups[0].__setitem__(key, old)
    return edit


def _resize_first_param(opt):
    p = opt.param_groups[0]["params"][0]
    old = p.data
    p.data = torch.zeros(p.numel() - 1, dtype=p.dtype)
    p.grad = torch.ones_like(p)

    def undo():
        p.data = old
        p.grad = None
        set_grads(opt, 11)
    return undo


def _step_minus_one(opt):
    st_ = opt.state[opt.param_groups[0]["params"][1]]
    old = st_["step"]
    st_["step"] = torch.tensor(-1.0)
    return lambda: st_.__setitem__("step", old)


def _moments_on_meta(opt):
    st_ = opt.state[opt.param_groups[-1]["params"][-1]]
    old = st_["exp_avg_sq"]
    st_["exp_avg_sq"] = old.to("meta")
    return lambda: st_.__setitem__("exp_avg_sq", old)


def _reselect_every_set_after_selection(opt):
    opt.param_groups[0]["reselect_every"] = 1
    return lambda: opt.param_groups[0].__setitem__("reselect_every", None)


ERROR_CASES = [
    # (description, edit returning undo, error, message)
    ("density edited to -3", _edit_option("density", -3), ValueError, "density"),
    ("density edited to 7", _edit_option("density", 7), ValueError, "density"),
    ("lr edited to inf", _edit_option("lr", INF), ValueError, "learning rate"),
    ("lr edited to nan", _edit_option("lr", NAN), ValueError, "learning rate"),
    ("lr edited to a tensor", _edit_option("lr", torch.tensor(0.1)), TypeError, "learning rate"),
    ("betas edited to (1, 1)", _edit_option("betas", (1, 1)), ValueError, "beta"),
    ("eps edited to inf", _edit_option("eps", INF), ValueError, "eps"),
    ("weight_decay edited to inf", _edit_option("weight_decay", INF), ValueError, "weight_decay"),
    ("weight_decay edited to 1e39", _edit_option("weight_decay", 1e39), ValueError, "weight_decay"),
    ("score edited to 'bogus'", _edit_option("score", "bogus"), ValueError, "score"),
    ("state_bits edited to 16", _edit_option("state_bits", 16), ValueError, "state_bits"),
    ("param resized after selection", _resize_first_param, ValueError, "resized"),
    ("a step counter of -1", _step_minus_one, ValueError, "step"),
    ("moments moved to another device", _moments_on_meta, ValueError, "exp_avg_sq"),
    ("reselect_every set after selection", _reselect_every_set_after_selection, ValueError,
     "grad_accum"),
]


@pytest.mark.parametrize("description, edit, error, message", ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_error_table(backend, description, edit, error, message) -> None:
    opt = base("fp32", backend)
    twin = copy.deepcopy(opt)
    set_grads(opt, 11)
    undo = edit(opt)
    before = snapshot(opt)
    with pytest.raises(error, match=message):
        opt.step()
    assert_same(before, snapshot(opt))
    # Undone, the optimizer steps exactly like a copy that never saw the bad input.
    undo()
    set_grads(twin, 11)
    opt.step()
    twin.step()
    assert_same(snapshot(twin), snapshot(opt))


def test_nan_score_at_selection_names_the_parameter(backend) -> None:
    opt = base("fresh", backend)
    set_grads(opt, 1)
    opt.param_groups[1]["params"][1].grad[0] = NAN
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"'c.weight' \(param group 1\).*NaN/infinite"):
        opt.step()
    assert_same(before, snapshot(opt))
    with pytest.raises(ValueError, match=r"'c.weight' \(param group 1\).*NaN/infinite"):
        opt.select()
    assert_same(before, snapshot(opt))


def test_lean_select_with_pending_compact_gradients_is_refused() -> None:
    opt = base("lean")
    _refused(opt, "select", match="zero_grad")


def test_edits_that_are_valid_still_work(backend) -> None:
    """Accepted edits: the refusals above are not over-eager."""
    opt = base("fp32", backend)
    opt.param_groups[0]["betas"] = [0.8, 0.9]  # a list is a pair too
    opt.param_groups[0]["lr"] = np.float64(1e-3)  # numpy reals are reals
    opt.param_groups[1]["state_bits"] = 8  # takes effect at the next selection
    opt.param_groups[0]["initial_lr"] = 1e-2  # LR schedulers add keys
    p = opt.param_groups[0]["params"][0]
    p.data = p.data.reshape(-1)  # same entries, another shape: flat indices still fit
    set_grads(opt, 2)
    opt.step()
    assert opt.param_groups[0]["steps_since_selection"] == 3
