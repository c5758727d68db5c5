"""Shared by the attack suites: a complete snapshot of an optimizer, exact comparison, base setups.

"For every refused input, the state before equals the state after": `snapshot` records everything
a SparseAdamW holds (params and their grads, requires_grad flags, every state tensor bit for bit
and every plain value, the param groups, the selection sizes, the param -> group map, lean mode's
compact buffers, gathered and frozen sets), and `assert_same` compares two snapshots exactly
(NaN equals NaN, dtypes and devices must match).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallop_kernels import SparseAdamW
from gallop_kernels.rules import SCORE_NAMES

NAN, INF = float("nan"), float("inf")
REFUSED = (ValueError, TypeError)
FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
"""The default run: small and derandomized, so that CI is reproducible."""
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""``-m slow``: many more examples, a new random sample every run."""


def property_tests(prop: Callable[[Any], None]) -> tuple[Callable, Callable]:
    """A property ``prop(data)`` as two tests: the default run (`FAST`) and ``-m slow`` (`SLOW`)."""

    def fast(data: Any) -> None:
        prop(data)

    def many(data: Any) -> None:
        prop(data)

    fast.__name__, many.__name__ = prop.__name__, prop.__name__ + "_many"
    return (FAST(given(data=st.data())(fast)),
            pytest.mark.slow(SLOW(given(data=st.data())(many))))


def _tensor_record(t: torch.Tensor) -> tuple:
    meta = (str(t.dtype), tuple(t.shape), tuple(t.stride()), str(t.device), t.layout)
    if t.device.type == "meta" or t.layout != torch.strided:
        return ("tensor", meta, None)
    return ("tensor", meta, t.detach().clone())


def _record(value: Any, seen_params: dict[int, str]) -> Any:
    """A comparable copy of a value found in the optimizer: params by identity, tensors by value."""
    if isinstance(value, torch.Tensor):
        if id(value) in seen_params:
            return ("param", seen_params[id(value)])
        return _tensor_record(value)
    if isinstance(value, dict):
        return ("dict", type(value).__name__,
                [(_record(k, seen_params), _record(v, seen_params)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_record(v, seen_params) for v in value])
    if isinstance(value, (set, frozenset)):
        return ("set", sorted(repr(_record(v, seen_params)) for v in value))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (str, int, float, complex, bool, bytes, type(None))):
        return ("value", type(value).__name__, value)
    return ("object", id(value))  # callables, sentinels: by identity


def snapshot(opt: SparseAdamW) -> dict[str, Any]:
    """Everything the optimizer holds, recorded for an exact comparison."""
    params = [p for group in opt.param_groups for p in group.get("params", [])
              if isinstance(p, torch.Tensor)]
    names = {id(p): f"p{i}" for i, p in enumerate(params)}
    record = functools.partial(_record, seen_params=names)
    snap = {
        "params": [(names[id(p)], _tensor_record(p), p.requires_grad,
                    None if p.grad is None else _tensor_record(p.grad)) for p in params],
        "param_groups": record(opt.param_groups),
        "defaults": record(opt.defaults),
        "state": record({names.get(id(p), f"unlisted@{id(p)}"): st for p, st in opt.state.items()}),
        "selected_numel": record({names.get(id(p), "?"): n for p, n in opt._selected_numel.items()}),
        "group_index": sorted((names.get(k, str(k)), v) for k, v in opt._group_index.items()
                              if k in names),
        "backend": opt.backend,
        "lean": None,
    }
    if opt._lean is not None:
        lean = opt._lean.snapshot()

        def name(p: torch.Tensor) -> str:  # (a param may have left the groups)
            return names.get(id(p), f"unlisted@{id(p)}")

        snap["lean"] = record({
            "compact": {name(p): t for p, t in lean["compact"].items()},
            "gathered": sorted(name(p) for p in lean["gathered"]),
            "frozen": [name(p) for p in lean["frozen"]],
            "paused": lean["paused"],
        })
    return snap


def _same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {a.keys()} != {b.keys()}"
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
        return
    assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def assert_same(before: dict, after: dict) -> None:
    """Two snapshots are identical (every tensor bit for bit)."""
    _same(before, after, "optimizer")


