"""GaLLoP on a 4-bit (NF4) bitsandbytes base: the selected entries train as a sparse fp32 delta.

A `transformers` model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` holds its linear
weights as ``bitsandbytes.nn.Linear4bit`` (packed 4-bit codes, never trainable). GaLLoP still
applies, qSpIEL-style:

* :class:`SparseDeltaLinear` wraps a base linear layer (``Linear4bit`` or a plain frozen
  ``nn.Linear``) and holds ``delta_indices`` (sorted flat int32 indices into the weight, a buffer)
  and ``delta_values`` (a trainable fp32 ``nn.Parameter``, zeros at selection). Its forward is
  ``x @ (W + Δ)ᵀ + b`` where W is the dequantized base weight and Δ is ``delta_values`` scattered
  at ``delta_indices``. Only the delta trains; the 4-bit codes are never written.
* Phase one needs the gradient w.r.t. the dense weight, which bitsandbytes never computes. In
  "tap" mode the layer's backward computes ``grad_outᵀ x`` (fp32) and hands it at once to a host
  accumulator, so at most one layer's dense gradient exists on the device at a time.
* :func:`select_sparse_delta` wraps the target layers, calibrates through the taps, selects with
  the exact semantics of DESIGN §1 over all wrapped layers as one group (scores from the
  dequantized weight; `ops.streaming_select` fed one dequantized weight at a time), installs the
  indices and freezes everything except the delta values.

Memory (per wrapped layer of shape out × in, compute dtype c):

* forward: the dequantized weight plus Δ, in c, exists only inside the layer's forward (exactly as
  in bitsandbytes' own training path, which dequantizes and calls ``F.linear``); nothing dense is
  saved for backward, only the layer input.
* backward: ``grad_x = grad_out @ (W + Δ)`` re-dequantizes; the dense fp32 weight gradient
  ``grad_outᵀ x`` exists only long enough to gather its selected entries into
  ``delta_values.grad`` (or, in tap mode, to be added to the host accumulator).
* persistent: 4 bytes of index + 4 bytes of value per selected entry, plus 8 bytes of AdamW state
  (fp32 m, v) when trained with ``torch.optim.AdamW`` — see :func:`delta_optimizer`.
* calibration: an fp32 host accumulator per wrapped layer (4 bytes per weight entry on the host,
  pinned when the model is on CUDA), as in `optim/calibration.py`.

Activation checkpointing (reentrant or not) works: in tap mode a layer whose inputs need no
gradient still joins the graph through a throw-away leaf, and trained deltas are ordinary
parameters. ``model.state_dict()`` of a wrapped model holds the 4-bit weights under
``...<layer>.base.weight``; save the delta with :func:`sparse_delta_state` or
:func:`extract_sparse_delta` instead of saving the whole model.

Why there is no ``merge()``/``unmerge()`` for a 4-bit base: merging would re-quantize W + Δ to
NF4, whose step (about absmax/8 per block of 64) is far larger than a fine-tuning delta, so the
delta would mostly round away and could not be recovered exactly by ``unmerge``. Keep the delta
separate (it is tiny) and merge it onto a full-precision copy of the base instead
(:meth:`SparseDeltaLinear.dense_delta`, :func:`sparse_delta_state`).

CPU notes. bitsandbytes has CPU kernels for 4-bit dequantization, which is all this module needs
from it; the matmuls are plain ``F.linear``. On an AVX512-BF16 CPU, ``Linear4bit.forward`` in eval
mode without grad repacks the weight *in place* into a CPU inference layout (with bf16 absmax), after
which ``dequantize_4bit`` no longer applies; this module therefore never calls the bitsandbytes
forward on CPU (it always uses the dequantize + ``F.linear`` path, which is what bitsandbytes itself
runs for training), and refuses a weight that was already repacked.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gallop_kernels import reference
from gallop_kernels.ops.streaming_select import DEFAULT_CHUNK, streaming_select
from gallop_kernels.reference import Score

try:  # bitsandbytes is optional: plain nn.Linear bases work without it.
    import bitsandbytes as _bnb
    import bitsandbytes.functional as _bnb_functional
except ImportError:  # pragma: no cover - exercised only where bitsandbytes is missing
    _bnb = None
    _bnb_functional = None

__all__ = [
    "SparseDeltaLinear",
    "HostGradientAccumulator",
    "select_sparse_delta",
    "sparse_delta_state",
    "sparse_delta_modules",
    "delta_parameters",
    "delta_optimizer",
    "gradient_taps",
    "load_sparse_delta_state",
    "extract_sparse_delta",
    "apply_sparse_delta",
]


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (NF4/FP4)."""
    return _bnb is not None and isinstance(module, _bnb.nn.Linear4bit)


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight of a ``Linear4bit`` (dequantized, a fresh tensor) or ``nn.Linear`` (itself).

    The dequantized weight has the dtype the model was quantized from (``quant_state.dtype``).
    """
    if is_linear4bit(base):
        weight = base.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            state = getattr(base, "quant_state", None)
        if state is None:
            raise ValueError("this Linear4bit has no quant_state (it was never quantized)")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "this Linear4bit was repacked in place for bitsandbytes' CPU inference kernel "
                "(it ran in eval mode without grad on an AVX512-BF16 CPU); dequantize_4bit cannot "
                "read that layout. Wrap the model before running inference on it, or reload it."
            )
        return _bnb_functional.dequantize_4bit(weight.data, state)
    return base.weight.detach()


# ----------------------------------------------------------------------------------------------
# Host accumulator for the dense weight gradients of calibration
# ----------------------------------------------------------------------------------------------


class HostGradientAccumulator:
    """An fp32 host buffer of one layer's weight shape that sums the dense gradients it is given.

    Pinned when the layer lives on CUDA. ``add`` copies the gradient to the host and returns; the
    caller frees the device tensor right after, so the device never holds more than one.
    """

    def __init__(self, shape: tuple[int, int], device: torch.device) -> None:
        pin = device.type == "cuda"
        self.sum = torch.zeros(shape, dtype=torch.float32, pin_memory=pin)
        self.count = 0  # number of gradients added (a layer may run several times per batch)

    def add(self, grad: torch.Tensor) -> None:
        self.sum.add_(grad.detach().to("cpu", torch.float32))
        self.count += 1


# ----------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------


def _weight_grad(grad_out_2d: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
    """The dense weight gradient ``grad_outᵀ x`` in float32 (out × in)."""
    if grad_out_2d.dtype == torch.float32 and x_2d.dtype == torch.float32:
        return grad_out_2d.t().mm(x_2d)
    if grad_out_2d.is_cuda:
        try:  # bf16/fp16 inputs with an fp32 result, without fp32 copies of the activations
            return torch.mm(grad_out_2d.t(), x_2d, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return grad_out_2d.float().t().mm(x_2d.float())


class _SparseDeltaLinearFn(torch.autograd.Function):
    """``y = x @ (W + Δ)ᵀ + b`` with Δ = scatter(values at indices); only sparse state is saved.

    backward: ``grad_x = grad_out @ (W + Δ)`` (W dequantized again), ``grad_values =
    (grad_outᵀ x).flatten()[indices]`` and, in tap mode, the dense ``grad_outᵀ x`` goes to the
    layer's host accumulator. The dense weight gradient is freed before ``grad_x`` is computed.
    """

    @staticmethod
    def forward(ctx, x, values, bias, module):  # type: ignore[override]
        ctx.module = module
        ctx.tap = module._tap
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        weight = module.effective_weight(x.dtype, values)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, values = ctx.saved_tensors
        module: SparseDeltaLinear = ctx.module
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_values = grad_bias = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_values or ctx.tap is not None:
            dense = _weight_grad(grad_2d, x.reshape(-1, x.shape[-1]))
            if ctx.tap is not None:
                ctx.tap.add(dense)
            if need_values:
                grad_values = dense.view(-1).index_select(0, module.delta_indices.to(torch.int64))
            del dense  # the only dense weight gradient of this layer; freed here
        if need_x:
            weight = module.effective_weight(grad_out.dtype, values)
            grad_x = grad_out.matmul(weight)
            del weight
        if need_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, grad_bias, None


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


class SparseDeltaLinear(nn.Module):
    """A frozen base linear layer (``Linear4bit`` or ``nn.Linear``) plus a trainable sparse delta.

    ``forward(x) = x @ (W + Δ)ᵀ + b`` with W the (dequantized) base weight and Δ the dense
    weight-shaped tensor holding ``delta_values`` at the flat positions ``delta_indices``.
    W + Δ is formed in the compute dtype (bitsandbytes' ``compute_dtype``, else the input's), with
    each selected entry rounded once from the fp32 sum, for one layer at a time, and is not saved
    for backward. ``delta_values`` are fp32 and are the master copy: in a bf16 forward a delta
    smaller than half a bf16 ulp of its weight does not change the output yet, but it is not lost.

    Attributes:
        base: the wrapped layer (left untouched; its weight never requires grad).
        delta_indices: sorted flat int32 indices (int64 for a weight of ≥ 2³¹ entries), a buffer.
        delta_values: fp32 ``nn.Parameter``, one value per index.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"SparseDeltaLinear wraps nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}"
            )
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = base.weight.device
        self.register_buffer(
            "delta_indices",
            torch.empty(0, dtype=reference.index_dtype(self.weight_numel), device=device),
        )
        self.delta_values = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=device))
        self._tap: HostGradientAccumulator | None = None
        self.selection_info: dict[str, str] = {}  # set by select_sparse_delta (for metadata)

    # -- shapes and weights ------------------------------------------------------------------

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def is_4bit(self) -> bool:
        return is_linear4bit(self.base)

    def dequantized_weight(self) -> torch.Tensor:
        """The base's dense weight (a fresh dequantized tensor for a 4-bit base)."""
        return dequantized_weight(self.base)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.is_4bit:
            return self.base.compute_dtype or x.dtype
        return self.base.weight.dtype

    def effective_weight(self, dtype: torch.dtype, values: torch.Tensor | None = None) -> torch.Tensor:
        """W + Δ in ``dtype``: a fresh dense tensor; each selected entry rounded once from fp32."""
        base = self.dequantized_weight()
        values = self.delta_values if values is None else values
        weight = base.to(dtype)
        if self.delta_indices.numel() == 0:
            return weight
        if weight.data_ptr() == base.data_ptr() and not self.is_4bit:
            weight = weight.clone()  # never write into an nn.Linear base's own weight
        idx = self.delta_indices.to(torch.int64)
        summed = base.reshape(-1).index_select(0, idx).float() + values.detach().float()
        weight.view(-1).index_copy_(0, idx, summed.to(dtype))
        return weight

    def dense_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Δ as a dense weight-shaped tensor (for merging onto a full-precision base)."""
        out = torch.zeros(self.weight_numel, dtype=dtype, device=self.delta_values.device)
        out.index_copy_(0, self.delta_indices.to(torch.int64), self.delta_values.detach().to(dtype))
        return out.view(self.weight_shape)

    # -- the delta ---------------------------------------------------------------------------

    def set_delta_indices(self, indices: torch.Tensor) -> None:
        """Install a selection: sorted unique flat indices; the values restart at zero.

        ``delta_values`` becomes a new Parameter: build the optimizer after this.
        """
        idx = torch.as_tensor(indices).reshape(-1).to(torch.int64)
        if idx.numel() > 0:
            if int(idx.min()) < 0 or int(idx.max()) >= self.weight_numel:
                raise ValueError(f"delta indices must lie in [0, {self.weight_numel})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError("delta indices must be sorted and unique")
        device = self.delta_values.device
        self.delta_indices = idx.to(device=device, dtype=reference.index_dtype(self.weight_numel))
        self.delta_values = nn.Parameter(
            torch.zeros(idx.numel(), dtype=torch.float32, device=device),
            requires_grad=idx.numel() > 0,
        )

    def load_delta(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Install a saved delta (indices and their values)."""
        values = torch.as_tensor(values).reshape(-1)
        if values.numel() != torch.as_tensor(indices).numel():
            raise ValueError("indices and values must have the same number of entries")
        self.set_delta_indices(indices)
        with torch.no_grad():
            self.delta_values.copy_(values.to(torch.float32))

    # -- forward -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def tap(self, accumulator: HostGradientAccumulator) -> Iterator[HostGradientAccumulator]:
        """Within the block, every backward through this layer adds its dense weight gradient
        (``grad_outᵀ x``, fp32) to ``accumulator`` — the gradient the base weight would have."""
        previous = self._tap
        self._tap = accumulator
        try:
            yield accumulator
        finally:
            self._tap = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.delta_indices.numel() == 0 and self._tap is None
        if plain and (not self.is_4bit or x.device.type != "cpu"):
            return self.base(x)  # no delta: the base's own (possibly fused) kernel
        inp_dtype = x.dtype
        dtype = self.compute_dtype(x)
        bias = self.base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        values = self.delta_values
        if self._tap is not None and not values.requires_grad:
            # The tap needs a backward through this layer even when nothing before it trains.
            values = values.detach().requires_grad_(True)
        out = _SparseDeltaLinearFn.apply(x.to(dtype), values, bias, self)
        return out.to(inp_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"base={type(self.base).__name__}, selected={self.delta_indices.numel()}"
        )


