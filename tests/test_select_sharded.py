"""Sharded selection over real gloo ranks equals the one-process selection of the full tensors.

Each configuration (world size, backend) spawns its ranks once, as separate processes talking
gloo over 127.0.0.1; every rank runs all cases below on its row shards (``torch.chunk`` along dim
0, as FSDP2's ``Shard(0)`` places them, or explicit splits with empty ranks) and writes its local
indices. This process then maps them to global indices and compares their union with
``select_naive.select`` on the full tensors. A NaN on one rank must make every rank raise the same
``ValueError`` (and the following cases still run: nobody hung or left a collective behind).

Run a worker by hand: ``python tests/test_select_sharded.py RANK WORLD PORT BACKEND OUT``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # per spawned configuration: every rank must be done by then

# ----------------------------------------------------------------------------------------------
# The cases (built identically here and in every rank)
# ----------------------------------------------------------------------------------------------


def user_score(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A signed elementwise score (negative values, ties at zero): shard-invariant by design."""
    return grad.float() * torch.sign(param.float()) - 0.5 * param.float()


def _chunk_rows(rows: int, world: int) -> list[int]:
    """Rows per rank as ``torch.chunk`` (and FSDP2's Shard(0)) gives them; trailing ranks may get none."""
    sizes = [c.shape[0] for c in torch.chunk(torch.empty(rows, 0), world)]
    return sizes + [0] * (world - len(sizes))


def cases(world: int) -> list[dict]:
    """Plain-data case specs. ``data``: how θ and g are filled; ``splits``: rows per rank per
    tensor (None: torch.chunk); ``chunk``/``max_candidates``: force the torch backend's
    many-ties path (only read by the torch backend)."""
    out = []
    shapes3 = [[7, 5], [1, 9], [13, 3]]
    for score in ("gallop", "gradient", "magnitude", "random", "callable"):
        for density in (0.05, 0.3):
            out.append(dict(name=f"{score}-{density}", shapes=shapes3, dtype="float32",
                            score=score, density=density, data="normal", seed=len(out)))
    out.append(dict(name="bf16-ties", shapes=shapes3, dtype="bfloat16", score="gallop",
                    density=0.2, data="coarse", seed=1))
    out.append(dict(name="fp16", shapes=[[6, 4], [5, 5]], dtype="float16", score="gradient",
                    density=0.1, data="coarse", seed=2))
    out.append(dict(name="all-tied", shapes=shapes3, dtype="float32", score="gallop",
                    density=0.3, data="tied", seed=3))
    out.append(dict(name="mostly-zero-grads", shapes=shapes3, dtype="float32", score="gradient",
                    density=0.2, data="sparse_grad", seed=4))
    out.append(dict(name="k=1", shapes=shapes3, dtype="float32", score="gallop",
                    density=1e-9, data="coarse", seed=5))
    out.append(dict(name="k=N", shapes=shapes3, dtype="float32", score="gallop",
                    density=1.0, data="coarse", seed=6))
    out.append(dict(name="k=N-tied", shapes=shapes3, dtype="float32", score="magnitude",
                    density=1.0, data="tied", seed=6))
    # A rank with no rows of any tensor, and one tensor entirely on the last rank.
    empty_rank = [[7] + [0] * (world - 1), [0] * (world - 1) + [1], [13] + [0] * (world - 1)]
    out.append(dict(name="rank-without-rows", shapes=shapes3, dtype="float32", score="gallop",
                    density=0.25, data="coarse", seed=7, splits=empty_rank))
    out.append(dict(name="fewer-rows-than-ranks", shapes=[[2, 11], [1, 3]], dtype="float32",
                    score="random", density=0.4, data="normal", seed=8))
    out.append(dict(name="one-tensor", shapes=[[17]], dtype="float32", score="gallop",
                    density=0.2, data="coarse", seed=9))
    for score in ("gallop", "callable", "magnitude"):  # the torch backend's many-ties path
        out.append(dict(name=f"many-ties-path-{score}", shapes=shapes3, dtype="float32",
                        score=score, density=0.3, data="coarse", seed=10, chunk=3,
                        max_candidates=0))
    out.append(dict(name="many-ties-path-tied", shapes=shapes3, dtype="float32", score="gallop",
                    density=0.5, data="tied", seed=11, chunk=2, max_candidates=0))
    out.append(dict(name="nan-on-last-rank", shapes=shapes3, dtype="float32", score="gallop",
                    density=0.2, data="normal", seed=12, nan=[2, -1]))
    out.append(dict(name="nan-callable-first-rank", shapes=shapes3, dtype="float32",
                    score="callable", density=0.2, data="normal", seed=14, nan=[0, 0]))
    out.append(dict(name="after-nan", shapes=shapes3, dtype="float32", score="gradient",
                    density=0.2, data="coarse", seed=13))
    return out


def build(case: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The full (unsharded) params and grads of a case."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    params, grads = [], []
    for shape in case["shapes"]:
        kind = case["data"]
        if kind == "normal":
            p = torch.randn(shape, generator=gen)
            g = torch.randn(shape, generator=gen)
        elif kind == "coarse":  # few distinct values: ties across tensors and ranks
            p = torch.randint(-2, 3, shape, generator=gen) * 0.5
            g = torch.randint(0, 3, shape, generator=gen) * 0.25
        elif kind == "tied":
            p = torch.ones(shape)
            g = torch.ones(shape)
        elif kind == "sparse_grad":
            p = torch.randn(shape, generator=gen)
            g = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.1)
        else:
            raise ValueError(kind)
        params.append(p.to(dtype))
        grads.append(g.to(dtype))
    if "nan" in case:
        tensor, row = case["nan"]
        grads[tensor][row].view(-1)[0] = float("nan")
    return params, grads


