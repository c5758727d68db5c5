"""state_dict helpers: checkpoints loadable with ``weights_only=True``, checked whole before loading.

`prepare_load` is everything `SparseAdamW.load_state_dict` does except installing the result:
it checks the checkpoint's structure, its groups' options (the constructor's checks), the layout
of its state and the *data* of every state tensor (`docs/design.md#rules`: validate everything, then
mutate; the per-step checks only look at metadata), and returns fresh groups and state on the
params' devices. Nothing of the optimizer or of the caller's dict is modified.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy
from itertools import chain
from typing import Any, Callable

import torch

from gallop_kernels.ops.adamw.quantization import QUANT_BLOCK
from gallop_kernels.optim.distributed import is_dtensor, local
from gallop_kernels.optim.selection import (
    moments_fp32,
    needs_master,
    store_moments,
    uses_8bit,
)
from gallop_kernels.optim.validation import (
    check_group_options,
    check_selection_counter,
    state_tensor,
    step_count,
)
from gallop_kernels.rules import DEFAULT_MIN_8BIT_ENTRIES, check_index_set, k_for_density

CALLABLE_SCORE = "<callable>"
"""Stands in a saved param group for a score callable (functions are not plain values)."""

STATE_KEYS = frozenset({
    "indices", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "master", "step",
    "grad_accum",
})
LAYOUT_OPTIONS = ("state_bits", "master_weights")
"""Options that fix the state's layout: a checkpoint may change them only with ``convert_layout``."""
LEGACY_OPTION_DEFAULTS = {"state_bits": 32, "min_8bit_entries": DEFAULT_MIN_8BIT_ENTRIES}
"""Options younger than some checkpoints, and what their absence meant."""


SHAPES_KEY = "param_shapes"
"""Each saved group's list of its params' shapes (global shapes for DTensors), checked on load."""
WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Name components that wrappers (DDP, torch.compile, FSDP1, activation checkpointing) insert:
ignored when a checkpoint's param names are compared with the optimizer's."""


def make_portable(state_dict: dict[str, Any], groups: list[dict]) -> dict[str, Any]:
    """Replace score callables by a marker so that the dict holds only tensors and plain values,
    and record each param's shape (`SHAPES_KEY`), so that a checkpoint for other parameters is
    refused on load instead of training indices chosen for another tensor."""
    for saved, group in zip(state_dict["param_groups"], groups):
        if callable(saved.get("score")):
            saved["score"] = CALLABLE_SCORE
        saved[SHAPES_KEY] = [[int(s) for s in p.shape] for p in group["params"]]
    return state_dict


# ----------------------------------------------------------------------------------------------
# Structure and groups
# ----------------------------------------------------------------------------------------------


def _structure(state_dict: Mapping[str, Any]) -> tuple[Mapping, list]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    unknown = set(state_dict) - {"state", "param_groups"}
    missing = {"state", "param_groups"} - set(state_dict)
    if missing or unknown:
        raise ValueError(
            "an optimizer state_dict has exactly the keys 'state' and 'param_groups'; "
            + (f"missing {sorted(missing)}" if missing else f"unknown {sorted(map(str, unknown))}")
        )
    state, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise TypeError("state_dict['param_groups'] must be a list of dicts")
    return state, list(groups)


def match_params(groups: list[dict], saved_groups: list[dict]) -> dict[Any, torch.Tensor]:
    """Map the checkpoint's param ids to this optimizer's params (same group layout required)."""
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
            f"{len(groups)}"
        )
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"loaded parameter group {i} has no list of 'params'")
        if len(group["params"]) != len(ids):
            raise ValueError(
                f"loaded state dict's parameter group {i} has {len(ids)} params, "
                f"the optimizer's has {len(group['params'])}"
            )
        for key in ids:
            if isinstance(key, bool) or not isinstance(key, Hashable):
                raise ValueError(f"loaded parameter group {i} has an invalid param id {key!r}")
    saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    if len(set(saved_ids)) != len(saved_ids):
        raise ValueError("loaded state dict lists a param id more than once")
    return dict(zip(saved_ids, chain.from_iterable(g["params"] for g in groups)))


def restore_callables(saved_groups: list[dict], groups: list[dict]) -> None:
    """Put the current groups' score callables back where the checkpoint has the marker."""
    for saved, current in zip(saved_groups, groups):
        if saved.get("score") == CALLABLE_SCORE:
            if not callable(current["score"]):
                raise ValueError(
                    "the checkpoint was made with a callable score; construct the optimizer "
                    "with the same callable before loading it"
                )
            saved["score"] = current["score"]


