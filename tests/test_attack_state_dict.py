"""Attack suite for load_state_dict: a refused checkpoint changes neither the optimizer nor the dict.

Hypothesis takes a valid checkpoint of a small optimizer in one of its states (before selection,
selected, bf16 master copies, fp16 without, re-selecting, lean, 8-bit moments, an empty group)
and breaks it by kind: its structure (missing, extra or wrongly typed top-level keys), its
groups (wrong count, missing, duplicate or unhashable param ids, every option deleted or given a
bad value, a bad selection counter or names, another state layout) and its state entries
(unknown param ids and keys, missing keys, indices unsorted, duplicated, out of range, of a float
or narrow dtype or the wrong rank; moments, master copies, absmax and accumulators with NaN, inf,
negative values, wrong dtypes, shapes or layouts; step counters negative, fractional, non-finite
or of the wrong type). Every load must raise ``ValueError``/``TypeError``, leave the optimizer's
complete snapshot unchanged, and leave the caller's dict as it was.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from attack_support import (
    BAD_OPTIONS,
    BAD_STEPS,
    CONFIGS,
    FAST,
    INF,
    NAN,
    REFUSED,
    assert_same,
    backward,
    base,
    property_tests,
    record,
    refusal_kind,
    set_grads,
    snapshot,
)
from hypothesis import event, given
from hypothesis import strategies as st

from gallop_kernels import SparseAdamW
from gallop_kernels.ops.adamw import quantization
from gallop_kernels.optim.checkpoint import LEGACY_OPTION_DEFAULTS, STATE_KEYS
from gallop_kernels.optim.selection import moments_fp32

WRONG_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8,
                torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]


def _checkpoint(opt: SparseAdamW) -> dict:
    """The optimizer's state_dict as a file would give it back (independent tensors)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _entries(sd: dict) -> list:
    return [key for key, value in sd["state"].items() if value]


# ----------------------------------------------------------------------------------------------
# Mutations, by kind
# ----------------------------------------------------------------------------------------------


def _break_structure(data, sd: dict):
    kind = data.draw(st.sampled_from(
        ["drop_state", "drop_groups", "extra_key", "state_not_dict", "groups_not_list",
         "group_not_dict", "not_a_mapping"]), label="structure")
    if kind == "drop_state":
        del sd["state"]
    elif kind == "drop_groups":
        del sd["param_groups"]
    elif kind == "extra_key":
        sd[data.draw(st.sampled_from(["optimizer", "model", 0, "State"]))] = {}
    elif kind == "state_not_dict":
        sd["state"] = data.draw(st.sampled_from([[], None, list(sd["state"].values()), "state"]))
    elif kind == "groups_not_list":
        sd["param_groups"] = data.draw(st.sampled_from([None, {}, "groups", sd["param_groups"][0]]))
    elif kind == "group_not_dict":
        sd["param_groups"][0] = data.draw(st.sampled_from([None, [], "group", (0,)]))
    else:
        return data.draw(st.sampled_from([None, [], "optimizer.pt", list(sd.items())]))
    return sd