def shards(case: dict, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, per tensor: (first row, rows)."""
    out = [[] for _ in range(world)]
    for t, shape in enumerate(case["shapes"]):
        rows = (case.get("splits") or [None] * len(case["shapes"]))[t] or _chunk_rows(shape[0], world)
        start = 0
        for r in range(world):
            out[r].append((start, rows[r]))
            start += rows[r]
    return out


def score_of(case: dict):
    return user_score if case["score"] == "callable" else case["score"]


# ----------------------------------------------------------------------------------------------
# The rank side
# ----------------------------------------------------------------------------------------------


def worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    torch.set_num_threads(1)
    import torch.distributed as dist

    from gallop_kernels import rules
    from gallop_kernels.ops.collective import ProcessGroupCollective, ShardLayout
    from gallop_kernels.ops.select import select
    from gallop_kernels.ops.select import streaming as ss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = {}
    try:
        collective = ProcessGroupCollective()
        # phase one's default reduction is the same adapter
        from gallop_kernels.phase_one import default_collective

        ones = torch.ones(3, dtype=torch.int64)
        default_collective().all_reduce_sum_(ones)
        gathered = collective.all_gather(torch.tensor([rank, 10 * rank]))
        results["_collectives"] = {"sum": ones.tolist(), "gather": gathered.tolist()}
        for case in cases(world):
            params, grads = build(case)
            mine = shards(case, world)[rank]
            local_p, local_g, offsets = [], [], []
            offset = 0
            for p, g, (row0, rows) in zip(params, grads, mine):
                per_row = p[0].numel()
                local_p.append(p[row0:row0 + rows].clone())
                local_g.append(g[row0:row0 + rows].clone())
                offsets.append(offset + row0 * per_row)
                offset += p.numel()
            layout = ShardLayout(collective, offset, tuple(offsets))
            names = [f"layer{t}.weight" for t in range(len(params))]
            if backend != "torch" and "chunk" in case:
                results[case["name"]] = {"skipped": "the torch backend's own read paths"}
                continue
            try:
                if "chunk" in case:
                    saved = ss.MAX_CANDIDATES
                    ss.MAX_CANDIDATES = case["max_candidates"]
                    try:
                        k = rules.k_for_density(offset, case["density"])
                        got = ss.select(local_p, local_g, k, score_of(case), 1e-8, 0,
                                        names, chunk=case["chunk"], layout=layout, keep_keys=0)
                    finally:
                        ss.MAX_CANDIDATES = saved
                else:
                    got = select(
                        local_p, local_g, rules.k_for_density(layout.total, case["density"]),
                        score=score_of(case), score_eps=1e-8, seed=0, names=names,
                        backend=backend, layout=layout)
                results[case["name"]] = {
                    "indices": [g.to(torch.int64).tolist() for g in got],
                    "dtypes": [str(g.dtype) for g in got],
                    "sorted": all(bool((g[1:] > g[:-1]).all()) for g in got),
                }
            except ValueError as err:
                results[case["name"]] = {"error": str(err)}
        dist.barrier()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The test side
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, backend: str, out: Path) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), backend, str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank did not finish within {TIMEOUT_S} s (hang in a collective?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _check(results: list[dict], world: int) -> None:
    from gallop_kernels.ops.select import naive as select_naive

    for res in results:
        assert res["_collectives"] == {"sum": [world] * 3,
                                       "gather": [[r, 10 * r] for r in range(world)]}
    for case in cases(world):
        params, grads = build(case)
        names = [f"layer{t}.weight" for t in range(len(params))]
        per_rank = [res[case["name"]] for res in results]
        if all("skipped" in r for r in per_rank):
            continue
        if "nan" in case:
            errors = [r.get("error") for r in per_rank]
            assert all(errors), f"{case['name']}: not every rank raised: {per_rank}"
            assert len(set(errors)) == 1, f"{case['name']}: ranks raised differently: {errors}"
            assert names[case["nan"][0]] in errors[0]
            with pytest.raises(ValueError, match=names[case["nan"][0]]):
                select_naive.select(params, grads, case["density"], score_of(case), 1e-8, 0, names)
            continue
        want = select_naive.select(params, grads, case["density"], score_of(case), 1e-8, 0, names)
        layout = shards(case, world)
        for t, (p, w) in enumerate(zip(params, want)):
            per_row = p[0].numel()
            union = []
            for r, res in enumerate(per_rank):
                assert "error" not in res, f"{case['name']} rank {r}: {res['error']}"
                assert res["sorted"], f"{case['name']} rank {r}: indices not sorted"
                row0, rows = layout[r][t]
                local = res["indices"][t]
                assert all(0 <= i < rows * per_row for i in local), (case["name"], r, t)
                union += [row0 * per_row + i for i in local]
            assert union == w.tolist(), f"{case['name']} tensor {t}: {union} != {w.tolist()}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_selection_equals_one_process(world, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    results = _spawn(world, backend, tmp_path)
    _check(results, world)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