# ----------------------------------------------------------------------------------------------
# Finding and wrapping target layers
# ----------------------------------------------------------------------------------------------


def sparse_delta_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """Every :class:`SparseDeltaLinear` in ``model``, by qualified module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _candidate_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers (incl. Linear4bit and existing wrappers), never a wrapper's inner base."""
    out = []
    inner = set()
    for name, module in model.named_modules():
        if id(module) in inner:
            continue
        if isinstance(module, SparseDeltaLinear):
            inner.add(id(module.base))
            out.append((name, module))
        elif isinstance(module, nn.Linear):
            out.append((name, module))
    return out


def _inside_module_list(model: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` sits inside an ``nn.ModuleList`` (the decoder layers)."""
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, nn.ModuleList):
            return True
    return False


def resolve_targets(
    model: nn.Module, target_modules: Iterable[str] | str | None = None
) -> list[tuple[str, nn.Module]]:
    """The layers to wrap, in module order.

    ``None``: every ``nn.Linear``/``Linear4bit`` inside an ``nn.ModuleList`` (the decoder layers of
    a `transformers` model), never the output embedding (``lm_head``). Otherwise a list of names,
    each matching a linear layer's qualified name exactly or its last components (``"q_proj"``,
    ``"mlp.down_proj"``); a name that matches no linear layer is a ``ValueError``.
    """
    candidates = _candidate_linears(model)
    head = _output_embedding(model)
    if target_modules is None:
        chosen = [
            (n, m) for n, m in candidates
            if m is not head and _inside_module_list(model, n)
            and not (isinstance(m, SparseDeltaLinear) and m.base is head)
        ]
        if not chosen:
            raise ValueError("found no linear layer inside the model's decoder layers to wrap")
        return chosen
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    all_names = {n for n, _ in model.named_modules()}
    chosen_names: set[str] = set()
    for target in targets:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target module names must be non-empty strings, got {target!r}")
        hits = [n for n, _ in candidates if n == target or n.endswith("." + target)]
        if not hits:
            if any(n == target or n.endswith("." + target) for n in all_names):
                raise ValueError(f"target module {target!r} is not an nn.Linear / Linear4bit layer")
            raise ValueError(f"unknown target module {target!r}: no linear layer has that name")
        chosen_names.update(hits)
    return [(n, m) for n, m in candidates if n in chosen_names]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ----------------------------------------------------------------------------------------------
# Calibration and selection
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gradient_taps(modules: dict[str, SparseDeltaLinear]) -> Iterator[dict[str, HostGradientAccumulator]]:
    """Tap every module's dense weight gradient into its own host accumulator (see
    :meth:`SparseDeltaLinear.tap`); yields ``{name: accumulator}``."""
    accumulators = {
        name: HostGradientAccumulator(m.weight_shape, m.delta_values.device)
        for name, m in modules.items()
    }
    with contextlib.ExitStack() as stack:
        for name, m in modules.items():
            stack.enter_context(m.tap(accumulators[name]))
        yield accumulators


class _LazyWeights(Sequence):
    """The wrapped layers' dense weights, dequantized one at a time as `streaming_select` walks them.

    `streaming_select` only iterates its ``params`` (``zip``, ``sum(p.numel() for p in params)``),
    so each iteration dequantizes a layer and drops it at the next: at most two dequantized layers
    exist at once. It iterates 6 times (size, three radix passes, compaction, final device list).
    """

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


def _check_options(density: Any, score: Any, max_batches: Any, loss_fn: Any) -> None:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a real number, got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:  # also rejects NaN
        raise ValueError(f"invalid density: {density} (must be in (0, 1])")
    if not callable(score) and score not in reference.SCORE_NAMES:
        raise ValueError(
            f"unknown score {score!r}; expected one of {reference.SCORE_NAMES} or a callable"
        )
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
            raise TypeError(f"max_batches must be None or an int, got {type(max_batches).__name__}")
        if max_batches < 1:
            raise ValueError(f"invalid max_batches: {max_batches} (must be >= 1 or None)")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable (batch -> scalar loss)")


def select_sparse_delta(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    density: float,
    score: Score = "gallop",
    target_modules: Iterable[str] | str | None = None,
    max_batches: int | None = None,
    *,
    score_eps: float = 1e-8,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, SparseDeltaLinear]:
    """GaLLoP phase one on a (4-bit) base: wrap, calibrate through gradient taps, select, install.

    Args:
        model: the model (e.g. a `transformers` causal LM loaded in 4 bits); changed in place.
        batches: calibration data; each item is passed to ``loss_fn``.
        loss_fn: ``batch -> scalar loss`` (runs the forward pass of ``model``).
        density: fraction ρ of all wrapped weights' entries to select, in (0, 1].
        score: as in DESIGN §1 ("gallop", "gradient", "magnitude", "random" or a callable);
            θ is the dequantized base weight, g the mean dense weight gradient over the batches.
        target_modules: see :func:`resolve_targets` (default: every linear layer of the decoder
            layers, not ``lm_head``).
        max_batches: use at most this many batches.
        score_eps, seed: as in `SparseAdamW`.
        chunk: entries scored at a time by the streaming select.

    Returns ``{module name: SparseDeltaLinear}`` for every wrapped layer (layers with no selected
    entry are wrapped too, with an empty, frozen delta). On return every parameter of ``model``
    has ``requires_grad=False`` except the non-empty ``delta_values``, and no ``.grad`` is set.
    The selection is one group over the wrapped layers in module order: ``k = min(N, max(1,
    floor(ρN + 0.5)))`` of the N wrapped entries, ties to the lower flat index.

    Bad options, unknown target names or a layer that already carries a non-empty delta raise
    before the model changes; an error during calibration or selection (no batches, a NaN score)
    restores the original layers and ``requires_grad`` flags.
    """
    _check_options(density, score, max_batches, loss_fn)
    targets = resolve_targets(model, target_modules)
    for name, module in targets:
        if isinstance(module, SparseDeltaLinear) and module.delta_indices.numel() > 0:
            raise ValueError(
                f"layer {name} already carries a sparse delta; save it (sparse_delta_state) and "
                "reload the base before selecting again"
            )

    flags = [(p, p.requires_grad) for p in model.parameters()]
    originals: list[tuple[str, nn.Module]] = []
    wrapped: dict[str, SparseDeltaLinear] = {}
    try:
        for name, module in targets:
            if isinstance(module, SparseDeltaLinear):
                wrapped[name] = module
            else:
                wrapper = SparseDeltaLinear(module)
                _set_submodule(model, name, wrapper)
                originals.append((name, module))
                wrapped[name] = wrapper
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None

        used = 0
        with gradient_taps(wrapped) as sums:
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                loss = loss_fn(batch)
                loss.backward()
                del loss
                used += 1
        if used == 0:
            raise ValueError("select_sparse_delta() got no calibration batches")
        names = list(wrapped)
        modules = [wrapped[n] for n in names]
        grads = [sums[n].sum.div_(used) for n in names]
        total = sum(m.weight_numel for m in modules)
        k = reference.k_for_density(total, float(density))
        chosen = streaming_select(
            _LazyWeights(modules), grads, k, score, score_eps, seed,
            names=[f"{n}.weight" for n in names], chunk=chunk,
        )
        del grads, sums
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
    return wrapped


# ----------------------------------------------------------------------------------------------
# Training and saving
# ----------------------------------------------------------------------------------------------


def delta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, delta_values)`` of every non-empty sparse delta in ``model``, in module order."""
    return [
        (f"{name}.delta_values", m.delta_values)
        for name, m in sparse_delta_modules(model).items()
        if m.delta_values.numel() > 0
    ]


def delta_optimizer(model: nn.Module, lr: float = 1e-4, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the delta values (fused where the device supports it).

    The delta values *are* the selected entries, so plain AdamW is the right optimizer: its state
    is fp32 ``exp_avg`` and ``exp_avg_sq``, 8 bytes per selected entry (+ the 4-byte value and
    4-byte index the module holds). `SparseAdamW(density=1.0)` works too and gives the same
    update (DESIGN §1), but would keep a redundant int32 index per entry (12 bytes of state).

    Note that weight decay here shrinks Δ towards the pre-trained base (as LoRA/SpIEL do), not
    the full weight W + Δ towards zero as `SparseAdamW` on a dense model would.
    """
    params = [p for _, p in delta_parameters(model)]
    if not params:
        raise ValueError("the model has no non-empty sparse delta; run select_sparse_delta first")
    if "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = params[0].device.type in ("cuda", "cpu", "xpu", "mps")
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def sparse_delta_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (indices, values)}`` for every non-empty sparse delta in ``model``.

    The layer name is the wrapped module's qualified name, which is also the name of the linear
    layer in the unwrapped base model (its weight is ``f"{name}.weight"``). Indices are the sorted
    flat int32 (int64 for ≥ 2³¹ entries) positions in that weight, values fp32; both detached
    copies on the CPU, ready for safetensors.
    """
    return {
        name: (m.delta_indices.detach().cpu().clone(), m.delta_values.detach().cpu().clone())
        for name, m in sparse_delta_modules(model).items()
        if m.delta_indices.numel() > 0
    }


def load_sparse_delta_state(
    model: nn.Module, state: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, SparseDeltaLinear]:
    """Wrap the named layers of ``model`` (if not wrapped yet) and install the saved deltas.

    Everything is checked (names, index ranges) before the model changes; afterwards only the
    delta values require grad.
    """
    plan = []
    for name, (indices, values) in state.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the model has no layer named {name!r}") from exc
        if not isinstance(module, (nn.Linear, SparseDeltaLinear)):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a linear layer")
        numel = module.in_features * module.out_features
        idx = torch.as_tensor(indices).reshape(-1).to(torch.int64)
        if torch.as_tensor(values).numel() != idx.numel():
            raise ValueError(f"layer {name!r}: indices and values differ in length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"layer {name!r}: delta indices out of range for {numel} entries")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"layer {name!r}: delta indices must be sorted and unique")
        plan.append((name, module, idx, values))
    out = {}
    for name, module, idx, values in plan:
        if not isinstance(module, SparseDeltaLinear):
            module_new = SparseDeltaLinear(module)
            _set_submodule(model, name, module_new)
            module = module_new
        module.load_delta(idx, values)
        out[name] = module
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in delta_parameters(model):
        p.requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------------------
# The gallop_kernels.delta file format
# ----------------------------------------------------------------------------------------------


def _base_quantization(module: SparseDeltaLinear) -> str:
    if module.is_4bit:
        state = getattr(module.base.weight, "quant_state", None)
        return str(getattr(state, "quant_type", "4bit"))
    return "none"


def extract_sparse_delta(
    model: nn.Module, *, base_model: str = "", metadata: dict[str, Any] | None = None
) -> Any:
    """The model's sparse deltas as a `gallop_kernels.delta.SparseDelta` (for ``save_delta``).

    That format stores, per tensor name, the *trained values themselves* (``apply_delta`` writes
    them in place), so the values here are ``W_dequantized[indices] + delta_values`` in fp32, under
    the name ``f"{layer}.weight"`` of the unwrapped model. Applied with ``delta.apply_delta`` to a
    dense model holding the dequantized base weights, it reproduces the trained model. Applied to
    the *full-precision* base it overwrites the selected entries with dequantized-base + Δ (the
    NF4 rounding error of those entries included); the format has no additive mode that would add
    Δ to the full-precision weights instead (use :func:`sparse_delta_state` for that).
    """
    from gallop_kernels import delta as delta_format

    indices, values, shapes = {}, {}, {}
    quant, scores, densities = set(), set(), set()
    for name, m in sparse_delta_modules(model).items():
        if m.delta_indices.numel() == 0:
            continue
        key = f"{name}.weight"
        idx = m.delta_indices.to(torch.int64)
        base = m.dequantized_weight().reshape(-1).index_select(0, idx).float()
        indices[key] = m.delta_indices.detach().cpu().clone()
        values[key] = (base + m.delta_values.detach().float()).cpu().contiguous()
        shapes[key] = m.weight_shape
        quant.add(_base_quantization(m))
        if m.selection_info:
            scores.add(m.selection_info["score"])
            densities.add(m.selection_info["density"])
    if not indices:
        raise ValueError("the model has no non-empty sparse delta: nothing to extract")
    meta = {
        "format": delta_format.FORMAT,
        "version": delta_format.VERSION,
        "base_model": str(base_model),
        "score": ",".join(sorted(scores)),
        "density": ",".join(sorted(densities)),
        "dtype": "float32",
        "num_entries": str(sum(v.numel() for v in values.values())),
        "base_quantization": ",".join(sorted(quant)),
        "values": "dequantized base + sparse delta",
    }
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return delta_format.SparseDelta(indices, values, shapes, meta)


def apply_sparse_delta(model: nn.Module, delta: Any) -> dict[str, SparseDeltaLinear]:
    """Install a delta written by :func:`extract_sparse_delta` (a `SparseDelta` or a file path)
    onto a freshly loaded (4-bit) base: the stored values minus the dequantized base become the
    trainable ``delta_values``. Everything is checked before the model changes."""
    from gallop_kernels import delta as delta_format

    if not isinstance(delta, delta_format.SparseDelta):
        delta = delta_format.load_delta(delta)
    state = {}
    for key, idx in delta.indices.items():
        if not key.endswith(".weight"):
            raise ValueError(f"delta tensor {key!r} is not a linear layer's weight")
        name = key[: -len(".weight")]
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the model has no layer named {name!r}") from exc
        if not isinstance(module, (nn.Linear, SparseDeltaLinear)):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a linear layer")
        shape = (module.out_features, module.in_features)
        if tuple(delta.shapes[key]) != shape:
            raise ValueError(f"{key}: delta shape {tuple(delta.shapes[key])} != layer shape {shape}")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[0] * shape[1]):
            raise ValueError(f"{key}: delta index out of range")
        base_module = module.base if isinstance(module, SparseDeltaLinear) else module
        base = dequantized_weight(base_module).reshape(-1).index_select(0, idx.to(base_module.weight.device))
        state[name] = (idx, delta.values[key].float() - base.float().cpu())
    return load_sparse_delta_state(model, state)
