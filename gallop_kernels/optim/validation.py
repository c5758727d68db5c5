"""Checks on options, parameters, gradients and optimizer state, run before any state changes.

Where the line is drawn (`docs/design.md#rules`: validate everything, then mutate): the checks that
`SparseAdamW.step` and `SparseAdamW.select` run every time look at *metadata* only -- Python option
values, tensor types, shapes, dtypes, devices and contiguity, plus the step counters, which live
on the CPU -- so they never wait for the GPU. Checks that need the *data* of a device tensor
(finite moments, exp_avg_sq >= 0, indices sorted, unique and in range) run where that data enters
the optimizer: `load_state_dict` (`optim/checkpoint.py`) and selection, which builds the indices
itself and refuses non-finite scores. A param resized after selection is caught from the size
recorded at selection, not by reading the indices.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterable, Iterator, Sequence

import torch

from gallop_kernels.ops.adamw.quantization import QUANT_BLOCK
from gallop_kernels.rules import FLOAT_DTYPES, check_count, check_fraction, check_score, check_score_floor

MASTER_WEIGHT_CHOICES = ("auto", True, False)
OPTION_KEYS = (
    "lr", "betas", "eps", "weight_decay", "density", "score", "score_eps", "seed",
    "reselect_every", "master_weights", "state_bits", "min_8bit_entries",
)
"""The options every param group holds (the constructor's keyword arguments). ``score_floor``
(`docs/design.md#score-floor`) is one too, but optional: groups saved before it existed have none."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@contextlib.contextmanager
def prefixed(where: object) -> Iterator[None]:
    """Prefix the messages of the TypeError/ValueError raised inside with ``where`` (e.g.
    "param group 1"); an int too large for any float (OverflowError) becomes a ValueError."""
    try:
        yield
    except (TypeError, ValueError) as error:
        if not str(where):
            raise
        raise type(error)(f"{where}: {error}") from None
    except OverflowError:
        raise ValueError(f"{where}: a value is too large for a float" if str(where)
                         else "a value is too large for a float") from None


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"invalid {name}: {value} (too large)") from None


def _finite_non_negative(name: str, value: Any) -> None:
    # The kernels compute in float32: a value beyond its range is infinite there.
    if not 0.0 <= _real(name, value) <= FLOAT32_MAX:  # also refuses NaN and inf
        raise ValueError(
            f"invalid {name}: {value} (must be finite and >= 0, at most {FLOAT32_MAX:.4g})"
        )


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_group_options(options: dict[str, Any], where: str = "") -> None:
    """Validate one param group's options (`docs/design.md#rules`).

    ``lr``, ``eps``, ``weight_decay`` and ``score_eps`` must be finite and >= 0 (``inf`` is refused:
    the step would turn every selected weight into NaN); betas in [0, 1); density in (0, 1].
    ``where`` (e.g. "param group 1") prefixes the messages.
    """
    with prefixed(where):
        _check_options(options)


def _check_options(options: dict[str, Any]) -> None:
    if not isinstance(options, dict):
        raise TypeError(f"a param group must be a dict, got {type(options).__name__}")
    missing = [key for key in OPTION_KEYS if key not in options]
    if missing:
        raise ValueError(f"missing option(s) {missing}")
    _finite_non_negative("learning rate", options["lr"])
    _finite_non_negative("eps", options["eps"])
    _finite_non_negative("weight_decay", options["weight_decay"])
    _finite_non_negative("score_eps", options["score_eps"])

    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _real(f"beta{i + 1}", beta) < 1.0:
            raise ValueError(f"invalid beta parameter at index {i}: {beta} (must be in [0, 1))")

    check_fraction(options["density"], "density")
    check_score(options["score"])
    params = options.get("params")
    check_score_floor(options.get("score_floor"), None if params is None else len(params), options["score"])
    _integer("seed", options["seed"])
    check_count(options["reselect_every"], "reselect_every", allow_none=True)
    check_count(options["min_8bit_entries"], "min_8bit_entries", minimum=0)

    bits = options["state_bits"]
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in (8, 32):
        raise ValueError(f"invalid state_bits: {bits!r} (expected 32 or 8)")

    master = options["master_weights"]
    if not isinstance(master, (bool, str)) or master not in MASTER_WEIGHT_CHOICES:
        raise ValueError(f"invalid master_weights: {master!r} (expected 'auto', True or False)")


