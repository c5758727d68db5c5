"""Where each param group's tensors live across ranks, resolved when the optimizer needs it.

SparseAdamW runs unchanged on one process, under DDP (every rank holds the whole tensor and
DDP averages the gradients) and under FSDP2 (``fully_shard``: every param is a DTensor whose
rank-local shard is a run of whole rows, ``Shard(0)``; HSDP adds a replicate dimension). This
module is the one place that tells them apart (see ``docs/design.md#distributed``):

- :func:`local` is what the kernels and the state see: ``to_local()`` of a DTensor, else the
  tensor itself. Optimizer state is per shard (ragged across ranks), keyed by the DTensor.
- :func:`placement` resolves a group *at the time of use* (accelerate swaps the params after
  sharding): the :class:`~gallop_kernels.ops.collective.ShardLayout` of a sharded group (global
  total, per-tensor global flat offsets, the collective over the shard dimension), the ranks that
  hold identical replicas (DDP's world, HSDP's replicate dimension), and each tensor's flat range.
- :func:`check_supported` refuses, naming the alternative, what cannot be mapped onto exact global
  selection: tensor parallelism (a ``Shard`` on a dim other than 0, strided or partial
  placements), FSDP1 flat parameters, DeepSpeed ZeRO partitions.
- :func:`check_replicas` runs after every selection: a fingerprint of the selected indices is
  gathered from the ranks that must agree, and any disagreement raises on every rank.
- :func:`all_gradients_zero` recognises the zero-gradient step that torch's
  ``_init_optim_state`` (``get_optimizer_state_dict``) and DeepSpeed take before training.

DDP in lean mode (compact gradients, frozen tensors) is `optim/ddp.py`.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from gallop_kernels import rules
from gallop_kernels.ops.collective import ProcessGroupCollective, ShardLayout

__all__ = [
    "GroupPlacement", "all_gradients_zero", "check_names", "check_replicas", "check_state_bits",
    "check_supported",
    "global_indices", "is_dtensor", "local", "placement", "world_size",
]


# ----------------------------------------------------------------------------------------------
# DTensor basics (torch.distributed may be missing from a torch build: everything is lazy)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _dtensor_class() -> type | None:
    """DTensor, or None in a torch build without torch.distributed (looked up once: every
    optimizer call asks, once per tensor)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The rank-local data of ``tensor``: ``to_local()`` of a DTensor (a view: in-place updates
    reach the param), else the tensor itself."""
    if tensor is not None and is_dtensor(tensor):
        return tensor.to_local()
    return tensor


def world_size() -> int:
    """Ranks of the default process group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

_SUPPORTED = (
    "SparseAdamW supports one process, DDP, and FSDP2 / HSDP "
    "(torch.distributed.fsdp.fully_shard, which shards every param on dim 0)"
)


def _flat_param_error(name: object) -> ValueError:
    return ValueError(
        f"parameter {name} is an FSDP1 flat parameter (FullyShardedDataParallel): it flattens "
        f"many weights into one 1-D shard, so no weight's entries can be scored or indexed. "
        f"{_SUPPORTED}: shard with fully_shard(model) and build the optimizer from "
        f"model.named_parameters() afterwards"
    )


def _zero_error(name: object) -> ValueError:
    return ValueError(
        f"parameter {name} is a DeepSpeed ZeRO partition: ZeRO hands the optimizer flattened "
        f"partitions of many weights, so no weight's entries can be scored or indexed. "
        f"{_SUPPORTED}: use FSDP2 (fully_shard) instead of ZeRO-3, or DDP instead of ZeRO-1/2"
    )


def _placement_error(name: object, placements: Any, why: str) -> ValueError:
    return ValueError(
        f"parameter {name} is a DTensor with placements {tuple(placements)}: {why}. "
        f"{_SUPPORTED}; tensor parallelism (a Shard on another dim, strided or partial "
        f"placements) is not supported: keep tensor-parallel weights out of SparseAdamW, or use "
        f"FSDP2 alone"
    )


def check_names(names: Sequence[str]) -> None:
    """Refuse FSDP1's wrapped names (its ``use_orig_params`` views are plain tensors otherwise)."""
    for name in names:
        if "_fsdp_wrapped_module" in name or "_flat_param" in name:
            raise _flat_param_error(repr(name))


_CHECKED_ATTR = "_gallop_placement_checked"
"""Set on a DTensor param whose (mesh, placements, shape) were mapped: the check runs once."""


