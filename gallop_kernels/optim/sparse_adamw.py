"""SparseAdamW: AdamW on the exact GaLLoP selection, with optimizer state only for selected entries."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

from gallop_kernels.ops import backends
from gallop_kernels.ops.adamw import AdamWHyper, sparse_adamw
from gallop_kernels.optim import checkpoint, distributed, rendezvous, selection
from gallop_kernels.optim.distributed import local
from gallop_kernels.optim.lean import LeanGradients
from gallop_kernels.optim.validation import (
    check_carry_over,
    check_grad,
    check_group_options,
    check_params,
    check_selection_counter,
    check_state_fits,
    state_is_stale,
)
from gallop_kernels.rules import DEFAULT_MIN_8BIT_ENTRIES, Score


class _Label:
    """A param's name for messages, formatted only when a message is built (checks stay cheap)."""

    __slots__ = ("_optimizer", "_group", "_index", "_prefix")

    def __init__(self, optimizer: "SparseAdamW", group: int, index: int, prefix: str = "") -> None:
        self._optimizer, self._group, self._index, self._prefix = optimizer, group, index, prefix

    def __str__(self) -> str:
        return self._prefix + self._optimizer._names(self._group)[self._index]


class SparseAdamW(Optimizer):
    """AdamW that trains only the top-``density`` entries of each param group by ``score``.

    The first :meth:`step` selects (or call :meth:`select` after accumulating calibration
    gradients), then every step updates only the selected entries. Per selected entry the state
    is a sorted int32 flat index, fp32 ``exp_avg`` and ``exp_avg_sq`` and, for bf16/fp16 params,
    an fp32 master copy; nothing of the parameters' size is kept (except the gradient accumulator
    of ``reselect_every``, which needs one fp32 value per entry).

    Bad input is refused before anything changes (`docs/design.md#rules`: validate everything, then
    mutate): :meth:`step` and :meth:`select` first check every group's options (also after a
    group was edited), every param, gradient and state entry, and :meth:`load_state_dict` checks
    the whole checkpoint; a refused call leaves params, state, groups, step counters and lean
    buffers as they were. Non-finite *gradients* during training keep `torch.optim.AdamW`'s
    semantics: they flow into the moments and the selected weights (checking them would cost a
    host synchronisation per step on a GPU). A NaN or infinite *score* at selection is a
    ``ValueError`` naming the parameter.

    Copies: ``copy.deepcopy`` and ``pickle`` keep the options, state, backend and lean mode (the
    copy installs its own gradient hooks on its own params), as `torch.optim` optimizers keep
    theirs; hooks registered with ``register_*_hook`` are not copied, as in `torch.optim`.

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`; lr, eps and
            weight_decay must be finite (the step computes in float32).
        density: fraction ρ of each group's entries to train, in (0, 1].
        score: "gallop" (|g| / (|θ| + score_eps)), "gradient", "magnitude", "random", or a
            callable ``(param, grad) -> Tensor`` of the param's shape.
        score_eps: ε of the "gallop" and "magnitude" scores (finite, >= 0).
        score_floor: a magnitude floor for those two scores (`docs/design.md#score-floor`):
            |θ| is read as max(|θ|, floor), so that the exact zeros and tiny magnitudes of a
            quantized base stop dominating the selection. ``None`` (default: no floor), one
            number for every tensor, or one per tensor of the group (a list in group order);
            `gallop_kernels.score_floor` computes them from a base's quantization step.
        seed: seed of the "random" score.
        reselect_every: re-select every N steps from the mean gradient since the last
            selection (GMT); entries that stay keep their state. ``None`` selects once.
        master_weights: "auto" (fp32 master copy for bf16/fp16 params), True or False.
        state_bits: 32, or 8 for blockwise 8-bit m and v with bitsandbytes' dynamic maps
            (1 byte each + an fp32 absmax per 256 entries; the maps are built here, so
            bitsandbytes need not be installed).
        min_8bit_entries: under ``state_bits=8``, a tensor with fewer selected entries keeps
            fp32 moments (bitsandbytes' ``min_8bit_size`` rule; default 4096).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        lean: after selection, gather each gradient's selected entries into a compact fp32
            buffer in a post-accumulate-grad hook and free the dense gradient at once; freeze
            (``requires_grad=False``) tensors with no selected entry. See `optim/lean.py`.
        replica_check: under several ranks, check after every selection that the ranks which
            must agree (DDP replicas, HSDP replicate ranks) selected the same entries, and that
            FSDP2 shards hold k entries together; raises on every rank otherwise. Pass False
            only when ranks train on their own on purpose (it also keeps lean mode from looking
            for a DDP module).

    Distributed training (`docs/design.md#distributed`): under DDP nothing changes (lean mode
    attaches to the DDP module by itself, see :meth:`attach_ddp`); under FSDP2 / HSDP
    (``fully_shard``) build the optimizer after sharding: the selection is the exact global one
    (histograms summed over the shard dimension), the state is per shard (fp32 moments: 8-bit
    ones are refused on sharded params), and ``selected_indices`` / ``num_selected`` are this
    rank's (local) ones. Every rank must make the same calls: before a call's collectives the
    ranks meet (`optim/rendezvous.py`), and a rank that does not come, a rank in another call
    or a refusal on some rank raises on every rank that came (within
    ``GALLOP_RANKS_TIMEOUT_S``, default 300 s) instead of hanging.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        density: float = 0.01,
        score: Score = "gallop",
        score_eps: float = 1e-8,
        score_floor: float | list[float] | None = None,
        seed: int = 0,
        reselect_every: int | None = None,
        master_weights: bool | str = "auto",
        state_bits: int = 32,
        min_8bit_entries: int = DEFAULT_MIN_8BIT_ENTRIES,
        backend: str = "auto",
        lean: bool = False,
        replica_check: bool = True,
    ) -> None:
        backends.check_backend(backend)
        if not isinstance(replica_check, bool):
            raise TypeError(f"replica_check must be True or False, got {replica_check!r}")
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a list), not a set")
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            score=score,
            score_eps=score_eps,
            score_floor=score_floor,
            seed=seed,
            reselect_every=reselect_every,
            master_weights=master_weights,
            state_bits=state_bits,
            min_8bit_entries=min_8bit_entries,
        )
        check_group_options(defaults)
        self.backend = backend
        self.replica_check = replica_check
        self._group_index: dict[int, int] = {}
        # Each group's param shapes as built: params swapped in later must keep them (accelerate
        # swaps in sharded DTensors of the same global shape; ZeRO's flat partitions differ).
        self._group_shapes: list[list[tuple[int, ...]]] = []
        self._ddp = None  # the DDP module lean mode exchanges gradients with (optim/ddp.py)
        self.last_grad_norm: torch.Tensor | None = None
        # Each selected param's size when its indices were made: a param resized since then is
        # caught from this metadata, without reading the (device) indices every step.
        self._selected_numel: dict[torch.Tensor, int] = {}
        self._lean = self._new_lean() if lean else None
        # How many times each collective call was made (step, select, clip): ranks compare them
        # when they meet (optim/rendezvous.py), so a step one rank skipped comes to light.
        self._calls: dict[str, int] = {}
        super().__init__(params, defaults)
        if self._lean is not None:
            from gallop_kernels.optim import ddp

            ddp.expect_ddp(self)  # (under several ranks: before the first backward, see ddp.py)

    def _new_lean(self) -> LeanGradients:
        return LeanGradients(lambda: self.state, self.reselection_due, self._gradients_arrived,
                             self._dense_before_selection)

    def _dense_before_selection(self, param: torch.Tensor) -> bool:
        """Whether lean mode must leave a gradient that arrives before ``param``'s first
        selection in ``.grad`` instead of moving it to the host: when DDP still averages it
        (several replicas, and no compact exchange has taken DDP's reduction over yet)."""
        if distributed.is_dtensor(param) or not self.replica_check or distributed.world_size() == 1:
            return False
        exchange = self._ddp
        return not (exchange is not None and exchange.active and exchange.mode == "compact")

    def _gradients_arrived(self) -> None:
        """New gradients make the last measured norm stale (lean hooks call this)."""
        self.last_grad_norm = None

    # ------------------------------------------------------------------------------------------
    # Copies (deepcopy, pickle)
    # ------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What `torch.optim.Optimizer` keeps, plus the backend, selection sizes and lean buffers."""
        state = super().__getstate__()
        state["backend"] = self.backend
        state["_selected_numel"] = self._selected_numel
        state["_lean"] = None if self._lean is None else self._lean.snapshot()
        state["_ddp"] = None  # a copy is not attached to the DDP module (attach_ddp again)
        state["replica_check"] = self.replica_check
        state["_group_shapes"] = self._group_shapes
        state["_calls"] = dict(self._calls)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild what cannot be copied: the param -> group map and lean mode's hooks."""
        state = dict(state)
        lean = state.pop("_lean", None)
        state.setdefault("backend", "auto")
        state.setdefault("_selected_numel", {})
        state.setdefault("replica_check", True)
        state.setdefault("_ddp", None)
        state.setdefault("last_grad_norm", None)
        state.setdefault("_calls", {})
        super().__setstate__(state)
        if not hasattr(self, "_group_shapes") or len(self._group_shapes) != len(self.param_groups):
            self._group_shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        self._group_index = {
            id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]
        }
        self._lean = None
        if lean is not None:
            self._lean = self._new_lean()
            for group in self.param_groups:
                for p in group["params"]:
                    self._lean.watch(p)
            self._lean.restore(lean)

    # ------------------------------------------------------------------------------------------
    # Param groups
    # ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's options and params before it joins the optimizer."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params'")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a list), not a set")
        params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        names = [p[0] for p in params] if all(isinstance(p, tuple) for p in params) else None
        given = names or param_group.get("param_names")
        if isinstance(given, (list, tuple)):
            distributed.check_names([str(n) for n in given])
        distributed.check_supported(
            tensors, names or [f"#{j} (shape {tuple(getattr(t, 'shape', ()))})"
                               for j, t in enumerate(tensors)])
        check_params([local(t) for t in tensors])
        unknown = set(param_group) - set(self.defaults) - {"params", "param_names"}
        if unknown:
            raise ValueError(f"unknown option(s) in param group: {sorted(unknown)}")
        options = {**self.defaults, **param_group}
        if isinstance(options["betas"], list):
            options["betas"] = tuple(options["betas"])
        check_group_options(options, f"param group {len(self.param_groups)}")
        distributed.check_state_bits(tensors, options["state_bits"],
                                     f"param group {len(self.param_groups)}")
        super().add_param_group({**options, "params": params})
        self._group_shapes.append([tuple(p.shape) for p in tensors])
        for p in tensors:
            self._group_index[id(p)] = len(self.param_groups) - 1
        if self._lean is not None:
            for p in tensors:
                self._lean.watch(p)

    def _names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if isinstance(names, (list, tuple)) and len(names) == len(group["params"]):
            return [f"{name!r} (param group {group_index})" for name in names]
        return [
            f"group {group_index} param {i} ("
            + (f"shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__) + ")"
            for i, p in enumerate(group["params"])
        ]

    def _labels(self, group_index: int, prefix: str = "") -> list[_Label]:
        """Lazy `_names`: for messages of checks that run every step."""
        count = len(self.param_groups[group_index]["params"])
        return [_Label(self, group_index, j, prefix) for j in range(count)]

    def _adopt_params(self) -> None:
        """Follow params put into ``param_groups`` directly (accelerate swaps them after sharding)."""
        for i, group in enumerate(self.param_groups):
            shapes = self._group_shapes[i] if i < len(self._group_shapes) else []
            for j, p in enumerate(group["params"]):
                if j >= len(shapes):
                    shapes.append(tuple(p.shape))
                if self._group_index.get(id(p)) != i:
                    self._group_index[id(p)] = i
                    if self._lean is not None:
                        self._lean.watch(p)
            if i >= len(self._group_shapes):
                self._group_shapes.append(shapes)

    # ------------------------------------------------------------------------------------------
    # Validation: everything step() and select() will read, before either changes anything
    # ------------------------------------------------------------------------------------------

    def _check_groups(self) -> None:
        """Options (re-validated: groups may have been edited), params and backends of every group."""
        seen: dict[int, int] = {}
        for i, group in enumerate(self.param_groups):
            where = f"param group {i}"
            check_group_options(group, where)
            check_selection_counter(group, where)
            params = group.get("params")
            if not isinstance(params, list):
                raise TypeError(f"{where}: 'params' must be a list of tensors")
            names = self._labels(i)
            distributed.check_supported(params, names)
            distributed.check_state_bits(params, group["state_bits"], where)
            self._check_swapped(i, params, names)
            check_params([local(p) for p in params], names)
            for p, name in zip(params, names):
                if seen.setdefault(id(p), i) != i:
                    raise ValueError(f"parameter {name} is also in param group {seen[id(p)]}")
                if p.is_meta:
                    raise ValueError(f"parameter {name} is on the meta device (it has no data); "
                                     f"materialize it before step() or select()")
            if params:
                backend = backends.resolve(self.backend, params[:1])
                if backend == "triton":
                    for p, name in zip(params, names):
                        if p.device != params[0].device:
                            raise ValueError(
                                f"parameter {name} is on {p.device} but {names[0]} of the same "
                                f"group on {params[0].device}: the Triton backend runs one "
                                f"device per group"
                            )

    def _check_swapped(self, i: int, params: list, names: list) -> None:
        """Params put into group ``i`` in place of others must keep their global shapes."""
        shapes = self._group_shapes[i] if i < len(self._group_shapes) else []
        swapped = [j for j, p in enumerate(params[:len(shapes)])
                   if self._group_index.get(id(p)) != i]
        if swapped:
            distributed.check_same_shapes(
                [params[j] for j in swapped], [names[j] for j in swapped],
                [shapes[j] for j in swapped])

    def _check_state(self, i: int, for_step: bool) -> dict[torch.Tensor, float]:
        """Metadata checks of group ``i``'s state: all a step reads (``for_step``, selected
        groups; returns each param's step count), else what a new selection carries over."""
        group = self.param_groups[i]
        steps = {}
        for p, where in zip(group["params"], self._labels(i, "parameter ")):
            st, numel = self.state.get(p), self._selected_numel.get(p)
            if for_step:
                needs_master = selection.needs_master(p, group["master_weights"])
                steps[p] = check_state_fits(where, local(p), st, group, numel, needs_master)
            else:
                check_carry_over(where, local(p), st, numel)
        return steps

    def _check_step_gradient(self, name: str, p: torch.Tensor) -> None:
        """The gradient this step will use for ``p``: lean mode's compact buffer, else ``.grad``."""
        if p.grad is not None:
            check_grad(name, local(p), local(p.grad))
        if self._lean is not None and self._lean.on_host(p) and p.grad is not None:
            raise ValueError(
                f"lean mode moved the gradient of parameter {name} to the host before its first "
                f"selection, and .grad was set since, not by backward: the step cannot use both; "
                f"set gradients through backward(), or call zero_grad() first")
        if self._lean is not None and self._lean.gathered(p):
            if p.grad is not None:
                raise ValueError(
                    f"lean mode gathered the gradient of parameter {name} into its compact "
                    f"buffer, and .grad was set since, not by backward: the step cannot use both; "
                    f"set gradients through backward(), or call zero_grad() first"
                )
            compact = self._lean.grad(p)
            indices = self.state.get(p, {}).get("indices")
            k = indices.numel() if isinstance(indices, torch.Tensor) else -1
            if compact.dtype != torch.float32 or compact.shape != (k,) or compact.device != local(p).device:
                raise ValueError(
                    f"lean mode's gathered gradient of parameter {name} no longer fits its "
                    f"selection of {k} entries; call zero_grad() and run backward again"
                )

    # ------------------------------------------------------------------------------------------
    # Selection
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def select(self, gradients: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Select now, in every group, from the current ``.grad`` s (a re-selection if selected).

        Typical GaLLoP phase one: run backward over calibration batches (gradients accumulate in
        ``.grad``), call ``select()``, ``zero_grad()``, then train — or use
        `gallop_kernels.calibrate`, which never holds the model's dense gradient on the GPU.

        Args:
            gradients: optional ``{param: gradient}`` to score instead of ``.grad`` (may live on
                another device, e.g. pinned host memory; it is streamed chunk by chunk).
        """
        call = self._count("select()")
        error, groups = None, self._everyone()
        try:
            self._check_groups()
            for i, group in enumerate(self.param_groups):
                names = self._labels(i)
                self._check_state(i, for_step=False)
                for p, name in zip(group["params"], names):
                    if self._lean is not None and self._lean.gathered(p):
                        raise ValueError(
                            f"lean mode holds the gradient of parameter {name} gathered for the "
                            f"current selection; call zero_grad() before select()"
                        )
                    if gradients is None and p.grad is not None:
                        check_grad(name, local(p), local(p.grad))
            if gradients is not None:
                self._check_gradients_mapping(gradients)
            places = [self.placement(group) for group in self.param_groups]
            groups = self._collective_groups(places)
        except (ValueError, TypeError) as err:
            error = err
        self._agree(call, groups, error)

        plans = [
            selection.plan(group, self.state, self._names(i), self.backend,
                           from_accumulated=False, place=places[i],
                           gradients=gradients if gradients is not None
                           else self._host_gradients(group))
            for i, group in enumerate(self.param_groups)
        ]
        # -- nothing has changed before this line --
        self._adopt_params()
        for group, new_indices, place in zip(self.param_groups, plans, places):
            self._install(group, new_indices, place)
        self._after_selection(range(len(self.param_groups)), places)

    def _check_gradients_mapping(self, gradients: Any) -> None:
        if not isinstance(gradients, Mapping):
            raise TypeError(
                f"gradients must be a mapping {{param: gradient}}, got {type(gradients).__name__}"
            )
        names = {
            id(p): name
            for i in range(len(self.param_groups))
            for name, p in zip(self._names(i), self.param_groups[i]["params"])
        }
        params = {id(p): p for group in self.param_groups for p in group["params"]}
        for key, grad in gradients.items():
            if not isinstance(key, torch.Tensor) or id(key) not in params:
                what = (f"a tensor of shape {tuple(key.shape)}" if isinstance(key, torch.Tensor)
                        else f"a {type(key).__name__}")
                raise ValueError(f"gradients has a key that is not a parameter of this optimizer "
                                 f"({what}); its keys must be the params themselves")
            check_grad(names[id(key)], local(key), grad, same_device=False)

    def _count(self, call: str) -> str:
        """``call`` numbered as the next of its kind (``"step() #3"``); `_agree` counts it once
        the ranks have agreed to make it (a refused call did not take place)."""
        return f"{call} #{self._calls.get(call, 0) + 1}"

    def _collective_groups(self, places: Iterable[distributed.GroupPlacement],
                           exchange: bool = False) -> list[Any]:
        """The process groups whose collectives a call over these placements issues (shards
        and, with the replica check, replicas), plus lean mode's DDP exchange if asked."""
        if distributed.world_size() == 1:
            return []
        groups = []
        for place in places:
            if place.layout is not None:
                groups.append(place.layout.collective.group)
            if place.replicas is not None and self.replica_check:
                groups.append(place.replicas)
        if exchange and self._lean is not None and getattr(self._ddp, "active", False) \
                and self._ddp.mode == "compact":
            groups.append(self._ddp.process_group)
        return groups

    def _everyone(self) -> list[Any]:
        """Whom to meet when a call is refused before its groups are known: the world, unless
        the ranks train on their own (``replica_check=False``) or there is one process."""
        return [None] if self.replica_check and distributed.world_size() > 1 else []

    def _agree(self, call: str, groups: list[Any], error: BaseException | None) -> None:
        """Before a call's collectives: under several ranks the ranks of ``groups`` meet, and a
        refusal on any of them is raised on all (`optim/rendezvous.py`: no hang, one error);
        in one process ``error`` is raised as it is."""
        if groups:
            rendezvous.agree(call, groups, error)
        elif error is not None:
            raise error
        kind = call.split(" #")[0]
        self._calls[kind] = self._calls.get(kind, 0) + 1

    def placement(self, group: dict) -> distributed.GroupPlacement:
        """Where the group's tensors live across ranks, resolved now (params may be swapped)."""
        replicas = getattr(self._ddp, "process_group", None)
        return distributed.placement(group["params"], replicas)

    def _install(self, group: dict, new_indices: list[torch.Tensor],
                 place: distributed.GroupPlacement) -> None:
        for p in group["params"]:
            if state_is_stale(local(p), self.state.get(p), self._selected_numel.get(p)):
                self.state[p].clear()  # resized since its selection: nothing can carry over
        selection.apply(group, self.state, new_indices)
        for p in group["params"]:
            self._selected_numel[p] = local(p).numel()
            if self._lean is not None:
                self._lean.adopt_host(p)
        if (self._lean is not None and group["reselect_every"] is None
                and getattr(self._ddp, "mode", None) != "comm_hook"):
            # (GMT re-selection scores every tensor's gradient, so nothing is frozen there; DDP
            # with a communication hook expects every gradient.)
            self._freeze_unselected(group, place)

    def _freeze_unselected(self, group: dict, place: distributed.GroupPlacement) -> None:
        """Lean mode: freeze tensors with no selected entry on *any* shard (every rank freezes
        alike, or FSDP2's collectives would not match)."""
        counts = [self.state[p]["indices"].numel() if "indices" in self.state.get(p, {}) else -1
                  for p in group["params"]]
        if place.layout is not None and counts:
            total = torch.tensor(counts, dtype=torch.int64)
            place.layout.collective.all_reduce_sum_(total)
            counts = total.tolist()
        self._lean.freeze_unselected(group["params"], [c == 0 for c in counts])

    def _after_selection(self, indices: Iterable[int], places: list) -> None:
        """Checks every rank runs after installing selections: replicas agree, shards add up;
        lean mode on plain params under several ranks looks for its DDP module."""
        chosen = [i for i in indices if self.param_groups[i]["params"]]
        if self.replica_check and distributed.world_size() > 1:
            distributed.check_replicas(
                (f"param group {i}", places[i],
                 [self.state[p]["indices"] for p in self.param_groups[i]["params"]],
                 distributed.expected_k(places[i], self.param_groups[i]["density"]))
                for i in chosen)
        if self._lean is not None and any(not places[i].sharded for i in chosen):
            from gallop_kernels.optim import ddp

            ddp.expect_ddp(self)

    @property
    def lean(self) -> bool:
        """Whether lean mode (compact gradients, frozen unselected tensors) is on."""
        return self._lean is not None

    def unfreeze(self) -> None:
        """Lean mode: give tensors frozen for having no selected entry their gradients back."""
        if self._lean is not None:
            self._lean.unfreeze()

    # -- for callers (phase one, integrations): public, so nobody reaches into private state --

    def is_selected(self, group: dict | None = None) -> bool:
        """Whether ``group`` (default: any group) holds a selection, from a step, `select` or a
        loaded checkpoint."""
        groups = self.param_groups if group is None else [group]
        return any("steps_since_selection" in g for g in groups)

    @contextlib.contextmanager
    def paused_lean(self) -> Iterator[None]:
        """Within the block lean mode's hooks leave dense gradients alone (phase one takes them
        itself); a no-op without lean mode."""
        if self._lean is None:
            yield
            return
        previous, self._lean.paused = self._lean.paused, True
        try:
            yield
        finally:
            self._lean.paused = previous

    @property
    def frozen(self) -> list[torch.Tensor]:
        """Tensors lean mode froze for having no selected entry (empty without lean mode)."""
        return self._lean.frozen if self._lean is not None else []

    def selected_indices(self, param: torch.Tensor) -> torch.Tensor:
        """Sorted flat int64 indices of the selected entries of ``param``."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("this tensor is not a parameter of the optimizer")
        st = self.state.get(param, {})
        if "indices" not in st:
            raise RuntimeError("no selection yet: call step() or select() first")
        return st["indices"].to(torch.int64)

    @property
    def num_selected(self) -> int:
        """Total number of selected entries over all groups (0 before the first selection)."""
        return sum(
            self.state[p]["indices"].numel()
            for group in self.param_groups
            for p in group["params"]
            if "indices" in self.state.get(p, {})
        )

    # -- for the distributed modules (optim/ddp.py, optim/distributed_checkpoint.py): the only
    # way they read or change this optimizer, so that its state has one owner --

    @property
    def lean_gradients(self) -> LeanGradients | None:
        """Lean mode's compact gradient buffers (`optim/lean.py`), or None without lean mode."""
        return self._lean

    @property
    def ddp_exchange(self) -> Any:
        """The `optim.ddp.DDPExchange` lean mode averages gradients with, or None."""
        return self._ddp

    def reselection_due(self, param: torch.Tensor) -> bool:
        """Whether the next step re-selects the group of ``param``."""
        index = self._group_index.get(id(param))
        if index is None or index >= len(self.param_groups):
            return False
        return self._due(self.param_groups[index]) == "reselect"

    def _due(self, group: dict) -> str | None:
        """Which selection a group needs before this step: "first", "reselect" or none."""
        if "steps_since_selection" not in group:
            lean = self._lean
            return "first" if any(p.grad is not None or (lean is not None and lean.on_host(p))
                                  for p in group["params"]) else None
        every = group["reselect_every"]
        if every is not None and group["steps_since_selection"] >= every:
            return "reselect"
        return None

    # ------------------------------------------------------------------------------------------
    # Step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Select where due (first step, every ``reselect_every``), then update selected entries.

        Three stages: `_prepare` checks everything the step reads (metadata only, see
        `optim/validation.py`) and averages lean gradients over DDP ranks; `_select_due` plans
        every due selection (it refuses NaN/inf scores) and only then installs them; the update
        runs per group. Nothing changes before the planning has succeeded.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps, replica_mean = self._prepare()
        self._select_due(steps, replica_mean)
        for group in self.param_groups:
            if "steps_since_selection" in group:
                self._update_group(group, steps)
        if self._lean is not None:
            # A step consumes the compact gradients, as if zero_grad() followed: the Trainer and
            # many loops call model.zero_grad(), which cannot reach these buffers.
            self._lean.zero()
        return loss

    def _prepare(self) -> tuple[dict[torch.Tensor, float], Callable[[list[torch.Tensor]], None] | None]:
        """Validate everything this step reads; returns each selected param's step count and how
        to average more gradients over DDP ranks (lean mode), or None.

        The per-step checks read metadata only (options, shapes, dtypes, devices, the CPU step
        counters), never device data, so they cost no host synchronisation on a GPU; data
        checks live in load_state_dict and selection."""
        call = self._count("step()")
        error, groups, replica_mean = None, self._everyone(), None
        steps: dict[torch.Tensor, float] = {}
        hook_exchange = getattr(self._ddp, "mode", None) == "comm_hook"
        try:
            self._check_groups()
            if hook_exchange:  # (DDP's hook averaged already; nothing collective here)
                replica_mean = self._exchange_gradients()
            for i, group in enumerate(self.param_groups):
                steps.update(self._check_state(i, for_step="steps_since_selection" in group))
                for p, name in zip(group["params"], self._labels(i)):
                    self._check_step_gradient(name, p)
            due = [self.placement(g) for g in self.param_groups if self._due(g) is not None]
            groups = self._collective_groups(due, exchange=True)
        except (ValueError, TypeError) as err:
            error = err
        # Under several ranks, the ranks whose collectives this step issues meet first, and a
        # refusal is every rank's (optim/rendezvous.py; docs/design.md#distributed).
        self._agree(call, groups, error)
        if not hook_exchange:
            # Lean mode under DDP: average the kept gradients over the ranks (what DDP would
            # have done) before they are read; see optim/ddp.py.
            replica_mean = self._exchange_gradients()
        return steps, replica_mean

    def _select_due(self, steps: dict[torch.Tensor, float],
                    replica_mean: Callable[[list[torch.Tensor]], None] | None) -> None:
        """Plan every due selection, then install them (restarting their params' step counts)."""
        due = {i: self._due(g) for i, g in enumerate(self.param_groups)}
        due = {i: d for i, d in due.items() if d is not None}
        places = {i: self.placement(self.param_groups[i]) for i in due}
        first = [i for i, d in due.items() if d == "first"]
        current = self._current_gradient
        if first and distributed.all_gradients_zero(
            [(places[i], [current(p) for p in self.param_groups[i]["params"]]) for i in first]
        ):
            # torch's _init_optim_state (get/set_optimizer_state_dict) and DeepSpeed step once
            # with all-zero gradients to create state: selecting from them would pick arbitrary
            # entries for good. The first real gradient selects instead.
            for i in first:
                del due[i]
        plans = {
            i: selection.plan(
                self.param_groups[i], self.state, self._names(i), self.backend,
                from_accumulated=(d == "reselect"), place=places[i], reduce=replica_mean,
                gradients=self._host_gradients(self.param_groups[i]) if d == "first" else None,
            )
            for i, d in due.items()
        }

        # -- nothing has changed before this line --
        self._adopt_params()
        for i, new_indices in plans.items():
            self._install(self.param_groups[i], new_indices, places[i])
            for p in self.param_groups[i]["params"]:
                steps[p] = 0.0
        if plans:
            self._after_selection(plans, places)

    def _current_gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient the next step reads for ``p`` (lean mode: compact, host sum or dense)."""
        return self._lean.grad(p) if self._lean is not None else local(p.grad)

    def _host_gradients(self, group: dict) -> dict[torch.Tensor, torch.Tensor] | None:
        """Lean mode before a group's first selection: its gradients, the host sums where they
        went there (streamed through the chunked select), else None (select from ``.grad``)."""
        lean = self._lean
        if lean is None or not any(lean.on_host(p) for p in group["params"]):
            return None
        return {p: lean.grad(p) for p in group["params"] if lean.grad(p) is not None}

    def _update_group(self, group: dict, steps: dict[torch.Tensor, float]) -> None:
        if not group["params"]:
            return
        beta1, beta2 = group["betas"]
        # Tensors that share a step count go to the fused kernel together (normally all of them).
        by_step: dict[int, list[torch.Tensor]] = {}
        grads = {}
        for p in group["params"]:
            grad = self._lean.grad(p) if self._lean is not None else local(p.grad)
            if grad is None:
                continue
            grads[p] = grad.contiguous()  # (the kernels read it flat; autograd's already is)
            st = self.state[p]
            st["step"] += 1
            by_step.setdefault(int(steps[p]) + 1, []).append(p)
            if "grad_accum" in st and not (self._lean is not None and self._lean.gathered(p)):
                st["grad_accum"].add_(grad.reshape(-1))  # (lean hooks accumulate by themselves)
        for step, params in by_step.items():
            hyper = AdamWHyper(step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                               eps=group["eps"], weight_decay=group["weight_decay"])
            sparse_adamw([local(p) for p in params], [grads[p] for p in params],
                         [self.state[p] for p in params], hyper, backend=self.backend)
        group["steps_since_selection"] += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As `torch.optim.Optimizer.zero_grad`; also clears lean mode's compact gradients."""
        super().zero_grad(set_to_none)
        self.last_grad_norm = None
        if self._lean is not None:
            self._lean.zero()

    # ------------------------------------------------------------------------------------------
    # Distributed data parallelism and clipping
    # ------------------------------------------------------------------------------------------

    def attach_ddp(self, module: Any, mode: str = "compact") -> None:
        """Tell lean mode which ``DistributedDataParallel`` module averages its gradients.

        Lean mode under DDP needs it (plain mode does not): ``"compact"`` (default) turns DDP's
        own gradient averaging off from the first backward and all-reduces only the kept entries
        before each step (ρ of DDP's traffic; the first step's host sums before it selects;
        tensors with no selected entry are frozen, which DDP built first would otherwise
        refuse); ``"comm_hook"`` keeps DDP's bucketed, overlapped reduction but registers a
        communication hook that reduces only the kept entries (nothing is frozen: DDP expects
        every gradient). Without this call, lean mode attaches to the first DDP module that runs
        a forward pass over its params (in ``"compact"`` mode). See `optim/ddp.py` and
        ``docs/design.md#distributed``.
        """
        from gallop_kernels.optim import ddp

        exchange = ddp.new_exchange(self, module, mode)
        if exchange is None:
            return
        self._ddp = exchange
        if self._lean is not None and mode == "comm_hook":
            # DDP's hook hands over the kept entries (the lean hooks gather nothing), and DDP
            # built first expects a gradient for every param (nothing stays frozen)
            self._lean.gathers_in_hook = False
            self.unfreeze()
        ddp.on_attached(self)

    def _exchange_gradients(self) -> Callable[[list[torch.Tensor]], None] | None:
        """Before gradients are read (step, clipping): lean mode under DDP averages them over the
        ranks; returns how to average more (re-selection's accumulated gradient), or None."""
        if self._lean is None or distributed.world_size() == 1:
            return None
        from gallop_kernels.optim import ddp

        return ddp.exchange(self)

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients the next step uses by their total norm; returns that norm.

        As ``torch.nn.utils.clip_grad_norm_`` over this optimizer's params, and lean-aware:
        lean mode keeps only the selected entries of each gradient, so its norm is the norm of
        *those* entries (the dense gradient is gone; a tensor not yet gathered, e.g. before a
        re-selection, counts whole). Under DDP the kept entries are averaged over the ranks
        first, under FSDP2 the squares are summed over the shards, so every rank gets the norm
        one process would. No host synchronisation (the clip factor stays on the device), unless
        ``error_if_nonfinite``. ``max_norm=inf`` only measures. The norm is also kept in
        :attr:`last_grad_norm` until new gradients arrive.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        if math.isnan(max_norm) or max_norm < 0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
        if math.isnan(norm_type) or norm_type <= 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
        call = self._count("clip_grad_norm_()")
        error, groups = None, self._everyone()
        try:
            self._check_groups()
            sharded = [place for place in map(self.placement, self.param_groups) if place.sharded]
            groups = self._collective_groups(sharded, exchange=True)
        except (ValueError, TypeError) as err:
            error = err
        self._agree(call, groups, error)
        if self._lean is None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
            if distributed.is_dtensor(norm):
                norm = norm.full_tensor()
        else:
            self._exchange_gradients()
            groups = [
                (self.placement(g), [self._lean.grad(p) for p in g["params"]])
                for g in self.param_groups
            ]
            norm = distributed.total_norm(groups, norm_type)
            if error_if_nonfinite and not bool(torch.isfinite(norm)):
                raise RuntimeError(f"the total norm of order {norm_type} of the kept gradients "
                                   f"is non-finite, so it cannot be clipped")
            if max_norm != math.inf:
                factor = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
                for _, grads in groups:
                    for g in grads:
                        if g is not None and g.numel():
                            g.mul_(factor.to(g.device, g.dtype))
        self.last_grad_norm = norm
        return norm

    def _named_params(self) -> Iterable[tuple[str, torch.Tensor]]:
        for i, group in enumerate(self.param_groups):
            yield from zip(self._names(i), group["params"])

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` works).

        Under FSDP2 this is *this rank's* state (its shards' selections, local indices), and each
        sharded group says which shard it holds (``"shard": [rank, world_size]``), so that it
        loads on that rank only. To save and reshard across ranks use
        `gallop_kernels.optim.distributed_checkpoint` (torch.distributed.checkpoint).
        """
        state_dict = checkpoint.make_portable(super().state_dict(), self.param_groups)
        distributed.mark_shards(state_dict, self.param_groups)
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any], *, convert_layout: bool = False) -> None:
        """Load a checkpoint after checking all of it; a refused one changes nothing.

        As `torch.optim.Optimizer.load_state_dict`: the load pre-hooks run first (their edits,
        or the dict they return, are what is loaded), the checkpoint's group options replace the
        optimizer's, and the post-hooks run once the state is in place. Unlike it, state tensors
        keep their dtypes (int indices, fp32 moments and master; torch would cast them to the
        param's dtype) and only move to the param's device; ``step`` stays an fp32 CPU tensor
        (plain-number steps of older checkpoints are converted).

        Everything is checked first: the groups' options (as the constructor checks them; a
        checkpoint without ``state_bits``, older than that option, means 32), every state entry
        (known keys only; indices integer, 1-D, strictly increasing and in range; moments and
        master float32 or 8-bit as the layout says, finite, ``exp_avg_sq`` >= 0; steps whole
        numbers >= 0). Group keys other than the options (e.g. an LR scheduler's
        ``initial_lr``) are kept, as torch does.

        The state's *layout* (``state_bits``, ``master_weights``) is the constructor's: a
        checkpoint whose layout options differ is refused unless ``convert_layout=True``, which
        converts its state into this optimizer's layout (8-bit moments dequantized or fp32 ones
        quantized; a missing master copy made from the param's current values, an unneeded one
        dropped) and keeps this optimizer's ``state_bits`` and ``master_weights``.

        Lean mode: gradients gathered for the previous selection are dropped, and the frozen
        tensors follow the loaded selection.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)  # shallow copy, as torch: hooks may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        error, where = None, self._everyone()
        try:
            where = self._collective_groups(map(self.placement, self.param_groups))
            state_dict = distributed.check_shard_marks(state_dict, self.param_groups)
            groups, state = checkpoint.prepare_load(
                state_dict, self.param_groups, self._names, convert_layout
            )
        except (ValueError, TypeError) as err:
            error = err
        # Under several ranks a load refused on some ranks is refused on all: the others would
        # go on into the next collective and wait there for good (optim/rendezvous.py).
        self._agree("load_state_dict()", where, error)

        # -- nothing has changed before this line --
        self.state = defaultdict(dict, state)
        self.param_groups = groups
        self._selected_numel = {p: local(p).numel() for p, st in state.items() if "indices" in st}
        self._adopt_params()
        if self._lean is not None:
            self._lean.zero()
            self._lean.unfreeze()
            for group in groups:
                if "steps_since_selection" in group and group["reselect_every"] is None:
                    self._freeze_unselected(group, self.placement(group))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
