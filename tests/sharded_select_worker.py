"""One gloo rank of tests/test_triton_sharded_select.py (run as a script; not a test module).

    python tests/sharded_select_worker.py RANK WORLD PORT OUT_DIR

Builds the same groups as every other rank (`cases`), keeps this rank's shard of every tensor
(uneven, some empty), runs the Triton selection with a ``ShardLayout`` in the interpreter and
saves, per case, the local indices (or the error message) to ``OUT_DIR/rank<RANK>.pt``.
"""

from __future__ import annotations

import os
import sys


def split(n: int, world: int, pattern: int) -> list[int]:
    """Uneven shard sizes of n entries over the ranks, some empty (FSDP2-like, Shard(0))."""
    if pattern == 0:  # everything on the last rank
        return [0] * (world - 1) + [n]
    if pattern == 1:  # ragged
        cuts = sorted({min(n, (n * (r + 1)) // (world + 1) + r) for r in range(world - 1)})
        cuts = (cuts + [n] * world)[: world - 1]
        bounds = [0] + cuts + [n]
        return [max(0, bounds[i + 1] - bounds[i]) for i in range(world)]
    return [n] + [0] * (world - 1)  # everything on rank 0


def cases(world: int) -> list[dict]:
    """Groups of full tensors (the same on every rank) and how each tensor is sharded."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    sizes = [70, 1, 45, 33]
    out = []

    def group(levels=None, dtype=torch.float32):
        params, grads = [], []
        for n in sizes:
            if levels is None:
                p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
            else:
                lv = torch.tensor(levels)
                p = lv[torch.randint(len(lv), (n,), generator=gen)]
                g = lv[torch.randint(len(lv), (n,), generator=gen)]
            params.append(p.to(dtype))
            grads.append(g.to(torch.bfloat16))
        return params, grads

    total = sum(sizes)
    patterns = [1, 0, 2, 1]
    for score in ("gallop", "gradient", "magnitude", "random", "precomputed"):
        params, grads = group(levels=[0.0, 0.5, -0.5, 2.0, 1e-3] if score == "magnitude" else None)
        pre = [torch.randn(p.numel(), generator=gen) for p in params] if score == "precomputed" else None
        for k in ((1, 29, total) if score == "gallop" else (29,)):
            out.append(dict(name=f"{score}-k{k}", score=score, k=k, params=params, grads=grads,
                            precomputed=pre, patterns=patterns))
    params, grads = group()
    out.append(dict(name="empty-ranks", score="gallop", k=29, params=params, grads=grads,
                    precomputed=None, patterns=[2, 2, 2, 2]))  # every rank but 0 holds nothing
    params = [torch.full((n,), 0.25) for n in sizes]  # every score tied
    grads = [torch.full((n,), 0.5, dtype=torch.bfloat16) for n in sizes]
    for k in (1, 50):
        out.append(dict(name=f"tied-k{k}", score="gallop", k=k, params=params, grads=grads,
                        precomputed=None, patterns=[1, 1, 1, 0]))
    params, grads = group()
    grads = [g.clone() for g in grads]
    grads[2][40] = float("nan")  # lands on one rank only (pattern 1 puts index 40 on the last)
    out.append(dict(name="nan", score="gallop", k=10, params=params, grads=grads, precomputed=None,
                    patterns=[1, 1, 1, 1], error="w2"))
    return out


def shard(case: dict, rank: int, world: int):
    """This rank's local tensors and their global offsets in the group's concatenation."""
    params, grads, pre, offsets = [], [], [], []
    base = 0
    for i, p in enumerate(case["params"]):
        sizes = split(p.numel(), world, case["patterns"][i])
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        params.append(p[start:stop].clone())
        grads.append(case["grads"][i][start:stop].clone())
        if case["precomputed"] is not None:
            pre.append(case["precomputed"][i][start:stop].clone())
        offsets.append(base + start)
        base += p.numel()
    return params, grads, (pre if case["precomputed"] is not None else None), offsets, base


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from gallop_kernels.ops import select as S
    from gallop_kernels.ops.collective import ProcessGroupCollective, ShardLayout

    S.BLOCK, S.CBLOCK = 32, 8  # several tiles per shard, several candidate chunks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    coll = ProcessGroupCollective()
    results = {}
    try:
        for case in cases(world):
            params, grads, pre, offsets, total = shard(case, rank, world)
            layout = ShardLayout(coll, total, tuple(offsets))
            names = [f"w{i}" for i in range(len(params))]
            try:
                out = S.triton_select(params, grads, case["k"], case["score"], seed=7,
                                      names=names, precomputed=pre, layout=layout)
                results[case["name"]] = [o.to(torch.int64) for o in out]
            except ValueError as e:
                results[case["name"]] = str(e)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
