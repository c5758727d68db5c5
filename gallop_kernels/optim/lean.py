"""Lean mode: keep only the selected entries of each gradient, and freeze tensors with none.

After selection, a post-accumulate-grad hook on every parameter gathers the selected entries of
its fresh dense gradient into a compact fp32 buffer (aligned with the optimizer state) and frees
the dense gradient at once, so at most one parameter's dense gradient exists at a time. Gradient
accumulation keeps working: the compact buffer accumulates until ``zero_grad``. Tensors with no
selected entry get ``requires_grad=False`` so autograd never computes their weight gradient.

Before a tensor's first selection the same hook moves its gradient to a `HostGradientBuffer`
(fp32, host memory, pinned with CUDA) and frees the device copy: the step that selects scores
the host sums chunk by chunk, as `gallop_kernels.calibrate` does, so even the first step never
holds the whole model's dense gradient on the device. (Not while DDP still averages dense
gradients itself: before lean mode found its DDP module, or with DDP's communication hook.)

Across ranks (``docs/design.md#distributed``): under FSDP2 the hook fires on the sharded param
with the gradient already reduced over the ranks, and gathers from its local shard; a tensor is
frozen only when no shard holds a selected entry (every rank freezes alike). Under DDP the hook
fires *before* DDP averages, so `optim/ddp.py` takes over the exchange: the hook gathers the
rank-local gradient and the step averages the compact buffers (``"compact"``), or the hook
leaves the gradient to a DDP communication hook (``"comm_hook"``: :attr:`gathers_in_hook` off).
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch

from gallop_kernels.optim.distributed import local


class HostGradientBuffer:
    """An fp32 host tensor of one weight's shape that sums the dense gradients it is given.

    Pinned when the weight lives on CUDA. :meth:`add` copies the gradient to the host; the caller
    frees the device tensor right after, so the device never holds more than one. Host memory:
    4 bytes per entry.
    """

    def __init__(self, shape: Sequence[int], device: torch.device,
                 start: torch.Tensor | None = None) -> None:
        pin = torch.device(device).type == "cuda"
        self.sum = (torch.zeros(tuple(shape), dtype=torch.float32, pin_memory=pin)
                    if start is None else start)

    @classmethod
    def starting_with(cls, grad: torch.Tensor) -> "HostGradientBuffer":
        """A buffer holding ``grad``: the tensor itself when it is already a host fp32 tensor of
        its own (not a view: no second copy of it), else a copy."""
        grad = grad.detach()
        if (grad.device.type == "cpu" and grad.dtype == torch.float32 and grad._base is None
                and grad.is_contiguous()):
            return cls(grad.shape, grad.device, start=grad)
        buffer = cls(grad.shape, grad.device)
        buffer.add(grad)
        return buffer

    def add(self, grad: torch.Tensor) -> None:
        self.sum.add_(grad.detach().to("cpu", torch.float32))


class LeanGradients:
    """Compact gradient buffers, the hooks that fill them, and the tensors frozen for lack of use."""

    def __init__(
        self,
        optimizer_state: Callable[[], dict],
        reselection_due: Callable[[torch.Tensor], bool],
        gradients_arrived: Callable[[], None] = lambda: None,
        dense_before_selection: Callable[[torch.Tensor], bool] = lambda param: False,
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
        self._gradients_arrived = gradients_arrived
        # Set by optim/ddp.py: False when a DDP communication hook gathers instead of this hook.
        self.gathers_in_hook = True
        # Whether gradients arrived since the last exchange over the ranks (optim/ddp.py).
        self.fresh = False
        # Gradients of tensors not selected yet, on the host (see the module docstring), and
        # whether a tensor's must stay on the device instead (DDP still averages it).
        self._host: dict[torch.Tensor, HostGradientBuffer] = {}
        self._dense_before_selection = dense_before_selection

    def watch(self, param: torch.Tensor) -> None:
        """Install the gather hook on ``param`` (once)."""
        if id(param) in self._hooks or not param.requires_grad:
            return
        self._hooks[id(param)] = param.register_post_accumulate_grad_hook(_hook(self))

    def gather(self, param: torch.Tensor) -> None:
        """Fold ``param.grad`` into its compact buffer (before its first selection: its host
        buffer) and free it."""
        if self.paused:
            return
        self.fresh = True
        self._gradients_arrived()
        st = self._optimizer_state().get(param)
        if param.grad is None or not self.gathers_in_hook:
            return
        if not st or "indices" not in st:
            if not self._dense_before_selection(param):
                self._to_host(param)
            return
        if self._reselection_due(param):
            return
        grad = local(param.grad).reshape(-1)
        self.add(param, torch.index_select(grad, 0, st["indices"]))
        if "grad_accum" in st:
            st["grad_accum"].add_(grad)
        param.grad = None

    def _to_host(self, param: torch.Tensor) -> None:
        grad = local(param.grad)
        buffer = self._host.get(param)
        if buffer is None or tuple(buffer.sum.shape) != tuple(grad.shape):
            self._host[param] = HostGradientBuffer.starting_with(grad)
        else:
            buffer.add(grad)
        param.grad = None

    def host_sums(self) -> dict[torch.Tensor, torch.Tensor]:
        """The host sums of gradients that arrived before their tensor's first selection."""
        return {p: b.sum for p, b in self._host.items()}

    def ensure_host(self, param: torch.Tensor) -> torch.Tensor:
        """The host sum of ``param`` (zeros if none arrived: another rank has one)."""
        if param not in self._host:
            shape = local(param).shape
            self._host[param] = HostGradientBuffer(shape, local(param).device)
        return self._host[param].sum

    def adopt_host(self, param: torch.Tensor) -> None:
        """After ``param``'s first selection: its host sum becomes its gathered gradient (and
        enters the re-selection accumulator); the host buffer is dropped."""
        buffer = self._host.pop(param, None)
        st = self._optimizer_state().get(param)
        if buffer is None or not st or "indices" not in st:
            return
        flat = buffer.sum.reshape(-1)
        device = st["indices"].device
        self.add(param, flat.index_select(0, st["indices"].to(flat.device, torch.int64)).to(device))
        if "grad_accum" in st:
            st["grad_accum"].add_(flat.to(device))

    def add(self, param: torch.Tensor, kept: torch.Tensor, replace: bool = False) -> None:
        """Add (or with ``replace``, set) the kept entries of a gradient of ``param``."""
        buf = self._compact.get(param)
        if buf is None or buf.numel() != kept.numel() or buf.device != kept.device:
            buf = torch.zeros(kept.numel(), dtype=torch.float32, device=kept.device)
            self._compact[param] = buf
        elif param not in self._gathered or replace:
            buf.zero_()
        buf.add_(kept)
        self._gathered.add(param)

    def compact_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """The compact buffers gathered since ``zero_grad``, by param."""
        return {p: self._compact[p] for p in self._gathered}

    def grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The (local) gradient the step should use: compact if gathered since ``zero_grad``,
        the host sum before the tensor's first selection, else dense."""
        if param in self._gathered:
            return self._compact[param]
        if param in self._host:
            return self._host[param].sum
        return local(param.grad)

    def on_host(self, param: torch.Tensor) -> bool:
        return param in self._host

    def gathered(self, param: torch.Tensor) -> bool:
        return param in self._gathered

    def zero(self) -> None:
        """Forget accumulated compact gradients and host sums (called by ``zero_grad``)."""
        self._gathered.clear()
        self._host.clear()
        self.fresh = False

    def freeze_unselected(self, params: Sequence[torch.Tensor], empty: Sequence[bool]) -> None:
        """``requires_grad=False`` for the params whose selection is ``empty`` (on every rank);
        remembered for `unfreeze`."""
        for p, nothing in zip(params, empty):
            if nothing and p.requires_grad:
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
            "fresh": self.fresh,
            "host": {p: b.sum for p, b in self._host.items()},
        }

    def restore(self, snapshot: dict) -> None:
        """Take over a `snapshot`; frozen tensors get their hook too (`watch` the others)."""
        self._compact = dict(snapshot["compact"])
        self._gathered = set(snapshot["gathered"])
        self._frozen = list(snapshot["frozen"])
        self.paused = bool(snapshot["paused"])
        self.fresh = bool(snapshot.get("fresh", False))
        self._host = {p: HostGradientBuffer(t.shape, t.device, start=t)
                      for p, t in snapshot.get("host", {}).items()}
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
        self._host.clear()


def _hook(lean: LeanGradients) -> Callable[[torch.Tensor], None]:
    # A weak reference: a dropped optimizer must not keep swallowing its params' gradients.
    ref = weakref.ref(lean)

    def hook(param: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            with torch.no_grad():
                target.gather(param)

    return hook