def check_supported(params: Sequence[torch.Tensor], names: Sequence[object]) -> None:
    """Refuse params that no exact global selection can address (before anything changes).

    Runs every step (params may be swapped): metadata only, and a DTensor's placements are
    mapped once per (param, placements). ``names`` are formatted only for a message.
    """
    dtensors = []
    for p, name in zip(params, names):
        if getattr(p, "_is_flat_param", False):
            raise _flat_param_error(name)
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise _zero_error(name)
        if is_dtensor(p):
            key = (id(p.device_mesh), tuple(p.placements), tuple(p.shape))
            if getattr(p, _CHECKED_ATTR, None) != key:
                _check_placements(p, name)
                setattr(p, _CHECKED_ATTR, key)
            dtensors.append((p, name))
    if not dtensors:
        return
    if len(dtensors) != len(params):
        plain = next(name for p, name in zip(params, names) if not is_dtensor(p))
        raise ValueError(
            f"parameter {plain} is a plain tensor but {dtensors[0][1]} of the same param group is "
            f"sharded (a DTensor): with FSDP2, apply fully_shard to the root module too "
            f"(fully_shard(model)), so that every trainable param is sharded"
        )
    mesh, shard_dims = dtensors[0][0].device_mesh, _shard_mesh_dims(dtensors[0][0])
    for p, name in dtensors[1:]:
        if p.device_mesh != mesh or _shard_mesh_dims(p) != shard_dims:
            raise ValueError(
                f"parameter {name} is sharded over {p.device_mesh} {tuple(p.placements)}, but "
                f"{dtensors[0][1]} of the same param group over {mesh} "
                f"{tuple(dtensors[0][0].placements)}: selection is one global step per group, "
                f"so put params sharded differently into different param groups"
            )


def _shard_mesh_dims(p: Any) -> tuple[int, ...]:
    from torch.distributed.tensor import Shard

    return tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


def _check_placements(p: Any, name: object) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shards = 0
    for pl in p.placements:
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and pl.dim == 0:
            shards += 1
            continue
        if type(pl) is Shard:
            raise _placement_error(name, p.placements, f"it is sharded on dim {pl.dim}, whose "
                                   f"local entries are not one run of the flat weight")
        raise _placement_error(name, p.placements, f"the placement {pl} cannot be mapped onto "
                               f"global flat indices")
    if shards > 1:
        raise _placement_error(name, p.placements, "dim 0 is sharded over several mesh dims")
    shape, _ = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(p.to_local().shape):
        raise _placement_error(
            name, p.placements, f"its local shard has shape {tuple(p.to_local().shape)} where "
            f"the placements give {tuple(shape)}")


def check_state_bits(params: Sequence[torch.Tensor], state_bits: int, where: str) -> None:
    """Refuse 8-bit moments for a group sharded over several ranks (FSDP2's shard dim).

    8-bit moments are quantized in blocks of 256 selected entries, formed over each rank's own
    selected entries: with the shard boundaries between ranks, the blocks (and so the codes and
    the trained weights) would depend on the number of ranks, and a checkpoint resharded to
    another world size would be requantized differently. Making the blocks global would need a
    collective in every step and a state layout that every checkpoint path knows, to save
    little: under FSDP2 each rank holds 1/world of the sparse state already (predicted by
    `gallop memory` for Llama-3-70B at 1 %, lean, on 8 GPUs: 36.7 GB per GPU with fp32
    moments, 36.2 GB with 8-bit ones).
    Metadata only; runs when the group is built and before every step.
    """
    if state_bits != 8 or not params or not is_dtensor(params[0]):
        return
    place = placement(params)
    if place.sharded:
        raise ValueError(
            f"{where}: state_bits=8 with params sharded over {place.shard_world} ranks (FSDP2): "
            f"8-bit moments are quantized in blocks of 256 selected entries formed per rank "
            f"shard, so the result would depend on the number of ranks (and change when a "
            f"checkpoint is resharded). Use state_bits=32 under FSDP2 (each rank keeps only "
            f"its shard's sparse state: 1/{place.shard_world} of it), or 8-bit state under DDP, "
            f"HSDP with one shard per replica, or one process; an 8-bit checkpoint loads into "
            f"state_bits=32 with load_state_dict(..., convert_layout=True)")