def _break_group(data, sd: dict, opt: SparseAdamW):
    groups = sd["param_groups"]
    i = data.draw(st.integers(0, len(groups) - 1), label="group")
    group = groups[i]
    kind = data.draw(st.sampled_from(
        ["count", "ids", "option", "delete_option", "counter", "names", "layout"]), label="kind")
    if kind == "count":
        if data.draw(st.booleans()) and len(groups) > 1:
            groups.pop()
        else:
            groups.append(copy.deepcopy(group))
    elif kind == "ids":
        how = data.draw(st.sampled_from(["drop", "add", "duplicate", "unhashable", "bool", "other"]))
        if how == "drop" or (how in ("duplicate", "unhashable", "bool", "other")
                             and not group["params"]):
            if group["params"]:
                group["params"].pop()
            else:
                group["params"].append(10_000)
        elif how == "add":
            group["params"].append(10_000)
        elif how == "duplicate":
            other = groups[data.draw(st.integers(0, len(groups) - 1))]["params"]
            if other and other[0] not in group["params"]:
                group["params"][-1] = other[0]
            else:
                group["params"].append(group["params"][0])
        elif how == "unhashable":
            group["params"][0] = [group["params"][0]]
        elif how == "bool":
            group["params"][0] = True
        else:
            group["params"] = "0, 1"
    elif kind == "option":
        key = data.draw(st.sampled_from(sorted(BAD_OPTIONS)), label="option")
        group[key] = data.draw(BAD_OPTIONS[key], label="value")
    elif kind == "delete_option":
        legacy = set(LEGACY_OPTION_DEFAULTS)  # (a checkpoint older than these options has none)
        key = data.draw(st.sampled_from(sorted(set(BAD_OPTIONS) - legacy)), label="option")
        del group[key]
    elif kind == "counter":
        if "steps_since_selection" in group:
            bad = st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True),
                            st.sampled_from(["1", None, True, [1], torch.tensor(1)]))
            if data.draw(st.booleans(), label="delete") and any(
                    sd["state"].get(key) for key in group["params"]):
                del group["steps_since_selection"]  # state without a selection
            else:
                group["steps_since_selection"] = data.draw(bad, label="counter")
        elif group["params"]:
            group["steps_since_selection"] = 0  # a selection without state
        else:
            group["steps_since_selection"] = -1
    elif kind == "names":
        group["param_names"] = data.draw(st.sampled_from(
            [["only-one"] * (len(group["params"]) + 1), [1] * len(group["params"]) or [1],
             "names", None]))
    else:  # another layout, without convert_layout=True
        if data.draw(st.booleans(), label="bits"):
            group["state_bits"] = 32 if group["state_bits"] == 8 else 8
        else:
            group["master_weights"] = data.draw(st.sampled_from(
                [m for m in ("auto", True, False) if m != group["master_weights"]]))
    return sd


def _break_entry(data, sd: dict, opt: SparseAdamW):
    entries = _entries(sd)
    kind = data.draw(st.sampled_from(
        ["unknown_id", "not_dict", "unknown_key", "delete", "indices", "values", "step",
         "unselected_state", "extra_master"] if entries else ["unknown_id", "unselected_state"]),
        label="kind")
    if kind == "unknown_id":
        sd["state"][data.draw(st.sampled_from([10_000, -1, "0", (0,)]))] = (
            copy.deepcopy(sd["state"][entries[0]]) if entries else {"step": torch.tensor(1.0)})
        return sd
    if kind == "unselected_state":
        group = next((g for g in sd["param_groups"]
                      if "steps_since_selection" not in g and g["params"]), None)
        if group is None:  # every group has selected: a param of a selected group without state
            key = entries[0]
            del sd["state"][key]
            return sd
        sd["state"][group["params"][0]] = {"step": torch.tensor(1.0),
                                           "indices": torch.tensor([0], dtype=torch.int32),
                                           "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}
        return sd
    key = data.draw(st.sampled_from(entries), label="param id")
    entry = sd["state"][key]
    k = entry["indices"].numel()
    if kind == "not_dict":
        sd["state"][key] = data.draw(st.sampled_from([None, [], torch.zeros(k), "state"]))
    elif kind == "unknown_key":
        name = data.draw(st.text(max_size=10).filter(lambda s: s not in STATE_KEYS)
                         | st.sampled_from(["momentum_buffer", "exp_avg ", "Step", 0]))
        entry[name] = torch.zeros(k)
    elif kind == "delete":
        entry.pop(data.draw(st.sampled_from(sorted(entry)), label="key"))
    elif kind == "indices":
        _break_indices(data, entry)
    elif kind == "values":
        _break_values(data, entry)
    elif kind == "step":
        entry["step"] = data.draw(BAD_STEPS, label="step")
    else:  # a master copy where the layout has none, or none where it has one
        if "master" in entry:
            del entry["master"]
        else:
            entry["master"] = torch.zeros(k)
    return sd


def _break_indices(data, entry: dict) -> None:
    idx = entry["indices"]
    k = idx.numel()
    kinds = ["out_of_range", "negative", "float", "narrow", "rank", "not_tensor", "sparse"]
    kinds += ["unsorted", "duplicate"] if k >= 2 else []
    kind = data.draw(st.sampled_from(kinds), label="indices")
    if kind in ("out_of_range", "negative") and k == 0:
        kind = "rank"
    new = idx.clone()
    if kind == "unsorted":
        a, b = sorted(data.draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2,
                                         unique=True)))
        new[a], new[b] = idx[b], idx[a]
    elif kind == "duplicate":
        j = data.draw(st.integers(1, k - 1))
        new[j] = new[j - 1]
    elif kind == "out_of_range":
        new[data.draw(st.integers(0, k - 1))] = data.draw(
            st.integers(min_value=10_000, max_value=2**31 - 1))
    elif kind == "negative":
        new[data.draw(st.integers(0, k - 1))] = data.draw(st.integers(-(2**31), -1))
    elif kind == "float":
        new = idx.to(data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16])))
    elif kind == "narrow":
        new = idx.to(data.draw(st.sampled_from([torch.int16, torch.int8, torch.uint8, torch.bool])))
    elif kind == "rank":
        new = idx.reshape(1, -1) if k != 1 or data.draw(st.booleans()) else idx.reshape(())
    elif kind == "not_tensor":
        new = idx.tolist()
    else:
        new = idx.to_sparse()
    entry["indices"] = new


