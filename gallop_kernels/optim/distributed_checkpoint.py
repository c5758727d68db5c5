"""SparseAdamW checkpoints through ``torch.distributed.checkpoint`` (DCP): ragged state, resharding.

Under FSDP2 each rank holds the selection of its own shards: a different number of entries per
rank (the state is ragged). DCP keeps one copy of what ranks save under one key, so per-rank
state dicts lose all but one rank's state (``SparseAdamW.state_dict()`` marks its shard so that
such a load is refused). Here every param's state is saved as *one logical 1-D tensor over the
whole param*, sorted by global flat index: the global indices and, aligned with them, the fp32
moments (8-bit moments dequantized: blocks belong to the saving shards) and master copies. Each
rank writes its own run of it at an explicit offset (a :class:`RaggedShard`, written by
:class:`RaggedSavePlanner`), so nothing is deduplicated away, and replicas (DDP, HSDP) write
identical runs that DCP keeps once. A small table per param records each saving shard's flat
range and entry count.

Loading reads the table, then only the runs that overlap this rank's flat range
(:class:`RaggedLoadPlanner`), keeps the entries that fall in it and hands them, as local
indices, to ``SparseAdamW.load_state_dict`` (which checks everything). So a checkpoint loads at
any world size and on one process (resharding 2 -> 1, 1 -> 3, ...), and at the same world size
the state comes back bit for bit (8-bit moments requantize to the same codes: each block's
largest entry maps to ±1 exactly). See ``docs/design.md#distributed``.

Use::

    from gallop_kernels.optim import distributed_checkpoint as gdcp
    gdcp.save(opt, "ckpt/step100", model=model, state={"model": get_model_state_dict(model)})
    ...
    gdcp.load(opt, "ckpt/step100", model=model, state={"model": model_sd})  # then set it

``model`` names the params (their FQNs, wrappers' prefixes removed); without it the optimizer's
``param_names`` (built from ``named_parameters()``) are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from gallop_kernels import rules
from gallop_kernels.ops.adamw import quantization
from gallop_kernels.optim import rendezvous
from gallop_kernels.optim.distributed import (
    GroupPlacement,
    local,
    mark_shards,
    placement,
)
from gallop_kernels.optim.selection import needs_master, store_moments, uses_8bit

__all__ = ["RaggedLoadPlanner", "RaggedSavePlanner", "RaggedShard", "load", "save", "state_for_save"]

TABLE_COLUMNS = 4  # per saving shard: global flat start, end, selected entries, 8-bit moments
_WRAPPER_PARTS = ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


# ----------------------------------------------------------------------------------------------
# A run of a ragged 1-D tensor, and the planners that write and read such runs
# ----------------------------------------------------------------------------------------------


@dataclass
class RaggedShard:
    """This rank's run ``[offset, offset + len(data))`` of a 1-D tensor of ``total`` entries that
    the ranks split unevenly. DCP writes it as a chunk at that offset (with
    :class:`RaggedSavePlanner`); as a load destination it receives that region of the saved
    tensor (with :class:`RaggedLoadPlanner`), whatever runs it was saved in."""

    data: torch.Tensor
    offset: int
    total: int

    def size(self) -> torch.Size:
        return torch.Size([self.total])

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import (
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        if self.data.numel() == 0:
            return []  # (DCP's metadata needs the chunks to tile the tensor: empty ones do not)
        offsets = torch.Size([self.offset])
        return [WriteItem(
            index=MetadataIndex(fqn, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=self.data.size()),
                properties=TensorProperties.create_from_tensor(self.data),
                size=self.size(),
            ),
        )]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        if self.data.numel() == 0:
            return []
        return [ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=self.data.size())]

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        return self.data


def _planners():
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    class _Save(DefaultSavePlanner):
        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            return obj.data if isinstance(obj, RaggedShard) else super().lookup_object(index)

    class _Load(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            # (the default set-up walks the state dict and drops objects it does not know)
            ragged = {k: v for k, v in state_dict.items() if isinstance(v, RaggedShard)}
            for key in ragged:
                del state_dict[key]
            try:
                super().set_up_planner(state_dict, metadata, is_coordinator)
            finally:
                state_dict.update(ragged)
            self.state_dict.update(ragged)

        def lookup_tensor(self, index):
            obj = self.state_dict[index.fqn]
            return obj.data if isinstance(obj, RaggedShard) else super().lookup_tensor(index)

    return _Save, _Load


def RaggedSavePlanner(**kwargs: Any):
    """A ``DefaultSavePlanner`` that also writes :class:`RaggedShard` values."""
    return _planners()[0](**kwargs)


def RaggedLoadPlanner(**kwargs: Any):
    """A ``DefaultLoadPlanner`` that also fills :class:`RaggedShard` destinations."""
    return _planners()[1](**kwargs)


# ----------------------------------------------------------------------------------------------
# Naming
# ----------------------------------------------------------------------------------------------


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _names(optimizer: Any, model: torch.nn.Module | None) -> list[list[str]]:
    """Each group's param FQNs (wrapper prefixes removed), from ``model`` or ``param_names``."""
    if model is not None:
        by_id = {id(p): _clean(n) for n, p in model.named_parameters(remove_duplicate=False)}
        names = [[by_id.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
        missing = [i for g in names for i in g if i is None]
        if missing:
            raise ValueError(f"{len(missing)} of the optimizer's params are not params of the model")
        return names
    names = []
    for i, g in enumerate(optimizer.param_groups):
        given = g.get("param_names")
        if not isinstance(given, (list, tuple)) or len(given) != len(g["params"]):
            raise ValueError(
                f"param group {i} has no param names: pass model= (or build the optimizer from "
                f"model.named_parameters())")
        names.append([_clean(n) for n in given])
    flat = [n for g in names for n in g]
    if len(set(flat)) != len(flat):
        raise ValueError("the optimizer's param names are not unique")
    return names


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _flat_range(place: GroupPlacement, t: int) -> tuple[int, int, int]:
    start, n, total = place.ranges[t]
    return start, start + n, total


def _blocks(k: int) -> int:
    return -(-k // quantization.QUANT_BLOCK)


class _Runs:
    """Where each saving shard's entries sit in a param's ragged tensors, from its table.

    Columns per shard: global flat start, end, selected entries k, 8-bit moments (0/1). All
    entries (indices, master) are ragged over every shard; fp32 moments over the fp32 shards,
    8-bit codes over the 8-bit shards and their absmax over those shards' blocks.
    """

    def __init__(self, table: torch.Tensor) -> None:
        rows = table.reshape(-1, TABLE_COLUMNS).tolist()
        self.rows = rows
        self.offsets = {"all": [0], "fp32": [0], "codes": [0], "blocks": [0]}
        for lo, hi, k, q in rows:
            self.offsets["all"].append(self.offsets["all"][-1] + k)
            self.offsets["fp32"].append(self.offsets["fp32"][-1] + (0 if q else k))
            self.offsets["codes"].append(self.offsets["codes"][-1] + (k if q else 0))
            self.offsets["blocks"].append(self.offsets["blocks"][-1] + (_blocks(k) if q else 0))

    def overlapping(self, lo: int, hi: int) -> range:
        hit = [s for s, (a, b, k, _) in enumerate(self.rows) if k and a < hi and b > lo]
        return range(hit[0], hit[-1] + 1) if hit and hi > lo else range(0)

    def region(self, kind: str, shards: range) -> tuple[int, int]:
        if not shards:
            return 0, 0
        off = self.offsets[kind]
        return off[shards.start], off[shards.stop] - off[shards.start]


def state_for_save(optimizer: Any, model: torch.nn.Module | None = None,
                   prefix: str = "optim") -> dict[str, Any]:
    """The optimizer's state as a flat DCP state dict (save it with :class:`RaggedSavePlanner`).

    Collective: every rank of the optimizer's process groups must call it (one all-gather of
    entry counts per sharded group).
    """
    from gallop_kernels.optim.unwrap import unwrap_optimizer

    opt = unwrap_optimizer(optimizer)
    names = _names(opt, model)
    portable = opt.state_dict()
    groups = []
    for saved, fqns in zip(portable["param_groups"], names):
        group = {k: v for k, v in saved.items() if k not in ("params", "shard", "param_names")}
        group["params"] = list(fqns)
        groups.append(group)
    # One JSON string (a leaf: DCP would flatten a list of dicts into one key per option).
    out: dict[str, Any] = {f"{prefix}.param_groups": json.dumps(groups)}
    for group, fqns in zip(opt.param_groups, names):
        if "steps_since_selection" not in group:
            continue
        place = opt.placement(group)
        mine = torch.tensor(
            [[opt.state[p]["indices"].numel(), int(opt.state[p]["exp_avg"].dtype == torch.uint8)]
             for p in group["params"]], dtype=torch.int64).reshape(-1, 2)
        every = (place.layout.collective.all_gather(mine) if place.sharded
                 else mine.unsqueeze(0))  # [shards, tensors, (k, 8-bit)]
        for t, (p, fqn) in enumerate(zip(group["params"], fqns)):
            st = opt.state[p]
            lo, hi, n_total = _flat_range(place, t)
            k, quantized = int(mine[t, 0]), bool(mine[t, 1])
            key = f"{prefix}.state.{fqn}"
            table = torch.tensor([lo, hi, k, int(quantized)], dtype=torch.int64)
            out[f"{key}.table"] = RaggedShard(
                table, TABLE_COLUMNS * place.shard_rank, TABLE_COLUMNS * place.shard_world)
            out[f"{key}.step"] = st["step"].detach().clone()
            runs = _Runs(torch.cat([torch.tensor([0, 0]).expand(every.shape[0], 2),
                                    every[:, t]], dim=1))

            def ragged(value: torch.Tensor, kind: str) -> RaggedShard:
                offsets = runs.offsets[kind]
                return RaggedShard(value.detach().cpu().contiguous(), offsets[place.shard_rank],
                                   offsets[-1])

            out[f"{key}.indices"] = ragged(st["indices"].to(torch.int64) + lo, "all")
            if "master" in st:
                out[f"{key}.master"] = ragged(st["master"], "all")
            if quantized:
                for name in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}.{name}_codes"] = ragged(st[name], "codes")
                    out[f"{key}.{name}_absmax"] = ragged(st[f"{name}_absmax"], "blocks")
            else:
                for name in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}.{name}"] = ragged(st[name], "fp32")
            if "grad_accum" in st:
                out[f"{key}.grad_accum"] = RaggedShard(st["grad_accum"].detach().cpu(), lo, n_total)
    return out


def save(optimizer: Any, checkpoint_id: str | os.PathLike | None = None, *,
         model: torch.nn.Module | None = None, state: Mapping[str, Any] | None = None,
         storage_writer: Any = None, process_group: Any = None, prefix: str = "optim") -> None:
    """Save the optimizer (and ``state``, e.g. ``{"model": get_model_state_dict(model)}``) with
    ``torch.distributed.checkpoint.save``; every rank calls it (the ranks meet first, and a
    refusal on one rank is every rank's: `optim/rendezvous.py`)."""
    import torch.distributed.checkpoint as dcp

    from gallop_kernels.optim.unwrap import unwrap_optimizer

    payload = dict(state or {})
    error = None
    try:
        if any(k == prefix or k.startswith(prefix + ".") for k in payload):
            raise ValueError(f"state may not use the key {prefix!r}: the optimizer is saved there")
        _names(unwrap_optimizer(optimizer), model)
    except (ValueError, TypeError) as err:
        error = err
    rendezvous.agree("distributed_checkpoint.save()", [process_group], error)
    payload.update(state_for_save(optimizer, model, prefix))
    dcp.save(payload, checkpoint_id=checkpoint_id, storage_writer=storage_writer,
             planner=RaggedSavePlanner(), process_group=process_group)


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------

_RAGGED = {  # key suffix -> which run of the table it follows
    "indices": "all", "master": "all", "exp_avg": "fp32", "exp_avg_sq": "fp32",
    "exp_avg_codes": "codes", "exp_avg_sq_codes": "codes",
    "exp_avg_absmax": "blocks", "exp_avg_sq_absmax": "blocks",
}


def load(optimizer: Any, checkpoint_id: str | os.PathLike | None = None, *,
         model: torch.nn.Module | None = None, state: dict[str, Any] | None = None,
         storage_reader: Any = None, process_group: Any = None, prefix: str = "optim",
         convert_layout: bool = False) -> None:
    """Load a checkpoint written by :func:`save` into ``optimizer`` (any world size and
    sharding), and ``state`` in place (e.g. ``{"model": model_sd}``: set it on the model after).
    Every rank calls it. The optimizer's groups must hold the same params (by name) as saved;
    ``convert_layout`` as in ``SparseAdamW.load_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gallop_kernels.optim.unwrap import unwrap_optimizer

    opt = unwrap_optimizer(optimizer)
    error = None
    try:
        if storage_reader is None:
            if checkpoint_id is None:
                raise ValueError("give checkpoint_id or storage_reader")
            storage_reader = dcp.FileSystemReader(checkpoint_id)
        metadata = storage_reader.read_metadata().state_dict_metadata
        groups_key = f"{prefix}.param_groups"
        if groups_key not in metadata:
            raise ValueError(f"the checkpoint holds no optimizer under {prefix!r}")
        names = _names(opt, model)
    except (ValueError, TypeError) as err:
        error = err
    rendezvous.agree("distributed_checkpoint.load()", [process_group], error)

    # Phase 1: the groups, and per selected param its step and table of saving shards.
    head: dict[str, Any] = {groups_key: None}
    for fqns in names:
        for fqn in fqns:
            key = f"{prefix}.state.{fqn}"
            if f"{key}.table" in metadata:
                head[f"{key}.table"] = torch.zeros(metadata[f"{key}.table"].size, dtype=torch.int64)
                head[f"{key}.step"] = torch.zeros((), dtype=torch.float32)
    dcp.load(head, storage_reader=storage_reader, process_group=process_group)
    saved_groups = json.loads(head[groups_key])
    if len(saved_groups) != len(opt.param_groups) or any(
            list(g["params"]) != fqns for g, fqns in zip(saved_groups, names)):
        raise ValueError(
            "the checkpoint's param groups hold other params than this optimizer's: saved "
            f"{[list(g['params']) for g in saved_groups]}, here {names}")

    # Phase 2: the runs that overlap this rank's shards (and the caller's state).
    body: dict[str, Any] = dict(state or {})
    wanted = []
    for gi, (group, saved, fqns) in enumerate(zip(opt.param_groups, saved_groups, names)):
        if "steps_since_selection" not in saved:
            continue
        place = placement(group["params"], getattr(opt.ddp_exchange, "process_group", None))
        for t, fqn in enumerate(fqns):
            key = f"{prefix}.state.{fqn}"
            if f"{key}.table" not in head:
                raise ValueError(f"the checkpoint's group {gi} has a selection but no state for "
                                 f"{fqn!r}")
            lo, hi, _ = _flat_range(place, t)
            runs = _Runs(head[f"{key}.table"])
            shards = runs.overlapping(lo, hi)
            wanted.append((gi, t, key, lo, hi, runs, shards))
            for suffix, kind in _RAGGED.items():
                md = metadata.get(f"{key}.{suffix}")
                if isinstance(md, TensorStorageMetadata):
                    start, length = runs.region(kind, shards)
                    body[f"{key}.{suffix}"] = RaggedShard(
                        torch.empty(length, dtype=md.properties.dtype), start, md.size[0])
            if isinstance(metadata.get(f"{key}.grad_accum"), TensorStorageMetadata):
                body[f"{key}.grad_accum"] = RaggedShard(
                    torch.empty(hi - lo, dtype=torch.float32), lo, metadata[f"{key}.grad_accum"].size[0])
    dcp.load(body, storage_reader=storage_reader, planner=RaggedLoadPlanner(),
             process_group=process_group)

    # This rank's entries, as this rank's state dict for load_state_dict (which checks it all).
    pids = {}
    for gi, group in enumerate(opt.param_groups):
        for t in range(len(group["params"])):
            pids[(gi, t)] = len(pids)
    local_state = {}
    for gi, t, key, lo, hi, runs, shards in wanted:
        # (converting: the entries in this optimizer's layout at once, so that 8-bit moments
        # going to fp32 are the saved ones dequantized, not requantized in this rank's blocks)
        group = (opt.param_groups[gi] if convert_layout
                 else {**opt.param_groups[gi], **saved_groups[gi]})
        shard = local(opt.param_groups[gi]["params"][t])
        local_state[pids[(gi, t)]] = _entry(body, key, lo, hi, runs, shards, group, shard,
                                            head[f"{key}.step"])
    groups = []
    for gi, saved in enumerate(saved_groups):
        g = dict(saved)
        g["params"] = [pids[(gi, t)] for t in range(len(opt.param_groups[gi]["params"]))]
        if "param_names" in opt.param_groups[gi]:
            g["param_names"] = opt.param_groups[gi]["param_names"]
        groups.append(g)
    per_rank = {"state": local_state, "param_groups": groups}
    mark_shards(per_rank, opt.param_groups)  # (it is this rank's state, from now on)
    opt.load_state_dict(per_rank, convert_layout=convert_layout)


def _entry(body: dict, key: str, lo: int, hi: int, runs: _Runs, shards: range, group: dict,
           shard: torch.Tensor, step: torch.Tensor) -> dict[str, torch.Tensor]:
    """One param's state on this rank from the runs read: the entries inside [lo, hi)."""
    def got(suffix: str) -> torch.Tensor | None:
        value = body.get(f"{key}.{suffix}")
        return None if value is None else value.data

    device = shard.device
    g_idx = got("indices")
    if g_idx is None:
        g_idx = torch.zeros(0, dtype=torch.int64)
    mine = (g_idx >= lo) & (g_idx < hi)
    idx = (g_idx[mine] - lo).to(rules.index_dtype(shard.numel()))
    k = idx.numel()
    entry: dict[str, torch.Tensor] = {"step": step.clone(), "indices": idx.to(device)}
    bits = 8 if uses_8bit(group, k) else 32
    row = runs.rows[shards.start] if len(shards) == 1 else None
    if row is not None and row[3] and (row[0], row[1]) == (lo, hi) and bits == 8:
        # The shard as saved, 8-bit: its codes and scales as they were (bit for bit).
        for name in ("exp_avg", "exp_avg_sq"):
            entry[name] = got(f"{name}_codes").to(device)
            entry[f"{name}_absmax"] = got(f"{name}_absmax").to(device)
    else:
        moments = []
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            parts = []
            for s in shards:
                lo_s, hi_s, k_s, q = runs.rows[s]
                if q:
                    c0 = runs.offsets["codes"][s] - runs.offsets["codes"][shards.start]
                    b0 = runs.offsets["blocks"][s] - runs.offsets["blocks"][shards.start]
                    parts.append(quantization.dequantize_blockwise(
                        got(f"{name}_codes")[c0:c0 + k_s],
                        got(f"{name}_absmax")[b0:b0 + _blocks(k_s)], signed=signed))
                else:
                    f0 = runs.offsets["fp32"][s] - runs.offsets["fp32"][shards.start]
                    parts.append(got(name)[f0:f0 + k_s])
            values = torch.cat(parts) if parts else torch.zeros(0)
            moments.append(values[mine].float().to(device))
        store_moments(entry, moments[0], moments[1], bits)
    master = got("master")
    if master is not None:
        entry["master"] = master[mine].to(device)
    elif k == 0 and needs_master(shard, group["master_weights"]):
        entry["master"] = torch.zeros(0, dtype=torch.float32, device=device)
    accum = got("grad_accum")
    if accum is not None:
        entry["grad_accum"] = accum.to(device)
    return entry