# ----------------------------------------------------------------------------------------------
# Base setups: small optimizers in the states an attack can meet them in
# ----------------------------------------------------------------------------------------------

SHAPES = [(7, 5), (13,), (1,), (3, 3, 2)]


def _params(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def set_grads(opt: SparseAdamW, seed: int) -> None:
    """Deterministic dense gradients (with zeros and ties) on every param of the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            g = torch.randn(p.shape, generator=gen) * torch.randint(0, 3, p.shape, generator=gen)
            p.grad = g.to(p.dtype)


def backward(opt: SparseAdamW, seed: int) -> None:
    """Gradients through autograd, so lean mode's hooks run (they gather and free them)."""
    gen = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                w = torch.randn(p.shape, generator=gen).to(p.dtype)
                (p * w).float().sum().backward()


def _train(opt: SparseAdamW, steps: int, lean: bool = False) -> SparseAdamW:
    for i in range(steps):
        (backward if lean else set_grads)(opt, i)
        opt.step()
        opt.zero_grad()
    return opt


def _two_groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:2], "param_names": ["a.weight", "a.bias"]},
        {"params": params[2:], "param_names": ["b.scale", "c.weight"], "lr": 5e-3,
         "density": 0.5, "weight_decay": 0.1},
    ]


CONFIGS = ("fresh", "fp32", "bf16", "fp16_master_false", "reselect", "lean", "lean_reselect",
           "8bit", "empty_group")


@functools.lru_cache(maxsize=None)
def _base(config: str, backend: str) -> SparseAdamW:
    common = dict(lr=1e-2, density=0.3, weight_decay=0.01, backend=backend)
    if config == "fresh":
        return SparseAdamW(_two_groups(_params(torch.float32)), **common)
    if config == "fp32":
        return _train(SparseAdamW(_two_groups(_params(torch.float32)), **common), 2)
    if config == "bf16":
        return _train(SparseAdamW(_params(torch.bfloat16), **common), 2)
    if config == "fp16_master_false":
        return _train(SparseAdamW(_params(torch.float16), master_weights=False, **common), 1)
    if config == "reselect":
        return _train(SparseAdamW(_params(torch.float32), reselect_every=2, **common), 3)
    if config == "lean":
        opt = _train(SparseAdamW(_params(torch.float32), lean=True, **{**common, "density": 0.05}), 2,
                     lean=True)
        backward(opt, 99)  # compact gradients pending: the next step would consume them
        return opt
    if config == "lean_reselect":
        return _train(SparseAdamW(_params(torch.float32), lean=True, reselect_every=2, **common),
                      3, lean=True)
    if config == "8bit":
        params = _params(torch.float32, shapes=[(80, 60), (9,)])
        opt = SparseAdamW(params, state_bits=8, **{**common, "density": 0.9})
        _train(opt, 2)
        assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8
        return opt
    if config == "empty_group":
        params = _params(torch.float32)
        opt = SparseAdamW([{"params": params}, {"params": []}], **common)
        return _train(opt, 1)
    raise ValueError(config)


def base(config: str, backend: str = "torch") -> SparseAdamW:
    """A fresh deep copy of a base setup (built once per process)."""
    return copy.deepcopy(_base(config, backend))


def refusal_kind(error: Exception) -> str:
    """A refusal's kind for Hypothesis' statistics (``--hypothesis-show-statistics``)."""
    text = re.sub(r"\((param group|shape)[^)]*\)+|group \d+ param \d+|'[a-z]\.\w+'", "", str(error))
    text = re.sub(r"-?\d[\d.e+-]*|\[[^]]*\]", "#", text)
    return f"{type(error).__name__}: {' '.join(text.split()[:10])}"


def record(value: Any) -> Any:
    """A comparable deep copy of any value (e.g. a state dict), for `assert_same`."""
    return _record(value, {})


# ----------------------------------------------------------------------------------------------
# Bad option values, by kind
# ----------------------------------------------------------------------------------------------

_NOT_NUMBERS = st.sampled_from(
    ["0.1", "", None, [0.1], (0.1,), {"v": 0.1}, 0.1j, b"1", torch.tensor(0.1), object()]
)
NON_FINITE = st.sampled_from([NAN, INF, -INF, np.float64("nan"), np.float32("inf")])
_BEYOND_FLOAT32 = st.one_of(
    st.floats(min_value=3.5e38, allow_infinity=False),
    st.integers(min_value=2**128, max_value=2**1100),
)