def _break_values(data, entry: dict) -> None:
    key = data.draw(st.sampled_from(sorted(set(entry) - {"indices", "step"})), label="key")
    value = entry[key]
    kinds = ["dtype", "shape", "not_tensor"]
    if value.dtype == torch.float32 and value.numel():
        kinds += ["non_finite"]
        if key in ("exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            kinds += ["negative"]
    kind = data.draw(st.sampled_from(kinds), label="values")
    if kind == "non_finite":
        new = value.clone()
        new[data.draw(st.integers(0, value.numel() - 1))] = data.draw(st.sampled_from([NAN, INF,
                                                                                      -INF]))
    elif kind == "negative":
        new = value.clone()
        new[data.draw(st.integers(0, value.numel() - 1))] = -data.draw(
            st.floats(min_value=1e-30, max_value=1e30))
    elif kind == "dtype":
        allowed = {torch.float32, torch.uint8} if key in ("exp_avg", "exp_avg_sq") else {
            torch.float32}
        if key in ("exp_avg", "exp_avg_sq") and value.dtype == torch.float32:
            allowed = {torch.float32}  # (uint8 next to a float32 partner is a mismatch)
        new = value.to(data.draw(st.sampled_from([d for d in WRONG_DTYPES if d not in allowed])))
        if new.dtype == torch.uint8 and key in ("exp_avg", "exp_avg_sq") and value.dtype == \
                torch.uint8:
            new = value.float()
    elif kind == "shape":
        n = value.numel()
        shape = data.draw(st.sampled_from([(n + 1,), (1, n), (n, 1)] + ([(n - 1,)] if n else [])))
        new = torch.zeros(shape, dtype=value.dtype)
    else:
        new = data.draw(st.sampled_from([None, 0.0, value.tolist(), "values"]))
    entry[key] = new


# ----------------------------------------------------------------------------------------------
# The property
# ----------------------------------------------------------------------------------------------


def _load_is_refused(opt: SparseAdamW, sd) -> None:
    before, given_dict = snapshot(opt), record(sd)
    with pytest.raises(REFUSED) as info:
        opt.load_state_dict(sd)
    event(refusal_kind(info.value))
    assert_same(before, snapshot(opt))
    assert_same(given_dict, record(sd))  # the caller's checkpoint is not modified either


def _state_dict_property(data) -> None:
    config = data.draw(st.sampled_from(CONFIGS), label="config")
    opt = base(config)
    sd = _checkpoint(opt)
    part = data.draw(st.sampled_from(["structure", "group", "entry"]), label="part")
    if part == "structure":
        sd = _break_structure(data, sd)
    elif part == "group":
        sd = _break_group(data, sd, opt)
    else:
        sd = _break_entry(data, sd, opt)
    _load_is_refused(opt, sd)


test_broken_checkpoints_change_nothing, test_broken_checkpoints_change_nothing_many = (
    property_tests(_state_dict_property))


# ----------------------------------------------------------------------------------------------
# What must still load: the valid variants of a checkpoint, exactly
# ----------------------------------------------------------------------------------------------


def _rewrite(data, sd: dict) -> dict:
    """A checkpoint that means the same: old plain-number steps, list betas, int64 indices,
    scheduler keys, no state_bits or min_8bit_entries (an older checkpoint), empty entries."""
    for group in sd["param_groups"]:
        if data.draw(st.booleans(), label="list betas"):
            group["betas"] = list(group["betas"])
        if data.draw(st.booleans(), label="scheduler key"):
            group["initial_lr"] = group["lr"]
        for key, value in LEGACY_OPTION_DEFAULTS.items():
            if group[key] == value and data.draw(st.booleans(), label=f"no {key}"):
                del group[key]
        if "steps_since_selection" not in group:
            for key in group["params"]:
                if data.draw(st.booleans(), label="empty entry"):
                    sd["state"][key] = {}
        if data.draw(st.booleans(), label="no param_shapes (an older checkpoint)"):
            del group["param_shapes"]
    for entry in sd["state"].values():
        if not entry:
            continue
        step = int(entry["step"])
        entry["step"] = data.draw(st.sampled_from([step, float(step), torch.tensor(step),
                                                   torch.tensor([float(step)])]), label="step")
        if data.draw(st.booleans(), label="int64 indices"):
            entry["indices"] = entry["indices"].to(torch.int64)
    return sd


def _valid_rewrite_property(data) -> None:
    config = data.draw(st.sampled_from(CONFIGS), label="config")
    opt = base(config)
    twin = copy.deepcopy(opt)
    sd = _rewrite(data, _checkpoint(opt))
    fresh = copy.deepcopy(opt)
    fresh.load_state_dict(sd)
    for p_twin, p_fresh in zip(*(
            [p for g in o.param_groups for p in g["params"]] for o in (twin, fresh))):
        st_twin, st_fresh = twin.state.get(p_twin, {}), fresh.state.get(p_fresh, {})
        assert st_twin.keys() == st_fresh.keys()
        for key in st_twin:
            a, b = st_twin[key], st_fresh[key]
            if key == "indices":
                assert torch.equal(a.to(torch.int64), b.to(torch.int64))
            else:
                assert a.dtype == b.dtype == torch.float32 if key == "step" else a.dtype == b.dtype
                assert torch.equal(a, b), key
    # and both continue identically (a load drops lean mode's pending compact gradients, which
    # were gathered for the selection it replaces: drop the twin's too)
    for o in (twin, fresh):
        o.zero_grad()
    for o in (twin, fresh):
        (backward if o.lean else set_grads)(o, 123)
        o.step()
    for p_twin, p_fresh in zip(*(
            [p for g in o.param_groups for p in g["params"]] for o in (twin, fresh))):
        assert torch.equal(p_twin, p_fresh)


@FAST
@given(data=st.data())
def test_checkpoints_that_mean_the_same_load_exactly(data) -> None:
    _valid_rewrite_property(data)


# ----------------------------------------------------------------------------------------------
# Tables (both backends): the kinds named in issue reports, and the layout opt-in
# ----------------------------------------------------------------------------------------------


def _set_entry(key, value):
    def edit(sd):
        sd["state"][_entries(sd)[0]][key] = value
    return edit


def _set_group(key, value):
    def edit(sd):
        sd["param_groups"][0][key] = value
    return edit


def _poison(key, value, at=0):
    def edit(sd):
        sd["state"][_entries(sd)[0]][key][at] = value
    return edit


LOAD_ERROR_CASES = [
    ("step of -1", _set_entry("step", torch.tensor(-1.0)), "step"),
    ("step of nan", _set_entry("step", NAN), "step"),
    ("lr nan", _set_group("lr", NAN), "learning rate"),
    ("lr inf", _set_group("lr", INF), "learning rate"),
    ("density 7", _set_group("density", 7), "density"),
    ("score bogus", _set_group("score", "bogus"), "score"),
    ("betas (1, 1)", _set_group("betas", (1, 1)), "beta"),
    ("NaN moment", _poison("exp_avg", NAN), "exp_avg"),
    ("negative exp_avg_sq", _poison("exp_avg_sq", -1.0), "exp_avg_sq"),
    ("float indices", lambda sd: _set_entry("indices", sd["state"][_entries(sd)[0]]["indices"]
                                            .float())(sd), "indices"),
    ("bf16 moments", lambda sd: _set_entry("exp_avg", sd["state"][_entries(sd)[0]]["exp_avg"]
                                           .bfloat16())(sd), "exp_avg"),
    ("unknown state key", _set_entry("momentum_buffer", torch.zeros(1)), "unknown state key"),
    ("unknown top-level key", lambda sd: sd.__setitem__("extra", 1), "extra"),
    ("8-bit layout", _set_group("state_bits", 8), "convert_layout"),
]


@pytest.mark.parametrize("description, edit, message", LOAD_ERROR_CASES,
                         ids=[c[0] for c in LOAD_ERROR_CASES])
def test_load_error_table(backend, description, edit, message) -> None:
    opt = base("fp32", backend)
    sd = _checkpoint(opt)
    edit(sd)
    before = snapshot(opt)
    with pytest.raises(REFUSED, match=message):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt))