def check_same_shapes(
    params: Sequence[torch.Tensor], names: Sequence[object], shapes: Sequence[tuple[int, ...]]
) -> None:
    """Params put into a group after construction (accelerate does it after sharding) must have
    the global shapes of those they replace; flattened partitions (DeepSpeed ZeRO-1/2) do not."""
    if len(params) != len(shapes) or any(tuple(p.shape) != s for p, s in zip(params, shapes)):
        now = [tuple(p.shape) for p in params]
        culprit = "DeepSpeed ZeRO" if "deepspeed" in sys.modules else "a training framework"
        raise ValueError(
            f"the params of a param group were replaced by tensors of other shapes ({now} where "
            f"the optimizer was built with {list(shapes)}; first: {names[0] if names else '?'}): "
            f"{culprit} hands the optimizer flattened partitions, whose entries no selection can "
            f"address. {_SUPPORTED}"
        )


# ----------------------------------------------------------------------------------------------
# Placement of a group
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPlacement:
    """How one param group's tensors sit across ranks, for selection and checkpoints.

    ``layout``: the sharded selection's layout (None when every rank holds whole tensors).
    ``replicas``: the process group whose ranks hold identical copies of this rank's tensors and
    must select the same entries (DDP: the world; HSDP: the replicate dimension; None: nobody).
    ``ranges``: per tensor, (global flat start of the local entries within that tensor, local
    entries, global entries): a local flat index ``i`` is entry ``start + i`` of the full tensor.
    ``shard_rank``, ``shard_world``: this rank's position among the ranks that split the group.
    """

    layout: ShardLayout | None
    replicas: Any
    ranges: tuple[tuple[int, int, int], ...]
    shard_rank: int = 0
    shard_world: int = 1

    @property
    def sharded(self) -> bool:
        return self.layout is not None


_COLLECTIVES: dict[tuple[int, int], ProcessGroupCollective] = {}


def _collective(mesh: Any, dim: int) -> ProcessGroupCollective:
    key = (id(mesh.get_group(dim)), dim)
    found = _COLLECTIVES.get(key)
    if found is None:
        found = _COLLECTIVES[key] = ProcessGroupCollective(mesh.get_group(dim))
    return found


def placement(params: Sequence[torch.Tensor], replica_group: Any = None) -> GroupPlacement:
    """Resolve one group's placement now (call `check_supported` first).

    ``replica_group``: the process group of plain (unsharded) params' replicas, e.g. DDP's
    ``process_group``; default: the world when a process group with several ranks is up.
    """
    if not params or not is_dtensor(params[0]):
        ranges = tuple((0, p.numel(), p.numel()) for p in params)
        replicas = replica_group
        if replicas is None and world_size() > 1:
            replicas = torch.distributed.group.WORLD
        return GroupPlacement(None, replicas, ranges)

    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    first = params[0]
    mesh = first.device_mesh
    shard_dims = _shard_mesh_dims(first)
    replicate_dims = [d for d in range(mesh.ndim) if d not in shard_dims]
    # HSDP: the ranks of the replicate dim hold the same shard (with several replicate dims,
    # which FSDP2 does not build, the replica check is skipped).
    replicas = None
    if len(replicate_dims) == 1 and mesh.size(replicate_dims[0]) > 1:
        replicas = mesh.get_group(replicate_dims[0])
    ranges, offsets = [], []
    base = 0
    for p in params:
        row = math.prod(p.shape[1:]) if p.dim() > 0 else 1
        _, global_offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        n_local = p.to_local().numel()
        start = (global_offset[0] * row if p.dim() > 0 else 0) if n_local else 0
        ranges.append((start, n_local, p.numel()))
        offsets.append(base + start)
        base += p.numel()
    if not shard_dims or mesh.size(shard_dims[0]) == 1:
        # Replicated over every mesh dim (or a shard dim of one rank): whole tensors.
        return GroupPlacement(None, replicas, tuple(ranges))
    collective = _collective(mesh, shard_dims[0])
    layout = ShardLayout(collective, base, tuple(offsets))
    return GroupPlacement(layout, replicas, tuple(ranges), collective.rank, collective.world_size)


def global_indices(param: torch.Tensor, local_indices: torch.Tensor) -> torch.Tensor:
    """Flat indices into the *full* tensor of ``param`` for indices into its local shard."""
    start = placement([param]).ranges[0][0]
    return local_indices.to(torch.int64) + start


# ----------------------------------------------------------------------------------------------
# Checks after and before selection
# ----------------------------------------------------------------------------------------------