def _non_negative_finite_bad() -> st.SearchStrategy:
    """Bad values for lr, eps, weight_decay, score_eps."""
    return st.one_of(
        st.floats(max_value=-1e-300, allow_infinity=True, allow_nan=False),
        st.integers(max_value=-1), NON_FINITE, _BEYOND_FLOAT32, _NOT_NUMBERS, st.booleans(),
    )


def _bad_beta() -> st.SearchStrategy:
    return st.one_of(
        st.floats(min_value=1.0, allow_infinity=True, allow_nan=False),
        st.floats(max_value=-1e-300, allow_infinity=True, allow_nan=False),
        st.integers().filter(lambda x: x != 0), NON_FINITE, _NOT_NUMBERS, st.booleans(),
    )


_GOOD_BETA = st.floats(min_value=0.0, max_value=0.999)

BAD_OPTIONS: dict[str, st.SearchStrategy] = {
    "lr": _non_negative_finite_bad(),
    "eps": _non_negative_finite_bad(),
    "weight_decay": _non_negative_finite_bad(),
    "score_eps": _non_negative_finite_bad(),
    "betas": st.one_of(
        st.tuples(_bad_beta(), _GOOD_BETA), st.tuples(_GOOD_BETA, _bad_beta()),
        st.lists(_GOOD_BETA, max_size=4).filter(lambda b: len(b) != 2),
        st.sampled_from([0.9, "ab", None, {0.9: 0.99}, torch.tensor([0.9, 0.99])]),
    ),
    "density": st.one_of(
        st.floats(max_value=0.0, allow_infinity=True, allow_nan=False),
        st.floats(min_value=1.0, exclude_min=True, allow_infinity=True),
        st.integers().filter(lambda x: x != 1), NON_FINITE, _NOT_NUMBERS, st.booleans(),
    ),
    "score": st.one_of(
        st.text(max_size=12).filter(lambda s: s not in SCORE_NAMES), st.integers(), st.none(),
        st.sampled_from([b"gallop", ["gallop"], ("gallop",), 0.5]),
    ),
    "seed": st.one_of(st.floats(allow_nan=True), st.text(max_size=4), st.none(), st.booleans(),
                      st.sampled_from([torch.tensor(1), [1]])),
    "reselect_every": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3),
                                st.booleans()),
    "master_weights": st.one_of(st.text(max_size=6).filter(lambda s: s != "auto"),
                                st.integers(), st.none(), st.floats()),
    "state_bits": st.one_of(st.integers().filter(lambda b: b not in (8, 32)),
                            st.sampled_from([8.0, 32.0, "8", "32", True, False, None])),
    "min_8bit_entries": st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=3),
                                  st.booleans(), st.none()),
}
"""Bad values of every option a param group holds, by kind."""

BAD_STEPS = st.one_of(
    st.integers(max_value=-1), st.floats(max_value=-0.5), NON_FINITE,
    st.floats(min_value=0.01, max_value=1e6).filter(lambda x: x != int(x)),
    st.sampled_from(["1", None, [1], True, torch.tensor([1.0, 2.0]), torch.tensor(-1.0),
                     torch.tensor(NAN), torch.tensor(1 + 1j), torch.tensor(True), b"\x01"]),
)
"""Bad values of a state entry's step counter."""


# ----------------------------------------------------------------------------------------------
# Folders: "the folder before equals the folder after", for the CLI and the run folders
# ----------------------------------------------------------------------------------------------


def tree_snapshot(root: str) -> dict[str, tuple]:
    """Every entry under ``root`` (recursively, links not followed): its kind, permission bits and
    content (a file's SHA-256, a link's target), keyed by relative path."""
    import hashlib
    import os
    import stat

    snap: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    snap[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(f.read()).hexdigest())
            else:
                snap[rel] = ("other", stat.S_IFMT(st.st_mode))
    return snap


def assert_same_tree(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Two `tree_snapshot`s are equal; the message lists what appeared, vanished or changed."""
    appeared = sorted(set(after) - set(before))
    vanished = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (appeared or vanished or changed), f"appeared {appeared}, vanished {vanished}, changed {changed}"