def _layout_case(state_bits_saved, state_bits_now, dtype_saved, dtype_now, master_now="auto"):
    params = [torch.randn(80, 60).to(dtype_saved).requires_grad_(), torch.randn(9).to(
        dtype_saved).requires_grad_()]
    saved = SparseAdamW(params, lr=1e-2, density=0.9, state_bits=state_bits_saved,
                        backend="torch")
    for seed in range(2):
        set_grads(saved, seed)
        saved.step()
    sd = _checkpoint(saved)
    now_params = [p.detach().to(dtype_now).requires_grad_() for p in params]
    now = SparseAdamW(now_params, lr=1e-2, density=0.9, state_bits=state_bits_now,
                      master_weights=master_now, backend="torch")
    return saved, sd, now


@pytest.mark.parametrize("bits_saved, bits_now", [(8, 32), (32, 8)])
def test_a_state_bits_change_needs_convert_layout(bits_saved, bits_now) -> None:
    saved, sd, now = _layout_case(bits_saved, bits_now, torch.float32, torch.float32)
    before = snapshot(now)
    with pytest.raises(ValueError, match="state_bits.*convert_layout=True"):
        now.load_state_dict(sd)
    assert_same(before, snapshot(now))
    now.load_state_dict(sd, convert_layout=True)
    assert now.param_groups[0]["state_bits"] == bits_now
    big_saved, big_now = (o.param_groups[0]["params"][0] for o in (saved, now))
    st_now = now.state[big_now]
    assert st_now["exp_avg"].dtype == (torch.uint8 if bits_now == 8 else torch.float32)
    for a, b, signed in zip(moments_fp32(saved.state[big_saved]), moments_fp32(st_now),
                            (True, False)):
        if bits_now == 8:  # quantized as the optimizer itself quantizes
            a = quantization.dequantize_blockwise(*quantization.quantize_blockwise(a, signed), signed)
        assert torch.equal(a, b)
    set_grads(now, 5)
    now.step()


