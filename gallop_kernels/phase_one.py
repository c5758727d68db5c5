"""GaLLoP phase one, written once: calibration data, one accumulation loop, the reduction, selection.

Phase one averages the task gradient over calibration data and selects from it
(`docs/design.md#phase-one`). Every caller goes through this module:

* :func:`calibrate` -- ``(optimizer, batches, loss_fn)``, gradients kept on the host;
* :func:`calibrate_dataset` -- a seeded fraction of a dataset, used by the Trainer callback and
  ``gallop finetune``, for the optimizer or for the 4-bit delta path;
* `integrations.bitsandbytes.select_sparse_delta` -- the 4-bit base, through gradient taps.

The pieces:

1. **Data.** :func:`calibration_subset` picks the seeded subset of ``ceil(d_s·N)`` examples;
   each rank takes every ``world_size``-th of them; each batch's loss is weighted by its share
   of the whole subset, so the sum over batches (and ranks) is the mean over examples.
2. **The loop.** :func:`accumulate` runs forward and backward over batches. Where the gradients
   go is the *sink*'s business (:class:`GradientSink`): :class:`DeviceGradients` leaves them in
   ``.grad``; :class:`HostGradients` moves each parameter's gradient into a
   :class:`HostGradientBuffer` in its post-accumulate-grad hook and frees it, so the device never
   holds the model's dense gradient; the 4-bit path's taps add each layer's dense weight
   gradient to the same buffer type.
3. **The RNG.** :func:`forked_rng` restores the global RNG afterwards: training that follows
   draws the same random numbers as without phase one (a resume stays exact).
4. **The reduction.** :func:`reduce_gradients` is the one distributed step: under DDP (plain
   params on every rank) it sums every rank's accumulated gradients through a *collective*
   (``world_size``, ``rank``, ``all_reduce_sum_``; :func:`default_collective` is
   `ops.collective.ProcessGroupCollective` over the world), device gradients and host buffers
   alike, so every rank selects the same entries. Under FSDP2 the model's own backward reduces
   (averages) each shard's gradient over the mesh, so each rank's loss is scaled by the mesh size
   instead, and every rank runs the same number of batches (FSDP2 all-gathers in each forward).
   See `docs/design.md#distributed`.
5. **Selection** stays with the owner of the entries: ``optimizer.select(gradients=...)``
   (streamed chunk by chunk from host buffers), or the 4-bit path's streaming select.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

from gallop_kernels.ops.collective import ProcessGroupCollective
from gallop_kernels.optim.distributed import is_dtensor, local
from gallop_kernels.optim.lean import HostGradientBuffer
from gallop_kernels.optim.unwrap import unwrap_optimizer
from gallop_kernels.rules import check_count, check_fraction

__all__ = [
    "Collective", "DeviceGradients", "GradientSink", "HostGradientBuffer", "HostGradients",
    "accumulate", "calibrate", "calibrate_dataset", "calibration_subset", "default_collective",
    "forked_rng", "optimizer_sink", "reduce_gradients", "select_from_sink",
]


# ----------------------------------------------------------------------------------------------
# The host buffer and the sinks
# ----------------------------------------------------------------------------------------------


class GradientSink:
    """Where the accumulation loop's gradients go (see the module docstring).

    A sink opens :meth:`capturing` around the loop, exposes what it accumulated as
    :meth:`tensors` (in a fixed order, the same on every rank) and sums them over the ranks in
    :meth:`reduce` (by default every tensor of :meth:`tensors`, e.g. host buffers).
    """

    reducible = True  # whether reduce() works (checked before the loop runs)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        yield

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def reduce(self, collective: "Collective") -> None:
        if not self.reducible:
            raise _not_reducible(self)
        for tensor in self.tensors():  # same tensors, same order on every rank
            collective.all_reduce_sum_(tensor)


def _not_reducible(sink: GradientSink) -> NotImplementedError:
    return NotImplementedError(
        f"{type(sink).__name__}: phase one under torch.distributed is not supported for this "
        "gradient sink yet (see docs/design.md#distributed)")


class DeviceGradients(GradientSink):
    """Gradients accumulate in the parameters' own ``.grad`` (the plain optimizer path)."""

    reducible = True

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        for p in self.params:
            p.grad = None
        yield

    def tensors(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def reduce(self, collective: "Collective") -> None:
        # Every rank reduces every parameter, in the same order, whatever its data.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            collective.all_reduce_sum_(p.grad)

    def gradients(self) -> None:
        """For ``optimizer.select(gradients=...)``: ``None`` means "the ``.grad`` s"."""
        return None


class HostGradients(GradientSink):
    """Each parameter's gradient moves to a :class:`HostGradientBuffer` in its
    post-accumulate-grad hook and is freed at once: at most one parameter's dense gradient
    exists on the device at a time (the lean path)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.buffers: dict[torch.Tensor, HostGradientBuffer] = {}

    def _offload(self, param: torch.Tensor) -> None:
        with torch.no_grad():
            self.buffers[param].add(local(param.grad))  # (FSDP2: the reduced local shard)
        param.grad = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        opt = self.optimizer
        opt.unfreeze()  # a new calibration scores every tensor
        opt.zero_grad(set_to_none=True)
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        self.buffers = {p: HostGradientBuffer(local(p).shape, p.device) for p in params}
        handles = [p.register_post_accumulate_grad_hook(self._offload) for p in params]
        try:
            with opt.paused_lean():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self) -> list[torch.Tensor]:
        return [b.sum for b in self.buffers.values()]

    def gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: b.sum for p, b in self.buffers.items()}


def optimizer_sink(optimizer: Any) -> DeviceGradients | HostGradients:
    """The sink for a SparseAdamW: host buffers in lean mode, ``.grad`` otherwise."""
    opt = unwrap_optimizer(optimizer)
    if opt.lean:
        return HostGradients(opt)
    return DeviceGradients(p for group in opt.param_groups for p in group["params"])


def select_from_sink(optimizer: Any, sink: DeviceGradients | HostGradients) -> None:
    """Install the selection from what ``sink`` accumulated, then clear every gradient."""
    opt = unwrap_optimizer(optimizer)
    opt.select(gradients=sink.gradients())
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def accumulate(
    sink: GradientSink,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    max_batches: int | None = None,
    average: bool = True,
) -> int:
    """Backward over ``batches`` (at most ``max_batches``) into ``sink``; returns the number used.

    ``average`` divides the sums by that number; leave it off when ``loss_fn`` already weights
    each batch. Raises ``ValueError`` when no batch ran.
    """
    check_count(max_batches, "max_batches", allow_none=True)
    with sink.capturing():
        used = _backward_over(batches, loss_fn, max_batches)
    if used == 0:
        raise _no_batches()
    if average:
        for tensor in sink.tensors():
            tensor.div_(used)
    return used


def _backward_over(batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor],
                   max_batches: int | None) -> int:
    used = 0
    for batch in batches:
        if max_batches is not None and used >= max_batches:
            break
        loss = loss_fn(batch)
        loss.backward()
        del loss
        used += 1
    return used


def _no_batches() -> ValueError:
    return ValueError(
        "phase one got no batches (no calibration batches to average the gradient over)")


@contextlib.contextmanager
def forked_rng(device: torch.device | str) -> Iterator[None]:
    """Restore the global CPU (and this CUDA device's) RNG state when the block ends."""
    device = torch.device(device)
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ----------------------------------------------------------------------------------------------
# The reduction (the one distributed step of phase one)
# ----------------------------------------------------------------------------------------------


class Collective(Protocol):
    """The ranks that share one selection (the shape of `gallop_kernels.ops.collective`)."""

    world_size: int
    rank: int

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None: ...


def default_collective() -> Collective | None:
    """The ``torch.distributed`` ranks when a process group with several ranks is up, else None
    (`ops.collective.ProcessGroupCollective`, the one adapter over ``torch.distributed``)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollective()
    return None


def _fsdp_mesh_size(model: nn.Module) -> int | None:
    """The data-parallel size FSDP2 averages gradients over, if the model's params are sharded
    DTensors (FSDP2 / HSDP), else None."""
    for p in model.parameters():
        if is_dtensor(p):
            return p.device_mesh.size()
    return None


def reduce_gradients(sink: GradientSink, collective: Collective | None) -> None:
    """Sum the accumulated gradients over the ranks (a no-op in one process)."""
    if collective is not None and collective.world_size > 1:
        sink.reduce(collective)


# ----------------------------------------------------------------------------------------------
# Phase one over a dataset
# ----------------------------------------------------------------------------------------------


def calibration_subset(num_examples: int, fraction: float, seed: int) -> list[int]:
    """The sorted, seeded random subset of ``ceil(fraction * num_examples)`` (>= 1) examples."""
    check_fraction(fraction, "calibration fraction")
    if num_examples < 1:
        raise ValueError("the training set is empty")
    count = min(num_examples, max(1, math.ceil(fraction * num_examples - 1e-9)))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_examples, generator=gen)[:count].tolist())


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def model_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(**inputs).loss`` (or ``model(*inputs)``): the default calibration loss."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    loss = out["loss"] if isinstance(out, Mapping) else (out.loss if hasattr(out, "loss") else out[0])
    if loss is None:
        raise ValueError("the model returned no loss during calibration: do the batches have labels?")
    return loss


def calibrate_dataset(
    model: nn.Module,
    sink: GradientSink,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    *,
    fraction: float = 0.05,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    collective: Collective | None | str = "auto",
    units: Callable[[Any], int] | None = None,
) -> int:
    """Accumulate the mean loss gradient over a seeded ``fraction`` of ``dataset`` into ``sink``.

    Each batch's loss is weighted by its share of the calibration *units*: what the loss is a
    mean over. By default a unit is an example; ``units(batch)`` counts them in a collated batch
    instead (e.g. label tokens, `integrations.transformers.label_token_units`, when the loss is
    the mean over a batch's label tokens). Then the gradient is the mean over every unit of the
    subset, whatever ``batch_size`` and number of ranks cut it into batches: the same examples
    select the same entries (to float rounding) under any micro-batching. Under several ranks
    (``collective``; ``"auto"``: `default_collective`, ``None``: this process alone) each rank
    takes its share of the examples and the sums are reduced, so every rank ends with the same
    mean; a sink that cannot be reduced is refused before any batch runs. A DDP-wrapped
    ``model`` runs under ``no_sync()`` (the reduction here is the only one). An FSDP2 model
    reduces in its own backward: each rank's loss is scaled by the mesh size (FSDP2 averages)
    and every rank runs the same number of batches (padded with zero-weight ones). The model
    runs in train mode (restored afterwards) and the global RNG state is restored. The caller
    then selects (e.g. :func:`select_from_sink`). Returns the number of calibration examples.
    """
    check_count(batch_size, "batch_size")
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError("calibration needs a dataset with a length (not an IterableDataset)") from None
    indices = calibration_subset(n, fraction, seed)
    total = len(indices)
    if collective == "auto":
        collective = default_collective()
    world, rank = (1, 0) if collective is None else (collective.world_size, collective.rank)
    mesh_size = _fsdp_mesh_size(model) if world > 1 else None
    if world > 1 and mesh_size is None and not sink.reducible:
        raise _not_reducible(sink)
    if mesh_size is not None:
        if mesh_size != world:
            raise ValueError(f"phase one under FSDP2 needs the device mesh to span every rank "
                             f"(mesh of {mesh_size}, {world} ranks)")
        if not isinstance(sink, (DeviceGradients, HostGradients)):
            raise NotImplementedError(f"{type(sink).__name__}: phase one of a sharded (FSDP2) "
                                      f"model takes the optimizer's sinks only")
    mine = indices[rank::world]
    device = torch.device(device if device is not None else next(model.parameters()).device)
    loss_fn = loss_fn or model_loss
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    scale = 1.0
    if mesh_size is not None:
        # FSDP2 averages over the mesh: scale so that the average is our sum; every rank runs
        # as many batches as rank 0 (the most examples), the extra ones weighing nothing.
        scale = float(mesh_size)
        most = -(-len(indices[0::world]) // batch_size)
        chunks += [[]] * (most - len(chunks))
    counts, total_units = _count_units(chunks, units, total, dataset, collate_fn, collective, world)
    # A batch without units (every label ignored) has no mean loss (0/0): one that has units runs
    # in its place with weight 0 (under FSDP2 every rank must run every forward).
    stand_in = next((c for c, n in zip(chunks, counts) if n), indices[:1])

    def weighted_loss(item: tuple[list[int], int]) -> torch.Tensor:
        chunk, n_units = item
        examples = [dataset[i] for i in (chunk if n_units else stand_in)]
        inputs = _to_device(collate_fn(examples), device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model, inputs)
        return loss.float() * (n_units / total_units * scale)

    was_training = model.training
    model.train()
    try:
        with forked_rng(device), _no_sync(model):
            if chunks:
                accumulate(sink, list(zip(chunks, counts)), weighted_loss, average=False)
        if mesh_size is None:
            reduce_gradients(sink, collective)
    finally:
        model.train(was_training)
    return total


def _count_units(
    chunks: list[list[int]], units: Callable[[Any], int] | None, examples: int, dataset: Any,
    collate_fn: Callable[[list[Any]], Any], collective: Collective | None, world: int,
) -> tuple[list[int], int]:
    """Per batch its units, and the total over every rank's batches.

    Examples by default (the total is the subset's size, known to every rank); else
    ``units`` of each collated batch, summed over the ranks by one all-reduce, which also
    carries a bad count from any rank, so that every rank raises alike."""
    if units is None:
        return [len(c) for c in chunks], examples
    counts, bad = [], None
    for c in chunks:
        value = units(collate_fn([dataset[i] for i in c])) if c else 0
        one = isinstance(value, torch.Tensor) and value.numel() == 1
        count = int(value.item()) if one else value
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            bad, count = value, 0
        counts.append(count)
    summed = torch.tensor([sum(counts), int(bad is not None)], dtype=torch.int64)
    if collective is not None and world > 1:
        collective.all_reduce_sum_(summed)
    total, bad_ranks = (int(v) for v in summed)
    if bad_ranks:
        raise ValueError(f"units(batch) must return a count >= 0; got {bad!r} here"
                         if bad is not None else
                         f"units(batch) returned a bad count on {bad_ranks} other rank(s)")
    if total == 0:
        raise ValueError("no calibration batch has anything to average over: every label of the "
                         "calibration examples is ignored (-100)")
    return counts, total


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` for a DDP-wrapped model (phase one reduces by itself), else nothing."""
    no_sync = getattr(model, "no_sync", None)
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and no_sync is not None:
        return no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Phase one over batches, for an optimizer
# ----------------------------------------------------------------------------------------------


def calibrate(
    optimizer: Any,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    max_batches: int | None = None,
    average: bool = True,
) -> int:
    """Average the task gradient over ``batches`` on the host, then ``optimizer.select`` from it.

    At most one parameter's dense gradient lives on the device at a time (:class:`HostGradients`);
    the mean gradient is streamed back chunk by chunk through the exact radix select. Cost: 4
    bytes of host memory per trainable entry (pinned with CUDA), one device-to-host copy of every
    gradient per batch, four chunked host-to-device passes during selection.

    Under several ranks every rank calls it with its own batches, and the mean is over every
    batch of every rank (`docs/design.md#distributed`): under DDP (plain params) DDP's own
    all-reduce is paused for the loop (``require_backward_grad_sync``) and the host sums are
    all-reduced once over the replicas, so ranks may hold different numbers of batches; under
    FSDP2 each backward already averages the shards' gradients, so every rank must run the same
    number of batches, which the ranks check before each one (a rank that runs out raises on
    every rank instead of leaving the others waiting in FSDP2's all-gather). With
    ``replica_check=False`` (ranks on their own) nothing is reduced.

    Args:
        optimizer: a `SparseAdamW` (lean or not).
        batches: calibration data (this rank's); each item is passed to ``loss_fn``.
        loss_fn: ``batch -> scalar loss`` (runs the forward pass).
        max_batches: stop after this many batches (the fraction d_s of the training data).
        average: divide the summed gradient by the number of batches (over all ranks);
            ``False`` when ``loss_fn`` already weights each batch (e.g. by its share of the
            calibration examples).

    Returns the number of batches this rank used. On return every parameter's ``.grad`` is None
    and the selection is installed (lean mode freezes as usual).
    """
    from gallop_kernels.optim import ddp, rendezvous

    check_count(max_batches, "max_batches", allow_none=True)
    opt = unwrap_optimizer(optimizer)
    sink = HostGradients(opt)
    mesh = _sharded_world(opt)
    if mesh is not None:
        rendezvous.together("calibrate()", [None])
        batches = _in_step(batches, max_batches)
    with sink.capturing(), ddp.sync_paused(opt) as found:
        used = _backward_over(batches, loss_fn, max_batches)
    total = _reduce_host_sums(opt, sink, used, mesh, found)
    if total == 0:
        raise _no_batches()
    for p, buffer in sink.buffers.items():
        if average:
            buffer.sum.div_(used if is_dtensor(p) else total)
        elif is_dtensor(p):
            buffer.sum.mul_(mesh)  # (FSDP2 averaged over the mesh; we want the sum)
    select_from_sink(optimizer, sink)
    return used


def _sharded_world(opt: Any) -> int | None:
    """The world size when the optimizer holds FSDP2-sharded params under several ranks (their
    backward reduces over a mesh that must span every rank), else None."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sharded = [p for p in params if is_dtensor(p)]
    dist = torch.distributed
    if not sharded or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    if sharded[0].device_mesh.size() != world:
        raise ValueError(f"calibrate() under FSDP2 needs the device mesh to span every rank "
                         f"(mesh of {sharded[0].device_mesh.size()}, {world} ranks)")
    return world


def _in_step(batches: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    """The batches, while every rank has one: before each, the ranks tell each other whether
    they have another (one tiny all-gather); if only some do, every rank raises."""
    collective = ProcessGroupCollective()
    source = iter(batches)
    taken = 0
    while True:
        batch, have = None, False
        if max_batches is None or taken < max_batches:
            for batch in source:
                have = True
                break
        every = collective.all_gather(torch.tensor([int(have)], dtype=torch.int64)).reshape(-1)
        if not bool(every.any()):
            return
        if not bool(every.all()):
            out = [r for r, h in enumerate(every.tolist()) if not h]
            raise ValueError(
                f"calibrate(): rank(s) {out} ran out of batches after {taken} while the others "
                f"have more: under FSDP2 every forward all-gathers the weights on every rank, so "
                f"every rank must calibrate on the same number of batches")
        taken += 1
        yield batch


def _reduce_host_sums(opt: Any, sink: "HostGradients", used: int, mesh: int | None,
                      found: list) -> int:
    """Sum plain params' host sums over their replicas (DDP); returns the batches of all ranks
    (FSDP2's backward already reduced sharded params: every rank ran ``used`` batches)."""
    from gallop_kernels.optim import rendezvous
    from gallop_kernels.optim.distributed import world_size

    plain = [p for p in sink.buffers if not is_dtensor(p)]
    if mesh is not None:
        if plain:
            raise ValueError("calibrate() under FSDP2 needs every trainable param sharded "
                             "(apply fully_shard to the root module too)")
        return used * mesh
    if world_size() == 1 or not opt.replica_check:
        return used
    group = getattr(opt.ddp_exchange, "process_group", None)
    if group is None and found:
        group = found[0].process_group
    rendezvous.together("calibrate()", [group])
    collective = ProcessGroupCollective(group)
    total = torch.tensor([used], dtype=torch.int64)
    collective.all_reduce_sum_(total)
    if int(total[0]):
        for p in plain:  # (the optimizer's order: the same on every rank)
            collective.all_reduce_sum_(sink.buffers[p].sum)
    return int(total[0])