def check_selection_counter(group: dict[str, Any], where: str = "") -> None:
    """``steps_since_selection`` (present once the group has selected) is an int >= 0."""
    if "steps_since_selection" in group:
        with prefixed(where):
            check_count(group["steps_since_selection"], "steps_since_selection", minimum=0)


def check_params(params: Iterable[Any], names: Sequence[object] | None = None) -> None:
    """Every param must be a dense contiguous float32/bf16/fp16 tensor, each at most once."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        if (
            isinstance(p, torch.Tensor) and p.dtype in FLOAT_DTYPES and not p.is_sparse
            and p.is_contiguous() and id(p) not in seen
        ):
            seen.add(id(p))
            continue
        what = f"parameter {names[i]}" if names is not None else "a parameter"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"SparseAdamW can only optimize tensors, got {type(p).__name__}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"SparseAdamW supports float32, bfloat16 and float16 parameters; {what} is {p.dtype}"
            )
        if p.is_sparse or not p.is_contiguous():
            raise ValueError(
                f"SparseAdamW needs dense contiguous parameters (flat indices address their "
                f"storage); {what} is a {'sparse' if p.is_sparse else 'non-contiguous'} tensor of "
                f"shape {tuple(p.shape)}"
            )
        raise ValueError(f"{what} appears twice in the same parameter group")


def check_grad(name: str, param: torch.Tensor, grad: Any, *, same_device: bool = True) -> None:
    """A dense gradient: a float tensor shaped like its parameter (on its device, by default)."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"gradient of parameter {name} must be a tensor, got {type(grad).__name__}")
    if grad.is_sparse or grad.layout != torch.strided:
        raise ValueError(f"SparseAdamW does not support sparse gradients (parameter {name})")
    if grad.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"gradient of parameter {name} has dtype {grad.dtype}; expected float32, bfloat16 "
            f"or float16"
        )
    if grad.shape != param.shape:
        raise ValueError(
            f"gradient of parameter {name} has shape {tuple(grad.shape)}, "
            f"expected {tuple(param.shape)}"
        )
    if same_device and grad.device != param.device:
        raise ValueError(
            f"gradient of parameter {name} is on {grad.device}, the parameter on {param.device}"
        )


def check_grads(named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every present ``.grad`` passes `check_grad`."""
    for name, p in named_params:
        if p.grad is not None:
            check_grad(name, p, p.grad)


def state_tensor(
    st: Any, key: str, where: object, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...],
    device: torch.device | None = None,
) -> torch.Tensor:
    """``st[key]``, checked: a dense tensor of one of ``dtypes`` and of ``shape``; on ``device``
    and contiguous (it is updated in place) when a device is given. ``where`` prefixes messages
    (any object: it is formatted only when a message is built)."""
    value = st.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: '{key}' is missing or not a tensor")
    if value.layout != torch.strided:
        raise ValueError(f"{where}: '{key}' must be a dense tensor, got layout {value.layout}")
    if value.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{where}: '{key}' has dtype {value.dtype}, expected {names}")
    if value.shape != shape:
        raise ValueError(f"{where}: '{key}' has shape {tuple(value.shape)}, expected {shape}")
    if device is not None:
        if value.device != device:
            raise ValueError(
                f"{where}: '{key}' is on {value.device}, the parameter on {device} (after moving "
                f"params, opt.load_state_dict(opt.state_dict()) moves the state along)"
            )
        if not value.is_contiguous():
            raise ValueError(f"{where}: '{key}' is not contiguous (it is updated in place)")
    return value


def step_count(value: Any, where: object) -> float:
    """The value of a ``step`` state entry: a whole number >= 0 (a number or 1-element tensor).

    Reading a CPU tensor costs no device synchronisation; the optimizer keeps its counters there.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where}: 'step' must be a one-element real tensor, "
                             f"got shape {tuple(value.shape)} of {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: 'step' must be a number, got {type(value).__name__}")
    count = float(value)
    if not (math.isfinite(count) and count >= 0 and count == int(count)):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {value}")
    return count