def test_a_master_copy_change_needs_convert_layout() -> None:
    # bf16 checkpoint (with master copies) into an fp32 model: master copies would be unused
    _, sd, now = _layout_case(32, 32, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="master copy.*convert_layout=True"):
        now.load_state_dict(sd)
    now.load_state_dict(sd, convert_layout=True)
    assert all("master" not in st for st in now.state.values())
    # fp32 checkpoint into a bf16 model: master copies are made from the params' values
    _, sd, now = _layout_case(32, 32, torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="no float32 master copy"):
        now.load_state_dict(sd)
    now.load_state_dict(sd, convert_layout=True)
    for p in now.param_groups[0]["params"]:
        st_ = now.state[p]
        assert torch.equal(st_["master"], p.detach().reshape(-1)[st_["indices"].long()].float())
    set_grads(now, 5)
    now.step()
    # master_weights itself is a layout option
    _, sd, now = _layout_case(32, 32, torch.float32, torch.float32, master_now=True)
    with pytest.raises(ValueError, match="master_weights.*convert_layout=True"):
        now.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# Load hooks, as torch.optim.Optimizer runs them
# ----------------------------------------------------------------------------------------------


def test_load_pre_hook_edits_are_loaded_and_post_hook_sees_the_state(backend) -> None:
    opt = base("fp32", backend)
    sd = _checkpoint(opt)
    fresh = base("fresh", backend)
    seen = []

    def pre_in_place(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.125

    def pre_returning(optimizer, state_dict):
        new = dict(state_dict)
        new["param_groups"] = copy.deepcopy(state_dict["param_groups"])
        new["param_groups"][1]["weight_decay"] = 0.5
        return new

    def post(optimizer):
        seen.append((optimizer.num_selected, optimizer.param_groups[0]["lr"]))

    fresh.register_load_state_dict_pre_hook(pre_in_place)
    fresh.register_load_state_dict_pre_hook(pre_returning)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 0.125
    assert fresh.param_groups[1]["weight_decay"] == 0.5
    assert seen == [(opt.num_selected, 0.125)]


def test_a_pre_hook_that_breaks_the_checkpoint_is_refused(backend) -> None:
    opt = base("fp32", backend)
    sd = _checkpoint(opt)
    calls = []
    opt.register_load_state_dict_pre_hook(
        lambda o, s: {**s, "param_groups": [{**g, "density": -1} for g in s["param_groups"]]})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(1))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="density"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt))
    assert calls == []  # the post-hook runs only after a load


