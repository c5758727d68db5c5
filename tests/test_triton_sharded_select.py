"""Sharded Triton selection over real gloo ranks equals the one-process selection.

Each rank (a subprocess: tests/sharded_select_worker.py, TRITON_INTERPRET=1 set before triton is
imported) holds an uneven shard of every tensor of a group, some shards and whole ranks empty,
and selects with a ``ShardLayout``: histograms are all-reduced before every bucket choice, the
tie quota comes from all-gathered (offset, tie count) pairs, k and the random score's hash use
the whole group. The union of the ranks' local indices, moved to global flat indices, must be
exactly the reference selection of the concatenated full tensors, for every score, k = 1 and
k = N, all scores tied; a NaN on one rank makes every rank raise naming the parameter.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from gallop_kernels import reference as R  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import sharded_select_worker as W  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(case) -> torch.Tensor:
    """Global flat indices the one-process reference selects from the full tensors."""
    if case["score"] == "precomputed":
        scores = [s + 0.0 for s in case["precomputed"]]
    else:
        scores, off = [], 0
        for p, g in zip(case["params"], case["grads"]):
            scores.append(R.compute_score(p, g, case["score"], 1e-8, 7, off))
            off += p.numel()
    chosen = R.select_topk(scores, case["k"])
    offsets = [sum(p.numel() for p in case["params"][:i]) for i in range(len(scores))]
    return torch.cat([c + o for c, o in zip(chosen, offsets)])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_selection_equals_one_process(world, tmp_path):
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sharded_select_worker.py"),
                               str(r), str(world), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in W.cases(world):
        name = case["name"]
        if "error" in case:
            for r in range(world):  # every rank raised, naming the parameter (none hung)
                assert isinstance(results[r][name], str), (name, r)
                assert case["error"] in results[r][name], results[r][name]
            continue
        got = []
        for r in range(world):
            local = results[r][name]
            assert not isinstance(local, str), (name, r, local)
            _, _, _, offsets, _ = W.shard(case, r, world)
            for idx, off, p in zip(local, offsets, case["params"]):
                assert bool((idx[1:] > idx[:-1]).all()), (name, r)  # sorted local indices
                got.append(idx + off)
        got = torch.sort(torch.cat(got)).values
        want = _expected(case)
        assert torch.equal(got, want), f"{name}: {got.tolist()} != {want.tolist()}"
