"""SparseAdamW: AdamW on the exact GaLLoP selection, with optimizer state only for selected entries."""

from __future__ import annotations

import contextlib
from copy import deepcopy
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

from gallop_kernels import ops
from gallop_kernels.optim import checkpoint, selection
from gallop_kernels.optim.lean import LeanGradients
from gallop_kernels.optim.validation import check_grads, check_group_options, check_params
from gallop_kernels.reference import Score
from gallop_kernels.rules import DEFAULT_MIN_8BIT_ENTRIES, check_count


class SparseAdamW(Optimizer):
    """AdamW that trains only the top-``density`` entries of each param group by ``score``.

    The first :meth:`step` selects (or call :meth:`select` after accumulating calibration
    gradients), then every step updates only the selected entries. Per selected entry the state
    is a sorted int32 flat index, fp32 ``exp_avg`` and ``exp_avg_sq`` and, for bf16/fp16 params,
    an fp32 master copy; nothing of the parameters' size is kept (except the gradient accumulator
    of ``reselect_every``, which needs one fp32 value per entry).

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
        density: fraction ρ of each group's entries to train, in (0, 1].
        score: "gallop" (|g| / (|θ| + score_eps)), "gradient", "magnitude", "random", or a
            callable ``(param, grad) -> Tensor`` of the param's shape.
        score_eps: ε of the "gallop" and "magnitude" scores.
        seed: seed of the "random" score.
        reselect_every: re-select every N steps from the mean gradient since the last
            selection (GMT); entries that stay keep their state. ``None`` selects once.
        master_weights: "auto" (fp32 master copy for bf16/fp16 params), True or False.
        state_bits: 32, or 8 for blockwise 8-bit m and v with bitsandbytes' dynamic maps
            (1 byte each + an fp32 absmax per 256 entries).
        min_8bit_entries: under ``state_bits=8``, a tensor with fewer selected entries keeps
            fp32 moments (bitsandbytes' ``min_8bit_size`` rule; default 4096).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        lean: after selection, gather each gradient's selected entries into a compact fp32
            buffer in a post-accumulate-grad hook and free the dense gradient at once; freeze
            (``requires_grad=False``) tensors with no selected entry. See `optim/lean.py`.
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
        seed: int = 0,
        reselect_every: int | None = None,
        master_weights: bool | str = "auto",
        state_bits: int = 32,
        min_8bit_entries: int = DEFAULT_MIN_8BIT_ENTRIES,
        backend: str = "auto",
        lean: bool = False,
    ) -> None:
        ops.check_backend(backend)
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
            seed=seed,
            reselect_every=reselect_every,
            master_weights=master_weights,
            state_bits=state_bits,
            min_8bit_entries=min_8bit_entries,
        )
        check_group_options(defaults)
        self.backend = backend
        self._group_index: dict[int, int] = {}
        self._lean = LeanGradients(lambda: self.state, self._reselection_due) if lean else None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Param groups
    # ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's options and params before it joins the optimizer."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection (a list), not a set")
        params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        check_params(tensors)
        unknown = set(param_group) - set(self.defaults) - {"params", "param_names"}
        if unknown:
            raise ValueError(f"unknown option(s) in param group: {sorted(unknown)}")
        options = {**self.defaults, **param_group}
        if isinstance(options["betas"], list):
            options["betas"] = tuple(options["betas"])
        check_group_options(options)
        check_count(options["min_8bit_entries"], "min_8bit_entries", minimum=0)
        super().add_param_group({**options, "params": params})
        for p in tensors:
            self._group_index[id(p)] = len(self.param_groups) - 1
        if self._lean is not None:
            for p in tensors:
                self._lean.watch(p)

    def _names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        if "param_names" in group:
            return list(group["param_names"])
        return [
            f"group {group_index} param {i} (shape {tuple(p.shape)})"
            for i, p in enumerate(group["params"])
        ]

    # ------------------------------------------------------------------------------------------
    # Selection
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def select(self, gradients: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Select now, in every group, from the current ``.grad`` s (a re-selection if selected).

        Typical GaLLoP phase one: run backward over calibration batches (gradients accumulate in
        ``.grad``), call ``select()``, ``zero_grad()``, then train — or use
        `gallop_kernels.calibrate`, which never holds the model's dense gradient on the GPU.

        Args:
            gradients: optional ``{param: gradient}`` to score instead of ``.grad`` (may live on
                another device, e.g. pinned host memory; it is streamed chunk by chunk).
        """
        if gradients is None:
            check_grads(self._named_params())
        plans = [
            selection.plan(group, self.state, self._names(i), self.backend,
                           from_accumulated=False, gradients=gradients)
            for i, group in enumerate(self.param_groups)
        ]
        for group, new_indices in zip(self.param_groups, plans):
            self._install(group, new_indices)

    def _install(self, group: dict, new_indices: list[torch.Tensor]) -> None:
        selection.apply(group, self.state, new_indices)
        if self._lean is not None and group["reselect_every"] is None:
            # (GMT re-selection scores every tensor's gradient, so nothing is frozen there.)
            self._lean.freeze_unselected(group["params"])

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

    def _reselection_due(self, param: torch.Tensor) -> bool:
        """Whether the next step re-selects the group of ``param``."""
        return self._due(self.param_groups[self._group_index[id(param)]]) == "reselect"

    def _due(self, group: dict) -> str | None:
        """Which selection a group needs before this step: "first", "reselect" or none."""
        if "steps_since_selection" not in group:
            return "first" if any(p.grad is not None for p in group["params"]) else None
        every = group["reselect_every"]
        if every is not None and group["steps_since_selection"] >= every:
            return "reselect"
        return None

    # ------------------------------------------------------------------------------------------
    # Step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Select where due (first step, every ``reselect_every``), then update selected entries."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_grads(self._named_params())

        # Plan every due selection before changing anything, so a bad score leaves no trace.
        plans = {}
        for i, group in enumerate(self.param_groups):
            due = self._due(group)
            if due is not None:
                plans[i] = selection.plan(
                    group, self.state, self._names(i), self.backend,
                    from_accumulated=(due == "reselect"),
                )
        for i, new_indices in plans.items():
            self._install(self.param_groups[i], new_indices)

        for group in self.param_groups:
            if "steps_since_selection" in group:
                self._update_group(group)
        if self._lean is not None:
            # A step consumes the compact gradients, as if zero_grad() followed: the Trainer and
            # many loops call model.zero_grad(), which cannot reach these buffers.
            self._lean.zero()
        return loss

    def _update_group(self, group: dict) -> None:
        if not group["params"]:
            return
        beta1, beta2 = group["betas"]
        backend = ops.resolve_backend(self.backend, group["params"][0].device)
        # Tensors that share a step count go to the fused kernel together (normally all of them).
        by_step: dict[int, list[torch.Tensor]] = {}
        grads = {}
        for p in group["params"]:
            grad = self._lean.grad(p) if self._lean is not None else p.grad
            if grad is None:
                continue
            grads[p] = grad
            st = self.state[p]
            st["step"] += 1
            by_step.setdefault(int(st["step"].item()), []).append(p)
            if "grad_accum" in st and grad is p.grad:  # (lean hooks accumulate by themselves)
                st["grad_accum"].add_(p.grad.reshape(-1))
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], backend=backend)
        for step, params in by_step.items():
            states = [self.state[p] for p in params]
            full = [i for i, st in enumerate(states) if st["exp_avg"].dtype == torch.float32]
            quantized = [i for i, st in enumerate(states) if st["exp_avg"].dtype == torch.uint8]
            if full:
                ops.sparse_adamw_update(
                    [params[i] for i in full],
                    [grads[params[i]] for i in full],
                    [states[i]["indices"] for i in full],
                    [states[i]["exp_avg"] for i in full],
                    [states[i]["exp_avg_sq"] for i in full],
                    [states[i].get("master") for i in full],
                    step=step, **hyper,
                )
            if quantized:
                ops.sparse_adamw_update_8bit(
                    [params[i] for i in quantized],
                    [grads[params[i]] for i in quantized],
                    [states[i] for i in quantized],
                    step=step, **hyper,
                )
        group["steps_since_selection"] += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As `torch.optim.Optimizer.zero_grad`; also clears lean mode's compact gradients."""
        super().zero_grad(set_to_none)
        if self._lean is not None:
            self._lean.zero()

    def _named_params(self) -> Iterable[tuple[str, torch.Tensor]]:
        for i, group in enumerate(self.param_groups):
            yield from zip(self._names(i), group["params"])

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` works)."""
        return checkpoint.make_portable(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping int indices and fp32 moments/master in their own dtypes.

        ``torch.optim.Optimizer.load_state_dict`` would cast every state tensor to the param's
        dtype (bf16 indices, bf16 moments); here state tensors only move to the param's device.
        """
        groups = deepcopy(state_dict["param_groups"])
        saved_state = state_dict["state"]
        id_map = checkpoint.match_params(self.param_groups, groups)
        checkpoint.check_state(saved_state, id_map, groups, self.param_groups)
        checkpoint.restore_callables(groups, self.param_groups)
        super().load_state_dict({"state": {}, "param_groups": groups})
        for param_id, saved in saved_state.items():
            param = id_map[param_id]
            self.state[param] = checkpoint.to_param_device(saved, param)