def test_torch_semantics_kept_for_options_and_names() -> None:
    """As torch: the checkpoint's hyper-parameters win; its param_names too, when it has them
    (names that differ only by wrappers' components, such as DDP's ``module.``); names that
    differ otherwise are another model's params and are refused (issue 17, case 3)."""
    opt = base("fp32")
    sd = _checkpoint(opt)
    sd["param_groups"][0]["lr"] = 0.25
    sd["param_groups"][0]["param_names"] = ["module.a.weight", "_orig_mod.a.bias"]
    fresh = base("fp32")
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.param_groups[0]["lr"] == 0.25
    assert fresh.param_groups[0]["param_names"] == ["module.a.weight", "_orig_mod.a.bias"]
    assert fresh.param_groups[0]["params"] is not None
    sd["param_groups"][0]["param_names"] = ["a.bias", "a.weight"]
    fresh = base("fp32")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="param 'a.bias' stands where this optimizer has 'a.weight'"):
        fresh.load_state_dict(sd)
    assert_same(before, snapshot(fresh))


def test_weights_only_checkpoint_keeps_state_dtypes() -> None:
    opt = base("bf16")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)  # plain tensors and values only
    fresh = base("bf16")
    fresh.load_state_dict(sd)
    for p in fresh.param_groups[0]["params"]:
        assert fresh.state[p]["indices"].dtype == torch.int32
        assert fresh.state[p]["master"].dtype == torch.float32
        assert fresh.state[p]["step"].device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# Issue 17, case 3: a checkpoint carries its params' shapes; one for other params is refused
# ----------------------------------------------------------------------------------------------


def _trained(shapes, named=True, steps=2, backend="torch", seed=0) -> SparseAdamW:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    given = [(f"t{i}", p) for i, p in enumerate(params)] if named else params
    opt = SparseAdamW(given, lr=1e-2, density=0.3, backend=backend)
    for i in range(steps):
        set_grads(opt, i)
        opt.step()
    return opt


def _refused_unchanged(opt: SparseAdamW, sd: dict, match: str) -> None:
    before, saved = snapshot(opt), record(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt))
    assert_same(saved, record(sd))