def _bare(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _check_identity(where: str, group: dict, current: dict, names: list[str]) -> None:
    """The checkpoint's params are this optimizer's: the same shape each (when the checkpoint
    records shapes) and the same name (when both sides have names; wrapper components such as
    DDP's ``module.`` do not count)."""
    shapes = group.pop(SHAPES_KEY, None)
    if shapes is not None:
        if (not isinstance(shapes, (list, tuple)) or len(shapes) != len(current["params"])
                or not all(isinstance(s, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool)
                                                               and d >= 0 for d in s) for s in shapes)):
            raise ValueError(f"{where}: '{SHAPES_KEY}' must list one shape (a list of sizes) per param")
        for shape, p, name in zip(shapes, current["params"], names):
            if tuple(shape) != tuple(p.shape):
                this = name if "shape" in name else f"{name}, of shape {tuple(p.shape)}"  # (unnamed labels show it)
                raise ValueError(f"{where}: the checkpoint's state is for a parameter of shape {tuple(shape)}, not for "
                                 f"this optimizer's {this}: it was saved for another model")
    saved_names, now = group.get("param_names"), current.get("param_names")
    if isinstance(saved_names, (list, tuple)) and isinstance(now, (list, tuple)) and len(now) == len(saved_names):
        for old, new in zip(saved_names, now):
            if isinstance(old, str) and isinstance(new, str) and _bare(old) != _bare(new):
                raise ValueError(f"{where}: the checkpoint's param {old!r} stands where this optimizer has {new!r}; "
                                 "load it into the model it was saved for (or rename 'param_names' in a load "
                                 "pre-hook if the model's params were only renamed)")


def _prepare_groups(saved_groups: list, groups: list[dict], convert_layout: bool,
                    labels: Callable[[int], list[str]]) -> list[dict]:
    """Fresh, validated group dicts: the checkpoint's options, this optimizer's params."""
    new_groups = []
    for i, (saved, current) in enumerate(zip(saved_groups, groups)):
        where = f"loaded parameter group {i}"
        group = deepcopy(dict(saved))
        _check_identity(where, group, current, labels(i))
        for key, value in LEGACY_OPTION_DEFAULTS.items():
            group.setdefault(key, value)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        names = group.get("param_names")
        if "param_names" in group and (
            not isinstance(names, (list, tuple)) or len(names) != len(group["params"])
            or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(f"{where}: 'param_names' must list one name (a str) per param")
        restore_callables([group], [current])
        check_group_options(group, where)
        check_selection_counter(group, where)
        for key in LAYOUT_OPTIONS:
            if group[key] != current[key] or type(group[key]) is not type(current[key]):
                if not convert_layout:
                    raise ValueError(
                        f"{where} was saved with {key}={group[key]!r}, this optimizer has "
                        f"{key}={current[key]!r}: its state has another layout. Build the "
                        f"optimizer with {key}={group[key]!r}, or pass convert_layout=True to "
                        f"convert the state to {key}={current[key]!r}"
                    )
                group[key] = current[key]
        group["params"] = current["params"]
        if "param_names" not in saved and "param_names" in current:
            group["param_names"] = current["param_names"]
        new_groups.append(group)
    return new_groups


# ----------------------------------------------------------------------------------------------
# State entries
# ----------------------------------------------------------------------------------------------


def _finite(value: torch.Tensor, key: str, where: str, non_negative: bool = False) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where}: '{key}' holds NaN or infinite values")
    if non_negative and value.numel() and bool((value < 0).any()):
        raise ValueError(f"{where}: '{key}' holds negative values (it must be >= 0)")


def _to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    return value.detach().to(device, copy=True, memory_format=torch.contiguous_format)