def state_is_stale(param: torch.Tensor, st: Any, selected_numel: int | None) -> bool:
    """Whether ``param`` changed size since its indices were made (its state cannot carry over)."""
    return isinstance(st, dict) and selected_numel is not None and selected_numel != param.numel()


def check_carry_over(where: object, param: torch.Tensor, st: Any, selected_numel: int | None) -> None:
    """What a re-selection reads of a param's old state (`selection.apply` carries m, v and the
    master copy of entries that stay selected): indices and moments that fit each other, on the
    param's device. Nothing to check where there is no old selection or the param was resized
    (its old state is dropped)."""
    if not isinstance(st, dict) or "indices" not in st or state_is_stale(param, st, selected_numel):
        return
    device = param.device
    indices = st["indices"]
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"{where}: 'indices' is not a tensor")
    k = indices.numel()
    state_tensor(st, "indices", where, (torch.int32, torch.int64), (k,), device)
    m = state_tensor(st, "exp_avg", where, (torch.float32, torch.uint8), (k,), device)
    v = state_tensor(st, "exp_avg_sq", where, (torch.float32, torch.uint8), (k,), device)
    if m.dtype != v.dtype:
        raise ValueError(f"{where}: 'exp_avg' is {m.dtype} but 'exp_avg_sq' is {v.dtype}; "
                         f"both must be float32 or both 8-bit")
    if m.dtype == torch.uint8:
        blocks = -(-k // QUANT_BLOCK)
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            state_tensor(st, key, where, (torch.float32,), (blocks,), device)
    if "master" in st:
        state_tensor(st, "master", where, (torch.float32,), (k,), device)


def check_state_fits(
    where: object,
    param: torch.Tensor,
    st: Any,
    group: dict[str, Any],
    selected_numel: int | None,
    needs_master: bool,
) -> float:
    """Metadata checks that one selected param's state fits it for a step; returns its step count.

    ``where`` names the param in messages ("parameter X"). ``selected_numel`` is the param's size
    when its indices were made (None if unknown): a param resized since then would be indexed
    out of range.
    """
    if not isinstance(st, dict) or "indices" not in st:
        raise ValueError(
            f"{where} has no selection ('indices' in its state) although its group has selected "
            f"(was it added to the "
            f"group's 'params' directly?); use add_param_group, or call select() to select again"
        )
    n = param.numel()
    if state_is_stale(param, st, selected_numel):
        raise ValueError(
            f"{where} has {n} entries but was selected when it had {selected_numel} (was it "
            f"resized?); call select() to select again or load a checkpoint that fits it"
        )
    check_carry_over(where, param, st, selected_numel)
    k = st["indices"].numel()
    if k > n:
        raise ValueError(f"{where}: {k} selected entries for a parameter of {n} entries")
    if needs_master and "master" not in st:
        raise ValueError(
            f"{where} is {param.dtype} but its state has no float32 master copy, which "
            f"master_weights={group['master_weights']!r} needs (did the dtype or master_weights "
            f"change after selection?); call select() or load a checkpoint that fits"
        )
    if group["reselect_every"] is not None or "grad_accum" in st:
        if "grad_accum" not in st:
            raise ValueError(
                f"{where}: reselect_every is set but the state has no 'grad_accum' (was "
                f"reselect_every set after selection?); call select() to start accumulating"
            )
        state_tensor(st, "grad_accum", where, (torch.float32,), (n,), param.device)
    if "step" not in st:
        raise ValueError(f"{where}: 'step' is missing")
    return step_count(st["step"], where)