@pytest.mark.parametrize("target, match", [
    ([(4, 16), (4,)], r"shape \(4, 8\), not for this optimizer's 't0' .*, of shape \(4, 16\)"),  # Linear(8, 4) -> Linear(16, 4)
    ([(8, 4), (4,)], r"shape \(4, 8\), not for this optimizer's 't0' .*, of shape \(8, 4\)"),  # transposed, same numel
])
def test_a_checkpoint_for_other_shapes_is_refused(backend, target, match) -> None:
    sd = _checkpoint(_trained([(4, 8), (4,)], backend=backend))
    assert sd["param_groups"][0]["param_shapes"] == [[4, 8], [4]]
    _refused_unchanged(_trained(target, steps=0, backend=backend), sd, match)


def test_a_checkpoint_without_shapes_loads_where_its_selection_fits() -> None:
    """A checkpoint from before shapes were recorded: refused when its selection has another size
    than the group's density gives over this optimizer's entries (Linear(8, 4) into Linear(16, 4));
    one of the same params loads and continues exactly; a same-numel reshape cannot be told apart
    without shapes (documented) and loads."""
    sd = _checkpoint(_trained([(4, 8), (4,)], named=False))
    del sd["param_groups"][0]["param_shapes"]
    _refused_unchanged(_trained([(4, 16), (4,)], named=False, steps=0), copy.deepcopy(sd),
                       r"its selection holds 11 entries, but density 0.3 over this group's 68 entries selects 20")
    twin = _trained([(4, 8), (4,)], named=False)  # (the optimizer sd was saved from, and its params)
    same = _trained([(4, 8), (4,)], named=False, steps=0)
    with torch.no_grad():
        for a, b in zip(same.param_groups[0]["params"], twin.param_groups[0]["params"]):
            a.copy_(b)
    same.load_state_dict(copy.deepcopy(sd))
    for o in (same, twin):
        set_grads(o, 7)
        o.step()
    for a, b in zip(same.param_groups[0]["params"], twin.param_groups[0]["params"]):
        assert torch.equal(a.detach(), b.detach())
    _trained([(8, 4), (4,)], named=False, steps=0).load_state_dict(copy.deepcopy(sd))  # (the limit)


_SHAPE = st.lists(st.integers(1, 7), min_size=1, max_size=2).map(tuple)


def _shapes_property(data) -> None:
    """Any source and target shapes: with recorded shapes, the load succeeds exactly when the
    shapes are equal; without them (an older checkpoint) it succeeds only when the selection's
    size fits; a refusal changes neither the optimizer nor the dict, and nothing else escapes."""
    source = data.draw(st.lists(_SHAPE, min_size=1, max_size=3), label="source")
    how = data.draw(st.sampled_from(["same", "resize", "transpose", "drop", "add"]), label="target")
    target = list(source)
    if how == "resize":
        i = data.draw(st.integers(0, len(target) - 1))
        target[i] = tuple(s + data.draw(st.integers(1, 3)) for s in target[i])
    elif how == "transpose":
        target = [tuple(reversed(s)) for s in target]
    elif how == "drop" and len(target) > 1:
        target.pop()
    elif how == "add":
        target.append(data.draw(_SHAPE))
    recorded = data.draw(st.booleans(), label="shapes recorded")
    sd = _checkpoint(_trained(source, named=False))
    if not recorded:
        del sd["param_groups"][0]["param_shapes"]
    opt = _trained(target, named=False, steps=0)
    before, saved = snapshot(opt), record(sd)
    try:
        opt.load_state_dict(sd)
    except REFUSED as e:
        event(refusal_kind(e))
        assert target != source, e
        assert_same(before, snapshot(opt))
        assert_same(saved, record(sd))
        return
    if recorded:
        assert target == source
    for p in opt.param_groups[0]["params"]:
        idx = opt.state[p]["indices"]
        assert idx.numel() == 0 or int(idx.max()) < p.numel()


test_state_dicts_load_only_into_their_shapes, test_state_dicts_load_only_into_their_shapes_many = \
    property_tests(_shapes_property)
