"""Lean mode under DistributedDataParallel: gather from the *averaged* gradient, freeze safely.

Lean mode's post-accumulate-grad hook fires on each rank's *local* gradient, before DDP
averages it; freeing that gradient would leave DDP averaging zeros, and freezing tensors after
DDP was built makes DDP wait forever for their gradients ("Expected to have finished reduction").
So lean mode takes the exchange over from DDP, in one of two modes (``SparseAdamW.attach_ddp``;
measured in ``benchmarks/ddp_lean.py`` and ``benchmarks/distributed_memory.py``, see
``docs/design.md#distributed``):

``"compact"`` (default), from the first backward: DDP's gradient synchronisation is switched
    off (``require_backward_grad_sync = False``, what ``no_sync()`` does; a forward pre-hook on
    the DDP module sets it again before every forward, since ``no_sync()`` restores the flag it
    found when its block ends). Before the first selection the hook moves each rank-local
    gradient to a host buffer, and the first step averages those one tensor at a time before it
    selects; after it the hook gathers the rank-local gradient into the compact buffer as in one
    process, and before the step (or clipping) one all-reduce averages the concatenated compact
    buffers: ρ of DDP's traffic. Dense gradients the step still reads (before a re-selection)
    and re-selection's accumulated gradient are averaged the same way. Frozen tensors are fine:
    DDP expects nothing, and DDP's buckets are never written.
``"comm_hook"``, once a selection exists: DDP keeps its bucketed reduction, overlapped with the
    backward pass, but a communication hook reduces only the selected entries of each bucket and
    hands them to the compact buffers. DDP expects a gradient for every parameter it was built
    with, so nothing is frozen, and DDP's buckets keep the dense gradient (the first step is
    dense, as plain DDP's).

Without ``attach_ddp`` lean mode finds its DDP module by itself: when a lean optimizer is built
on plain params under several ranks (and again after a selection), a forward pre-hook (removed
once found) waits for the first forward that runs inside a ``DistributedDataParallel`` wrapping
these params (DDP sets ``_active_ddp_module`` during its forward) and attaches in ``"compact"``
mode before DDP prepares its backward. `sync_paused` switches DDP's synchronisation off for
phase one (``gallop_kernels.calibrate``), which reduces the sums itself. If gradients were
gathered on several ranks and no DDP module was found,
the step raises rather than let the ranks diverge.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch

from gallop_kernels.ops.collective import ProcessGroupCollective
from gallop_kernels.optim.distributed import is_dtensor, local, world_size

MODES = ("compact", "comm_hook")


def _ddp_class() -> type:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _params_of(optimizer: Any) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _plain_params(optimizer: Any) -> list[torch.Tensor]:
    from gallop_kernels.optim.distributed import is_dtensor

    return [p for group in optimizer.param_groups for p in group["params"] if not is_dtensor(p)]


class DDPExchange:
    """The gradient exchange between lean mode and one DDP module (see the module docstring)."""

    def __init__(self, optimizer: Any, module: Any, mode: str) -> None:
        import torch.distributed as dist

        self.module = module
        self.mode = mode
        self.process_group = module.process_group
        self.world = dist.get_world_size(self.process_group)
        self._optimizer = weakref.ref(optimizer)
        self.active = False
        self.bytes_reduced = 0  # payload all-reduced by this exchange (for measurements)
        if mode == "comm_hook" and optimizer.lean_gradients is not None:
            module.register_comm_hook(self, _comm_hook)  # (plain mode: DDP's own reduction)

    # -- compact mode -----------------------------------------------------------------------

    def activate(self) -> None:
        """Take the exchange over from DDP (compact: from the first backward; comm_hook: once a
        selection exists)."""
        if self.active:
            return
        opt = self._optimizer()
        if self.mode == "compact":
            ours = _params_of(opt)
            strays = [name for name, p in self.module.named_parameters()
                      if p.requires_grad and id(p) not in ours]
            if strays:
                raise RuntimeError(
                    f"lean mode under DDP averages the gradients of its own params only, but "
                    f"{strays[:5]}{' ...' if len(strays) > 5 else ''} train without this "
                    f"optimizer: give them to SparseAdamW, freeze them, or call "
                    f"opt.attach_ddp(model, mode='comm_hook') (DDP keeps averaging everything)")
            self.module.require_backward_grad_sync = False
            # ...and before every later forward: no_sync() restores the flag it found when its
            # block ends, which would turn DDP's dense all-reduce back on (the usual gradient
            # accumulation loop runs every micro-batch but the last under no_sync()).
            self._keep_off = self.module.register_forward_pre_hook(_sync_off)
        self.active = True

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for t in tensors:
            if t.numel():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
                t.div_(self.world)
                self.bytes_reduced += t.numel() * t.element_size()

    def mean(self, tensors: list[torch.Tensor]) -> None:
        """Average these (e.g. re-selection's accumulated gradients) over the ranks, in place."""
        self._all_reduce_mean(tensors)

    def exchange(self, optimizer: Any) -> None:
        """Before a step or clipping: average what arrived since the last exchange."""
        lean = optimizer.lean_gradients
        if self.mode == "comm_hook":
            # The hook averaged the kept entries; DDP also wrote the dense gradient back.
            for p in lean.compact_grads():
                p.grad = None
            return
        if not lean.fresh:
            return
        kept = lean.compact_grads()
        # (in the optimizer's param order, the same on every rank: a set's order is not)
        params = [p for p in _plain_params(optimizer) if p in kept]
        if params:
            flat = torch.cat([kept[p] for p in params]) if len(params) > 1 else kept[params[0]]
            self._all_reduce_mean([flat])
            if len(params) > 1:
                for p, part in zip(params, torch.split(flat, [kept[p].numel() for p in params])):
                    kept[p].copy_(part)
        dense = [local(p.grad) for p in _plain_params(optimizer)
                 if p.grad is not None and p not in kept]
        self._all_reduce_mean(dense)
        self._mean_host_sums(optimizer, lean)
        lean.fresh = False

    def _mean_host_sums(self, optimizer: Any, lean: Any) -> None:
        """Average the host sums of gradients that arrived before the first selection, one
        tensor at a time (a tensor a rank did not reach counts as zeros there)."""
        plain = [p for g in optimizer.param_groups if not optimizer.is_selected(g)
                 for p in g["params"] if not is_dtensor(p)]
        if not plain:  # (every group selected: no host sums anywhere)
            return
        here = lean.host_sums()
        present = torch.tensor([int(p in here) for p in plain], dtype=torch.int64)
        collective = ProcessGroupCollective(self.process_group)
        collective.all_reduce_sum_(present)
        for p, anywhere in zip(plain, present.tolist()):
            if anywhere:
                host = lean.ensure_host(p)
                collective.all_reduce_sum_(host)
                host.div_(self.world)
                self.bytes_reduced += host.numel() * host.element_size()

    def detach(self) -> None:
        if self.mode == "compact" and self.active:
            self._keep_off.remove()
            self.module.require_backward_grad_sync = True
        self.active = False


def _sync_off(module: Any, args: Any) -> None:
    """Forward pre-hook of a DDP module in compact mode: its backward must not all-reduce."""
    module.require_backward_grad_sync = False


def _comm_hook(exchange, bucket):  # (no annotations: DDP checks them against its own types)
    """DDP communication hook: reduce only the selected entries of the bucket's gradients."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    opt = exchange._optimizer()
    lean = None if opt is None else opt.lean_gradients
    params = bucket.parameters()
    state = {} if opt is None else opt.state
    compact = (
        exchange.active and lean is not None
        and all("indices" in state.get(p, {}) and "grad_accum" not in state[p] for p in params)
        and not any(opt.reselection_due(p) for p in params)
    )
    if not compact:  # before selection, or a tensor that needs its dense gradient: average all
        exchange.bytes_reduced += buffer.numel() * buffer.element_size()
        fut = dist.all_reduce(buffer, group=exchange.process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(exchange.world))
    grads = bucket.gradients()
    kept = [g.reshape(-1).index_select(0, state[p]["indices"]).float()
            for p, g in zip(params, grads)]
    flat = torch.cat(kept) if kept else buffer.new_zeros(0, dtype=torch.float32)
    exchange.bytes_reduced += flat.numel() * flat.element_size()
    fut = dist.all_reduce(flat, group=exchange.process_group, async_op=True).get_future()

    def done(f: torch.futures.Future) -> torch.Tensor:
        total = f.value()[0].div_(exchange.world)
        for p, part in zip(params, torch.split(total, [k.numel() for k in kept])):
            lean.add(p, part, replace=True)
        return buffer  # DDP writes it back into .grad; the step frees it (exchange())

    return fut.then(done)


# ----------------------------------------------------------------------------------------------
# Attaching: explicitly, or found at the first DDP forward
# ----------------------------------------------------------------------------------------------


def new_exchange(optimizer: Any, module: Any, mode: str = "compact") -> DDPExchange | None:
    """`SparseAdamW.attach_ddp`'s checks: a new exchange with the DDP ``module``, or None when the
    optimizer is attached to it in this mode already (the optimizer keeps it, then calls
    `on_attached`)."""
    if not isinstance(module, _ddp_class()):
        raise TypeError(f"attach_ddp needs a torch.nn.parallel.DistributedDataParallel module, "
                        f"got {type(module).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not (_params_of(optimizer) & {id(p) for p in module.parameters()}):
        raise ValueError("the DDP module holds none of this optimizer's params")
    current = optimizer.ddp_exchange
    if current is not None:
        if current.module is module and current.mode == mode:
            return None
        raise RuntimeError("this optimizer is already attached to a DDP module")
    return DDPExchange(optimizer, module, mode)


def on_attached(optimizer: Any) -> None:
    """After the optimizer keeps a new exchange: stop looking for a DDP module, and take the
    exchange over now in compact mode (from the first backward: gradients that arrive before
    the selection go to the host and are averaged here, so DDP never holds them) or, with a
    communication hook, once lean mode holds a selection (DDP averages the dense gradient of
    the first step)."""
    _PENDING.discard(optimizer)
    exchange = optimizer.ddp_exchange
    if optimizer.lean_gradients is not None and (exchange.mode == "compact"
                                                 or optimizer.is_selected()):
        exchange.activate()


def expect_ddp(optimizer: Any) -> None:
    """A lean optimizer built, or selected, on plain params: activate the exchange, or look for
    DDP (under several ranks)."""
    if optimizer.ddp_exchange is not None:
        optimizer.ddp_exchange.activate()
        return
    if world_size() == 1 or not optimizer.replica_check or not _plain_params(optimizer):
        return  # (replica_check=False: ranks that train on their own)
    _PENDING.add(optimizer)
    _arm()


def exchange(optimizer: Any) -> Callable[[list[torch.Tensor]], None] | None:
    """`SparseAdamW._exchange_gradients`: average lean gradients over DDP ranks if needed."""
    ex = optimizer.ddp_exchange
    if ex is None or not ex.active:
        lean = optimizer.lean_gradients
        if (lean.compact_grads() and optimizer.replica_check and _plain_params(optimizer)
                and world_size() > 1):
            raise RuntimeError(
                f"lean mode gathered gradients on {world_size()} ranks, but no "
                f"DistributedDataParallel module ran a forward pass over its params since the "
                f"selection, so nothing averages them and the ranks would diverge. Wrap the model "
                f"in DDP (found by itself) or call opt.attach_ddp(ddp_model); ranks that train "
                f"independently pass replica_check=False")
        return None
    if optimizer.lean_gradients is not None:
        ex.exchange(optimizer)
    return ex.mean if ex.mode == "compact" else None


@contextlib.contextmanager
def sync_paused(optimizer: Any) -> Iterator[list[Any]]:
    """Within the block, DDP modules that hold the optimizer's params do not all-reduce in the
    backward pass (as under ``no_sync()``): phase one sums the gradients once itself. Yields the
    list of such DDP modules seen running (the attached one first); their flags are restored."""
    found: dict[int, tuple[Any, bool]] = {}
    ours = _params_of(optimizer)

    def pause(ddp: Any) -> None:
        if id(ddp) not in found:
            found[id(ddp)] = (ddp, ddp.require_backward_grad_sync)
            ddp.require_backward_grad_sync = False

    def on_forward(module: Any, args: Any) -> None:
        ddp = getattr(_ddp_class(), "_active_ddp_module", None)
        if ddp is None or id(ddp) in found:
            return
        if ours & {id(p) for p in ddp.module.parameters()}:
            pause(ddp)  # (inside DDP's forward, before it prepares its backward)

    if optimizer.ddp_exchange is not None:
        pause(optimizer.ddp_exchange.module)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    modules = [m for m, _ in found.values()]
    try:
        yield modules
    finally:
        handle.remove()
        modules[:] = [m for m, _ in found.values()]
        for ddp, flag in found.values():
            ddp.require_backward_grad_sync = flag


_PENDING: "weakref.WeakSet[Any]" = weakref.WeakSet()
_HOOK: list[Any] = []
_LAST_SEEN: list[Any] = [None, frozenset()]  # the DDP module last looked at, and its param ids


def _arm() -> None:
    if not _HOOK:
        _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(_on_forward))


def _on_forward(module: Any, args: Any) -> None:
    ddp = getattr(_ddp_class(), "_active_ddp_module", None)
    if ddp is None:
        return
    if _LAST_SEEN[0] is not ddp:  # (once per DDP module, not once per submodule's forward)
        _LAST_SEEN[:] = [ddp, frozenset(id(p) for p in ddp.module.parameters())]
    inside = _LAST_SEEN[1]
    for opt in list(_PENDING):
        if opt.ddp_exchange is None and _params_of(opt) & inside:
            opt.attach_ddp(ddp, "compact")
    if not _PENDING and _HOOK:
        _HOOK.pop().remove()
        _LAST_SEEN[:] = [None, frozenset()]