def _prepare_entry(
    where: str, saved: Any, param: torch.Tensor, group: dict, convert_layout: bool
) -> dict[str, Any]:
    """Check one param's saved state (metadata and data) and return it on the param's device."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: the state must be a dict, got {type(saved).__name__}")
    unknown = set(saved) - STATE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown state key(s) {sorted(map(str, unknown))}; "
                         f"expected some of {sorted(STATE_KEYS)}")
    device, n = param.device, param.numel()

    indices = saved.get("indices")
    if isinstance(indices, torch.Tensor) and indices.layout != torch.strided:
        raise ValueError(f"{where}: 'indices' must be a dense tensor, got layout {indices.layout}")
    check_index_set(indices, n, where)
    k = indices.numel()

    m = state_tensor(saved, "exp_avg", where, (torch.float32, torch.uint8), (k,))
    v = state_tensor(saved, "exp_avg_sq", where, (torch.float32, torch.uint8), (k,))
    if m.dtype != v.dtype:
        raise ValueError(f"{where}: 'exp_avg' is {m.dtype} but 'exp_avg_sq' {v.dtype}; both must "
                         f"be float32 or both 8-bit")
    quantized = m.dtype == torch.uint8
    absmax_keys = ("exp_avg_absmax", "exp_avg_sq_absmax")
    if quantized:
        for key in absmax_keys:
            absmax = state_tensor(saved, key, where, (torch.float32,), (-(-k // QUANT_BLOCK),))
            _finite(absmax, key, where, non_negative=True)
    else:
        extra = [key for key in absmax_keys if key in saved]
        if extra:
            raise ValueError(f"{where}: {extra} belong to 8-bit moments, but they are float32")
        _finite(m, "exp_avg", where)
        _finite(v, "exp_avg_sq", where, non_negative=True)
    if "master" in saved:
        _finite(state_tensor(saved, "master", where, (torch.float32,), (k,)), "master", where)
    if group["reselect_every"] is not None and "grad_accum" not in saved:
        raise ValueError(f"{where}: 'grad_accum' is missing but reselect_every is set")
    if "grad_accum" in saved:
        accum = state_tensor(saved, "grad_accum", where, (torch.float32,), (n,))
        _finite(accum, "grad_accum", where)
    if "step" not in saved:
        raise ValueError(f"{where}: 'step' is missing")
    step = step_count(saved["step"], where)

    # Layout: 8-bit moments only under state_bits=8; a master copy exactly where one is needed.
    want_master = needs_master(param, group["master_weights"])
    layout_errors = []
    if quantized and group["state_bits"] != 8:
        layout_errors.append("8-bit moments but state_bits=32")
    if want_master and "master" not in saved:
        layout_errors.append(f"no float32 master copy, which a {param.dtype} parameter under "
                             f"master_weights={group['master_weights']!r} needs")
    if not want_master and "master" in saved:
        layout_errors.append(f"a master copy, which a {param.dtype} parameter under "
                             f"master_weights={group['master_weights']!r} does not have")
    if layout_errors and not convert_layout:
        raise ValueError(f"{where}: the checkpoint holds {'; '.join(layout_errors)}. Pass "
                         f"convert_layout=True to convert it to this optimizer's layout")

    state = {key: _to_device(value, device) for key, value in saved.items() if key != "step"}
    state["step"] = torch.tensor(step, dtype=torch.float32)
    if convert_layout:
        _convert(state, param, group, k, want_master)
    return state


def _convert(state: dict, param: torch.Tensor, group: dict, k: int, want_master: bool) -> None:
    """Bring one param's (checked) state into the group's layout."""
    bits = 8 if uses_8bit(group, k) else 32
    if (state["exp_avg"].dtype == torch.uint8) != (bits == 8):
        exp_avg, exp_avg_sq = moments_fp32(state)
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            state.pop(key, None)
        store_moments(state, exp_avg.clone(), exp_avg_sq.clone(), bits)
    if want_master and "master" not in state:
        idx = state["indices"].to(torch.int64)
        state["master"] = param.detach().reshape(-1)[idx].to(torch.float32)
    elif not want_master:
        state.pop("master", None)


# ----------------------------------------------------------------------------------------------
# The whole load
# ----------------------------------------------------------------------------------------------


def prepare_load(
    state_dict: Mapping[str, Any],
    groups: list[dict],
    names: Callable[[int], list[str]],
    convert_layout: bool = False,
) -> tuple[list[dict], dict[torch.Tensor, dict]]:
    """Check a whole checkpoint against this optimizer's ``groups``; return (new groups, state).

    ``names(i)`` names group i's params in messages. Raises ``ValueError``/``TypeError`` on the
    first problem; on success the result is independent of ``state_dict`` (tensors are copied).
    """
    if not isinstance(convert_layout, bool):
        raise TypeError("convert_layout must be True or False")
    saved_state, saved_groups = _structure(state_dict)
    id_map = match_params(groups, saved_groups)
    new_groups = _prepare_groups(saved_groups, groups, convert_layout, names)

    where_of, group_of = {}, {}
    for i, (saved, group) in enumerate(zip(saved_groups, new_groups)):
        for key, name in zip(saved["params"], names(i)):
            where_of[key] = f"loaded state of parameter {name}"
            group_of[key] = group
    state: dict[torch.Tensor, dict] = {}
    for key, saved in saved_state.items():
        if not isinstance(key, Hashable) or key not in id_map:
            raise ValueError(f"loaded state refers to unknown parameter id {key!r}")
        if isinstance(saved, Mapping) and not saved:
            continue
        if "steps_since_selection" not in group_of[key]:
            raise ValueError(f"{where_of[key]}: state for a parameter whose group has no "
                             f"selection ('steps_since_selection' is missing)")
        state[id_map[key]] = _prepare_entry(  # (a DTensor's state fits its local shard)
            where_of[key], saved, local(id_map[key]), group_of[key], convert_layout
        )
    for i, (saved, group) in enumerate(zip(saved_groups, new_groups)):
        if "steps_since_selection" in group:
            missing = [name for key, name in zip(saved["params"], names(i))
                       if id_map[key] not in state]
            if missing:
                raise ValueError(f"loaded parameter group {i} has a selection but no state for "
                                 f"parameter(s) {missing}")
            _check_selection_size(i, group, state)
    return new_groups, state


def _check_selection_size(i: int, group: dict, state: dict) -> None:
    """A selection holds exactly k(N, density) entries of its group's N: a checkpoint saved for
    other parameters (one without recorded shapes, written before they were) almost always
    holds another number. Sharded groups hold their shard's part only and are not checked here."""
    params = group["params"]
    if not params or any(is_dtensor(p) for p in params):
        return
    total = sum(int(state[p]["indices"].numel()) for p in params)
    numel = sum(p.numel() for p in params)
    expected = k_for_density(numel, group["density"])
    if total != expected:
        raise ValueError(f"loaded parameter group {i}: its selection holds {total} entries, but density "
                         f"{group['density']} over this group's {numel} entries selects {expected}: the "
                         "checkpoint was saved for other parameters")
