"""Lean mode: keep only the selected entries of each gradient, and freeze tensors with none.

After selection, a post-accumulate-grad hook on every parameter gathers the selected entries of
its fresh dense gradient into a compact fp32 buffer (aligned with the optimizer state) and frees
the dense gradient at once, so at most one parameter's dense gradient exists at a time. Gradient
accumulation keeps working: the compact buffer accumulates until ``zero_grad``. Tensors with no
selected entry get ``requires_grad=False`` so autograd never computes their weight gradient.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


class LeanGradients:
    """Compact gradient buffers, the hooks that fill them, and the tensors frozen for lack of use."""

    def __init__(
        self,
        optimizer_state: Callable[[], dict],
        reselection_due: Callable[[torch.Tensor], bool],
    ) -> None:
        self._optimizer_state = optimizer_state  # a getter: load_state_dict replaces the dict
        # Before a step that re-selects, the gradient must stay dense: it is applied to the
        # *new* selection, which is not known until that step scores the accumulated gradient.
        self._reselection_due = reselection_due
        self._compact: dict[torch.Tensor, torch.Tensor] = {}
        self._gathered: set[torch.Tensor] = set()
        self._frozen: list[torch.Tensor] = []
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self.paused = False  # calibration takes the dense gradients itself

    def watch(self, param: torch.Tensor) -> None:
        """Install the gather hook on ``param`` (once)."""
        if id(param) in self._hooks or not param.requires_grad:
            return
        self._hooks[id(param)] = param.register_post_accumulate_grad_hook(_hook(self))

    def gather(self, param: torch.Tensor) -> None:
        """Fold ``param.grad`` into its compact buffer and free it (no-op before selection)."""
        st = self._optimizer_state().get(param)
        if self.paused or not st or "indices" not in st or param.grad is None:
            return
        if self._reselection_due(param):
            return
        grad = param.grad.reshape(-1)
        buf = self._compact.get(param)
        if buf is None or buf.numel() != st["indices"].numel():
            buf = torch.zeros(st["indices"].numel(), dtype=torch.float32, device=param.device)
            self._compact[param] = buf
        elif param not in self._gathered:
            buf.zero_()
        buf.add_(torch.index_select(grad, 0, st["indices"]))
        if "grad_accum" in st:
            st["grad_accum"].add_(grad)
        self._gathered.add(param)
        param.grad = None

    def grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The gradient the step should use: compact if gathered since ``zero_grad``, else dense."""
        if param in self._gathered:
            return self._compact[param]
        return param.grad

    def gathered(self, param: torch.Tensor) -> bool:
        return param in self._gathered

    def zero(self) -> None:
        """Forget accumulated compact gradients (called by ``zero_grad``)."""
        self._gathered.clear()

    def freeze_unselected(self, params: list[torch.Tensor]) -> None:
        """``requires_grad=False`` for tensors without a selected entry; remembered for `unfreeze`."""
        state = self._optimizer_state()
        for p in params:
            st = state.get(p)
            if st and "indices" in st and st["indices"].numel() == 0 and p.requires_grad:
                p.requires_grad_(False)
                self._frozen.append(p)

    def unfreeze(self) -> None:
        """Give frozen tensors their gradients back (before a new calibration)."""
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()

    @property
    def frozen(self) -> list[torch.Tensor]:
        return list(self._frozen)

    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._compact.values())

    def snapshot(self) -> dict:
        """The buffers and bookkeeping, without the hooks (for the optimizer's deepcopy/pickle)."""
        return {
            "compact": dict(self._compact),
            "gathered": list(self._gathered),
            "frozen": list(self._frozen),
            "paused": self.paused,
        }

    def restore(self, snapshot: dict) -> None:
        """Take over a `snapshot`; frozen tensors get their hook too (`watch` the others)."""
        self._compact = dict(snapshot["compact"])
        self._gathered = set(snapshot["gathered"])
        self._frozen = list(snapshot["frozen"])
        self.paused = bool(snapshot["paused"])
        for p in self._frozen:  # (a hook needs requires_grad; they get it back in `unfreeze`)
            p.requires_grad_(True)
            self.watch(p)
            p.requires_grad_(False)

    def close(self) -> None:
        """Remove the hooks and unfreeze: the params behave as if lean mode never existed."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.unfreeze()
        self._compact.clear()
        self._gathered.clear()


def _hook(lean: LeanGradients) -> Callable[[torch.Tensor], None]:
    # A weak reference: a dropped optimizer must not keep swallowing its params' gradients.
    ref = weakref.ref(lean)

    def hook(param: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            with torch.no_grad():
                target.gather(param)

    return hook
