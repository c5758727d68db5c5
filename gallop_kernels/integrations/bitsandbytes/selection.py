"""GaLLoP phase one on a (4-bit) base: wrap the targets, tap their gradients, select, install.

Phase one needs the gradient w.r.t. each dense base weight, which bitsandbytes never computes.
The wrapped layers' backward computes it (``grad_outᵀ x``, fp32) and hands it at once to a
`HostGradientBuffer` through the :class:`DeltaTaps` sink, the same loop and buffer type every
other phase one uses (`gallop_kernels.phase_one`), so at most one layer's dense gradient exists on
the device at a time. The selection is one group over all wrapped layers with the exact semantics
of `docs/design.md#selection-semantics` (θ = the dequantized base weight, streamed one layer at a
time), then the indices are installed and everything but the delta values is frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from gallop_kernels import rules
from gallop_kernels.integrations.bitsandbytes.layer import SparseDeltaLinear
from gallop_kernels.integrations.targets import (
    ALL_LINEAR,
    TargetModules,
    resolve_targets,
)
from gallop_kernels.ops.select import streaming
from gallop_kernels.phase_one import (
    GradientSink,
    HostGradientBuffer,
    accumulate,
    calibrate_dataset,
)
from gallop_kernels.rules import Score, check_count, check_fraction, check_score


class DeltaTaps(GradientSink):
    """The gradient sink of the 4-bit path: every wrapped layer's dense weight gradient goes to
    its own `HostGradientBuffer` (see `SparseDeltaLinear.tap`)."""

    def __init__(self, layers: dict[str, SparseDeltaLinear]) -> None:
        self.layers = layers
        self.buffers: dict[str, HostGradientBuffer] = {}

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self.buffers = {n: HostGradientBuffer(m.weight_shape, m.delta_values.device)
                        for n, m in self.layers.items()}
        with contextlib.ExitStack() as stack:
            for name, m in self.layers.items():
                stack.enter_context(m.tap(self.buffers[name]))
            yield

    def tensors(self) -> list[torch.Tensor]:
        return [b.sum for b in self.buffers.values()]


class _LazyWeights(Sequence):
    """The wrapped layers' dense weights, dequantized one at a time as `streaming.select` walks
    them (it only iterates its ``params``), so at most two dequantized layers exist at once."""

    def __init__(self, modules: Sequence[SparseDeltaLinear]) -> None:
        self._modules = list(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return _LazyWeights(self._modules[i])
        return self._modules[i].dequantized_weight()

    def __iter__(self) -> Iterator[torch.Tensor]:
        for m in self._modules:
            yield m.dequantized_weight()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_layers(model: nn.Module, targets: Iterable[tuple[str, nn.Module]]) -> dict[str, SparseDeltaLinear]:
    """Replace each target linear layer by a `SparseDeltaLinear` around it (kept if wrapped)."""
    wrapped = {}
    for name, module in targets:
        if not isinstance(module, SparseDeltaLinear):
            module_new = SparseDeltaLinear(module)
            _set_submodule(model, name, module_new)
            module = module_new
        wrapped[name] = module
    return wrapped


def quantization_floors(modules: Sequence[SparseDeltaLinear], fraction: float = 0.5) -> list[float]:
    """Per layer, the magnitude floor of its base (`gallop_kernels.score_floor`): ``fraction`` of
    the median NF4 step next to zero for a 4-bit base, 0 (no floor) for a full-precision one."""
    from gallop_kernels.integrations.bitsandbytes.base import base_quantization
    from gallop_kernels.score_floor import quantization_floor

    out = []
    for m in modules:
        fmt = base_quantization(m.base)
        out.append(0.0 if fmt == "none" else quantization_floor(m.dequantized_weight(), fmt, fraction))
    return out


def _phase_one(
    model: nn.Module,
    target_modules: TargetModules | None,
    density: float,
    score: Score,
    score_eps: float,
    seed: int,
    chunk: int,
    run: Callable[[DeltaTaps], Any],
    quantization_floor: bool = False,
) -> tuple[dict[str, SparseDeltaLinear], Any]:
    """Wrap, ``run`` the accumulation into the taps, select, install; undone on any error."""
    targets = resolve_targets(model, ALL_LINEAR if target_modules is None else target_modules)
    for name, module in targets:
        if isinstance(module, SparseDeltaLinear) and module.delta_indices.numel() > 0:
            raise ValueError(
                f"layer {name} already carries a sparse delta; save it (sparse_delta_state) and "
                "reload the base before selecting again"
            )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    originals = [(n, m) for n, m in targets if not isinstance(m, SparseDeltaLinear)]
    wrapped: dict[str, SparseDeltaLinear] = {}
    try:
        wrapped = wrap_layers(model, targets)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        sink = DeltaTaps(wrapped)
        outcome = run(sink)
        names = list(wrapped)
        modules = [wrapped[n] for n in names]
        k = rules.k_for_density(sum(m.weight_numel for m in modules), float(density))
        floors = (rules.check_score_floor(quantization_floors(modules), len(modules), score)
                  if quantization_floor else None)
        chosen = streaming.select(
            _LazyWeights(modules), [sink.buffers[n].sum for n in names], k, score, score_eps, seed,
            names=[f"{n}.weight" for n in names], chunk=chunk, floors=floors,
        )
        del sink
    except BaseException:
        for name, module in originals:
            _set_submodule(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m in wrapped.values():
            m.delta_values.grad = None
        raise
    score_name = score if isinstance(score, str) else "callable"
    for module, indices in zip(modules, chosen):
        module.set_delta_indices(indices)
        module.selection_info = {"score": score_name, "density": repr(float(density))}
    for p in model.parameters():
        p.grad = None
    return wrapped, outcome


def _check_options(density: Any, score: Any, chunk: Any, quantization_floor: Any = False) -> None:
    check_fraction(density, "density")
    check_score(score)
    check_count(chunk, "chunk")
    if not isinstance(quantization_floor, bool):
        raise TypeError(f"quantization_floor must be True or False, got {quantization_floor!r}")
    if quantization_floor:
        rules.check_score_floor(0.0, 1, score, "quantization_floor")


def select_sparse_delta(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    density: float,
    score: Score = "gallop",
    target_modules: TargetModules | None = ALL_LINEAR,
    max_batches: int | None = None,
    *,
    score_eps: float = 1e-8,
    seed: int = 0,
    chunk: int = streaming.DEFAULT_CHUNK,
    quantization_floor: bool = False,
) -> dict[str, SparseDeltaLinear]:
    """GaLLoP phase one on a (4-bit) base: wrap, calibrate through gradient taps, select, install.

    Args:
        model: the model (e.g. a `transformers` causal LM loaded in 4 bits); changed in place.
        batches: calibration data; each item is passed to ``loss_fn``.
        loss_fn: ``batch -> scalar loss`` (runs the forward pass of ``model``); the gradient is
            averaged over the batches.
        density: fraction ρ of all wrapped weights' entries to select, in (0, 1].
        score: as in `docs/design.md#selection-semantics` ("gallop", "gradient", "magnitude",
            "random" or a callable); θ is the dequantized base weight, g the mean dense weight
            gradient over the batches.
        target_modules: which linear layers to wrap (`integrations.targets.resolve_targets`;
            default ``"all-linear"``: every linear layer but the output head).
        max_batches: use at most this many batches.
        score_eps, seed: as in `SparseAdamW`.
        chunk: entries scored at a time by the streaming select.
        quantization_floor: floor |θ| at half of each 4-bit base's NF4 step next to zero
            (`quantization_floors`, `docs/design.md#score-floor`): the base's zeros and tiny
            magnitudes then tie and rank by |g| alone. For the "gallop" and "magnitude" scores.

    Returns ``{module name: SparseDeltaLinear}`` for every wrapped layer (layers with no selected
    entry are wrapped too, with an empty, frozen delta). On return every parameter of ``model``
    has ``requires_grad=False`` except the non-empty ``delta_values``, and no ``.grad`` is set.
    The selection is one group over the wrapped layers in module order: ``k = min(N, max(1,
    floor(ρN + 0.5)))`` of the N wrapped entries, ties to the lower flat index.

    Bad options, unknown target names or a layer that already carries a non-empty delta raise
    before the model changes; an error during calibration or selection (no batches, a NaN score)
    restores the original layers and ``requires_grad`` flags.
    """
    _check_options(density, score, chunk, quantization_floor)
    check_count(max_batches, "max_batches", allow_none=True)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable (batch -> scalar loss)")
    wrapped, _ = _phase_one(
        model, target_modules, density, score, score_eps, seed, chunk,
        lambda sink: accumulate(sink, batches, loss_fn, max_batches=max_batches), quantization_floor,
    )
    return wrapped


def select_sparse_delta_from_dataset(
    model: nn.Module,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    density: float,
    score: Score = "gallop",
    target_modules: TargetModules | None = ALL_LINEAR,
    *,
    fraction: float = 0.05,
    batch_size: int = 8,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    score_eps: float = 1e-8,
    chunk: int = streaming.DEFAULT_CHUNK,
    quantization_floor: bool = False,
) -> tuple[dict[str, SparseDeltaLinear], int]:
    """:func:`select_sparse_delta` on the seeded calibration subset of a dataset, each batch
    weighted by its label tokens exactly as the Trainer callback does
    (`phase_one.calibrate_dataset`, `integrations.transformers.label_token_units`); ``seed`` seeds
    the subset and the "random" score. Returns the wrapped layers and the number of calibration
    examples. Every rank calibrates on the whole subset (no reduction)."""
    from gallop_kernels.integrations.transformers import label_token_units

    _check_options(density, score, chunk, quantization_floor)
    check_fraction(fraction, "calibration fraction")
    return _phase_one(
        model, target_modules, density, score, score_eps, seed, chunk,
        lambda sink: calibrate_dataset(model, sink, dataset, collate_fn, fraction=fraction,
                                       batch_size=batch_size, seed=seed,
                                       autocast_dtype=autocast_dtype, collective=None,
                                       units=label_token_units(model)),
        quantization_floor,
    )