_HASH_A = 0x5DEECE66D
_HASH_B = 0x9E3779B97F4A7C15 >> 1


def _fingerprint(indices: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Per tensor [count, sum, mixed sum] of the selected global flat indices, summed over the
    tensors with a per-tensor weight (int64, wrapping): computed where the indices live, 3 numbers
    moved to the host."""
    out = torch.zeros(3, dtype=torch.int64)
    for t, (idx, (start, _, _)) in enumerate(zip(indices, ranges)):
        if idx.numel() == 0:
            continue
        g = idx.to(torch.int64) + start
        mixed = ((g * _HASH_A + _HASH_B) * (g ^ _HASH_B)).sum()
        part = torch.stack([g.new_tensor(g.numel()), g.sum(), mixed]).cpu()
        out += part * (2 * t + 1)
    return out


def check_replicas(
    groups: Iterable[tuple[str, GroupPlacement, Sequence[torch.Tensor], int]],
) -> None:
    """Raise on every rank if ranks that must agree selected differently.

    ``groups``: (label, placement, local index tensors, k of the group) of the groups just
    selected, in the same order on every rank. Replicas (DDP ranks, HSDP replicate ranks) must
    hold identical selections: a fingerprint of their indices is gathered per replica process
    group. Shards must together hold exactly k entries: their counts are summed. One small
    collective per process group involved.
    """
    by_group: dict[Any, tuple[list[str], torch.Tensor | None]] = {}
    counts: dict[int, tuple[Any, list[str], list[int], list[int]]] = {}
    order: list[tuple[str, Any]] = []
    for label, place, indices, k in groups:
        if place.replicas is not None:
            key = place.replicas
            if key not in by_group:
                by_group[key] = ([], None)
                order.append(("replicas", key))
            labels, fp = by_group[key]
            labels.append(label)
            f = _fingerprint(indices, place.ranges)
            by_group[key] = (labels, f if fp is None else fp + f)
        if place.layout is not None:
            key = id(place.layout.collective)
            if key not in counts:
                counts[key] = (place.layout.collective, [], [], [])
                order.append(("shards", key))
            _, labels, local, want = counts[key]
            labels.append(label)
            local.append(sum(int(i.numel()) for i in indices))
            want.append(k)
    for kind, key in order:
        if kind == "replicas":
            labels, fp = by_group[key]
            every = ProcessGroupCollective(key).all_gather(fp)
            if not bool((every == every[0]).all()):
                raise RuntimeError(
                    f"the ranks selected different entries in {', '.join(labels)} "
                    f"(selection fingerprints per rank: {every.tolist()}): replicas must see the "
                    f"same gradients. Is the model wrapped in DDP (or fully_shard) and built "
                    f"identically on every rank? Ranks that train different params on purpose "
                    f"(independent runs) pass replica_check=False"
                )
        else:
            collective, labels, local, want = counts[key]
            total = torch.tensor(local, dtype=torch.int64)
            collective.all_reduce_sum_(total)
            if total.tolist() != want:
                raise RuntimeError(
                    f"the shards of {', '.join(labels)} hold {total.tolist()} selected entries "
                    f"in all, expected {want}: the ranks' selections do not fit together"
                )


def all_gradients_zero(
    groups: Sequence[tuple[GroupPlacement, Sequence[torch.Tensor | None]]],
) -> bool:
    """Whether every gradient of these groups is exactly zero on every rank that shares them.

    That is the signature of torch's ``_init_optim_state`` (used by ``get_optimizer_state_dict``
    and ``set_optimizer_state_dict``) and of DeepSpeed's state initialisation: a step with
    zero gradients taken to create optimizer state. Selecting from it would pick arbitrary
    entries and never select again. One host synchronisation (the first step only), plus one
    tiny all-reduce per sharded group so that every rank decides alike.
    """
    decision = True
    for place, grads in groups:
        nonzero = torch.zeros((), dtype=torch.int64)
        for g in grads:
            if g is not None and g.numel():
                nonzero += torch.count_nonzero(g).to("cpu")
        if place.layout is not None:
            count = nonzero.reshape(1)
            place.layout.collective.all_reduce_sum_(count)
            nonzero = count[0]
        decision = decision and int(nonzero) == 0
    return decision


def expected_k(place: GroupPlacement, density: float) -> int:
    total = place.layout.total if place.layout is not None else sum(r[2] for r in place.ranges)
    return rules.k_for_density(total, density) if total else 0


def total_norm(
    groups: Sequence[tuple[GroupPlacement, Sequence[torch.Tensor | None]]], norm_type: float
) -> torch.Tensor:
    """The norm of order ``norm_type`` of all these (local) gradients taken together.

    A sharded group's local part is combined over its shard dimension (sum of powers, or max
    for ``inf``), so every rank returns the norm of the whole gradient; replicas (DDP, HSDP's
    replicate dim) hold identical gradients and are not summed. Stays on the device.
    """
    infinite = math.isinf(norm_type)
    device = next((g.device for _, grads in groups for g in grads if g is not None),
                  torch.device("cpu"))
    parts = []
    for place, grads in groups:
        part = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            if g is None or g.numel() == 0:
                continue
            n = torch.linalg.vector_norm(g, norm_type, dtype=torch.float32).to(device)
            part = torch.maximum(part, n) if infinite else part + n ** norm_type
        if place.layout is not None:
            if infinite:
                part = place.layout.collective.all_gather(part.reshape(1)).max().to(device)
            else:
                reduced = part.reshape(1).clone()
                place.layout.collective.all_reduce_sum_(reduced)
                part = reduced[0]
        parts.append(part)
    if not parts:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack(parts)
    return stacked.max() if infinite else stacked.sum() ** (1.0 / norm_type)


# ----------------------------------------------------------------------------------------------
# Per-rank state dicts say which shard they hold
# ----------------------------------------------------------------------------------------------

SHARD_MARK = "shard"
"""Key of a sharded param group in ``SparseAdamW.state_dict()``: ``[shard rank, shard world]``."""


def mark_shards(state_dict: dict, groups: Sequence[dict]) -> None:
    """Mark each sharded group of a per-rank state dict with the shard it holds."""
    for saved, group in zip(state_dict["param_groups"], groups):
        if group["params"] and is_dtensor(group["params"][0]):
            place = placement(group["params"])
            if place.sharded:
                saved[SHARD_MARK] = [place.shard_rank, place.shard_world]


def check_shard_marks(state_dict: Any, groups: Sequence[dict]) -> Any:
    """Refuse a per-rank state dict of another shard; return it without the marks.

    Under FSDP2 each rank's state is ragged (its own shard's selection), so a state dict saved
    on rank r fits rank r of the same layout only. ``torch.distributed.checkpoint`` given such
    per-rank dicts under one key keeps one of them; this catches that too.
    """
    from collections.abc import Mapping

    if not isinstance(state_dict, Mapping) or not isinstance(
            state_dict.get("param_groups"), (list, tuple)):
        return state_dict  # (the load's own checks explain what is wrong)
    saved_groups = state_dict["param_groups"]
    if not any(isinstance(g, Mapping) and SHARD_MARK in g for g in saved_groups):
        marks_needed = [i for i, g in enumerate(groups)
                        if g["params"] and is_dtensor(g["params"][0]) and placement(g["params"]).sharded]
        if marks_needed and any(isinstance(g, Mapping) and "steps_since_selection" in g
                                for g in saved_groups):
            raise ValueError(
                f"this state dict holds whole-tensor selections, but param group(s) "
                f"{marks_needed} are sharded (FSDP2) here: load it with "
                f"gallop_kernels.optim.distributed_checkpoint, which reshards"
            )
        return state_dict
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, Mapping) or SHARD_MARK not in saved:
            continue
        here = None
        if group["params"] and is_dtensor(group["params"][0]):
            place = placement(group["params"])
            here = [place.shard_rank, place.shard_world] if place.sharded else None
        if list(saved[SHARD_MARK]) != here:
            rank, world = saved[SHARD_MARK]
            where = (f"shard {here[0]} of {here[1]}" if here else "whole tensors")
            raise ValueError(
                f"param group {i} of this state dict holds shard {rank} of {world} of its "
                f"selection (SparseAdamW.state_dict() is per rank under FSDP2), but this rank "
                f"holds {where}. Load each rank's own state dict, or save and load with "
                f"gallop_kernels.optim.distributed_checkpoint, which reshards (plain "
                f"torch.distributed.checkpoint keeps only one rank's ragged state)"
            )
    groups_out = [{k: v for k, v in g.items() if k != SHARD_MARK} if isinstance(g, Mapping) else g
                  for g in saved_groups]
    return {**state_dict, "param_groups": groups_out}
