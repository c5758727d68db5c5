"""state_dict helpers: keep checkpoints loadable with ``weights_only=True`` and state in its own dtypes."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from gallop_kernels.optim.selection import needs_master
from gallop_kernels.reference import QUANT_BLOCK

CALLABLE_SCORE = "<callable>"
"""Stands in a saved param group for a score callable (functions are not plain values)."""

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "master")


def make_portable(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace score callables by a marker so that the dict holds only tensors and plain values."""
    for group in state_dict["param_groups"]:
        if callable(group.get("score")):
            group["score"] = CALLABLE_SCORE
    return state_dict


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


def match_params(groups: list[dict], saved_groups: list[dict]) -> dict[Any, torch.Tensor]:
    """Map the checkpoint's param ids to this optimizer's params (same group layout required)."""
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"loaded state dict's parameter group {i} has {len(saved['params'])} params, "
                f"the optimizer's has {len(group['params'])}"
            )
    return dict(
        zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in groups),
        )
    )


def _check_entry(key: Any, saved: dict, param: torch.Tensor, group: dict) -> None:
    where = f"state of parameter {key} (shape {tuple(param.shape)})"
    indices = saved.get("indices")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: 'indices' must be an int32/int64 tensor")
    if indices.dim() != 1:
        raise ValueError(f"{where}: 'indices' must be one-dimensional")
    k = indices.numel()
    if k:
        idx = indices.to(torch.int64)
        if int(idx.min()) < 0 or int(idx.max()) >= param.numel():
            raise ValueError(f"{where}: an index is outside the parameter's {param.numel()} entries")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{where}: 'indices' must be strictly increasing")
    wanted = ["exp_avg", "exp_avg_sq"] + (
        ["master"] if needs_master(param, group["master_weights"]) else []
    )
    for name in wanted:
        value = saved.get(name)
        quantized = name != "master" and isinstance(value, torch.Tensor) and value.dtype == torch.uint8
        if not isinstance(value, torch.Tensor) or not (value.dtype == torch.float32 or quantized):
            raise ValueError(f"{where}: '{name}' must be a float32 (or 8-bit uint8) tensor")
        if value.shape != (k,):
            raise ValueError(f"{where}: '{name}' has shape {tuple(value.shape)}, expected ({k},)")
        if quantized:
            absmax = saved.get(f"{name}_absmax")
            blocks = -(-k // QUANT_BLOCK)
            if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or (
                absmax.shape != (blocks,)
            ):
                raise ValueError(f"{where}: 8-bit '{name}' needs a float32 '{name}_absmax' of "
                                 f"{blocks} blocks")
    if "step" not in saved:
        raise ValueError(f"{where}: 'step' is missing")
    accum = saved.get("grad_accum")
    if accum is not None and (accum.dtype != torch.float32 or accum.numel() != param.numel()):
        raise ValueError(f"{where}: 'grad_accum' must be float32 with one value per entry")
    if group.get("reselect_every") is not None and accum is None:
        raise ValueError(f"{where}: 'grad_accum' is missing but reselect_every is set")


def check_state(
    saved_state: dict, id_map: dict, saved_groups: list[dict], groups: list[dict]
) -> None:
    """Raise ``ValueError`` if the checkpoint's state does not fit this optimizer's params."""
    group_of = {}
    for saved_group in saved_groups:
        for key in saved_group["params"]:
            group_of[key] = saved_group
    for key, saved in saved_state.items():
        if key not in id_map:
            raise ValueError(f"loaded state refers to unknown parameter id {key!r}")
        if not saved:
            continue
        _check_entry(key, saved, id_map[key], group_of[key])
    for saved_group in saved_groups:
        if "steps_since_selection" in saved_group:
            missing = [key for key in saved_group["params"] if not saved_state.get(key)]
            if missing:
                raise ValueError(f"loaded state has a selection but no state for params {missing}")


def to_param_device(saved: dict, param: torch.Tensor) -> dict:
    """Copy one param's state onto its device, each tensor keeping its dtype; step stays on CPU."""
    state = {}
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor):
            state[key] = value
        elif key == "step":
            state[key] = value.detach().to("cpu", torch.float32, copy=True)
        else:
            state[key] = value.detach().to(param.device, copy=True)
    return state
