"""The two collectives exact selection needs across ranks, and where each rank's shard sits.

Selection is exact over the whole (unsharded) group even when every rank holds only a shard of
each parameter (FSDP2's ``Shard(0)``, HSDP's shard dimension): the radix histograms are summed
over the ranks before each bucket choice, so every rank finds the same threshold, and the ties
are shared out in global flat-index order (see ``docs/design.md#distributed``). That takes
only two operations, summing a small integer tensor and gathering one from every rank, so the
selection code depends on this protocol rather than on ``torch.distributed`` itself: a test can
stand in its own, and one process needs none (``layout=None``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Collective", "ProcessGroupCollective", "ShardLayout"]


@runtime_checkable
class Collective(Protocol):
    """The ranks that share one param group. Every rank calls the same methods in the same order."""

    world_size: int
    rank: int

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` (int64 or float) over the ranks, in place."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape and dtype everywhere), stacked: ``[world_size, *shape]``."""
        ...


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's local tensors sit in the group's concatenation of the full tensors.

    ``total``: entries of the whole (unsharded) group; ``k = k_for_density(total, density)``.
    ``offsets``: per local tensor of the group, the global flat offset of its first local entry
    (for an empty local tensor, any offset: it holds nothing). The "random" score hashes
    ``offsets[i] + local_index`` and ties are ordered by it, so one process with
    ``offsets = cumulative local sizes`` selects exactly as ``layout=None`` does.
    """

    collective: Collective
    total: int
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            total = operator.index(self.total)
        except TypeError:
            raise TypeError(f"ShardLayout.total must be an int, got {self.total!r}") from None
        if isinstance(self.total, bool) or total < 0:
            raise ValueError(f"ShardLayout.total must be a non-negative int, got {self.total!r}")
        object.__setattr__(self, "total", total)
        try:
            offsets = tuple(operator.index(o) for o in self.offsets)
        except TypeError:
            raise TypeError(f"ShardLayout.offsets must be ints, got {self.offsets!r}") from None
        if any(isinstance(o, bool) or o < 0 for o in self.offsets):
            raise ValueError(f"ShardLayout.offsets must be non-negative ints, got {offsets!r}")
        object.__setattr__(self, "offsets", offsets)
        for attr in ("world_size", "rank"):
            if not isinstance(getattr(self.collective, attr, None), int):
                raise TypeError(f"ShardLayout.collective needs an int attribute {attr!r}")
        if not 0 <= self.collective.rank < self.collective.world_size:
            raise ValueError(
                f"collective rank {self.collective.rank} is outside world size "
                f"{self.collective.world_size}"
            )


class ProcessGroupCollective:
    """:class:`Collective` over a ``torch.distributed`` process group (default: the world).

    The tensors selection exchanges are tiny (a histogram of 64Ki bins, a few ints per tensor),
    so they are moved to whatever device the group's backend needs and back: gloo takes CPU
    tensors, nccl CUDA tensors. For HSDP pass the group of the shard dimension (the ranks that
    together hold one replica), e.g. ``mesh.get_group("shard")``.
    """

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ProcessGroupCollective needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self._dist = dist
        self.group = group
        self.world_size: int = dist.get_world_size(group)
        self.rank: int = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:  # gloo (and mpi) reduce host tensors
            self._device = torch.device("cpu")

    def _to_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self._device and tensor.is_contiguous():
            return tensor
        return tensor.to(self._device).contiguous()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        work = self._to_backend(tensor)
        self._dist.all_reduce(work, op=self._dist.ReduceOp.SUM, group=self.group)
        if work is not tensor:
            tensor.copy_(work)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        work = self._to_backend(tensor)
        # The list form: gloo's all_gather_into_tensor refuses a [world, *shape] output.
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        self._dist.all_gather(parts, work, group=self.group)
        return torch.stack(parts).to(tensor.device)
