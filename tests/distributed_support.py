"""Run a test module's cases on real gloo ranks (separate processes on 127.0.0.1), once per world.

A test module that uses this defines ``CASES`` (name -> function of a `Ranks` context, run on
every rank) and ends with ``if __name__ == "__main__": worker_main(CASES)``. `spawn` starts
the ranks as ``python <module> RANK WORLD PORT OUT [CASE ...]``, each rank runs every case in
order, catching what a case raises (so one failing case reports and the next still runs), and
writes ``rank<r>.json``: ``{case: "ok" | "skip: why" | "error: message"}``. Every rank sets
``TRITON_INTERPRET=1`` before anything imports triton, uses one thread, sets a collective
timeout (a hang becomes an error, not a stuck CI), and calls ``barrier()`` before
``destroy_process_group()``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
COLLECTIVE_TIMEOUT_S = 60


class Skip(Exception):
    """Raised by a case that cannot run here (reported as ``skip: why``)."""


class Ranks:
    """What a case gets: the world, and a scratch folder shared by all ranks (and the test)."""

    def __init__(self, rank: int, world: int, out: Path) -> None:
        self.rank, self.world, self.out = rank, world, out

    def all_same(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        import torch.distributed as dist

        got = [None] * self.world
        dist.all_gather_object(got, value)
        return got


def worker_main(cases: dict[str, Callable[[Ranks], Any]]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    names = sys.argv[5:] or list(cases)
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    ctx = Ranks(rank, world, out)
    results: dict[str, str] = {}
    timings: dict[str, float] = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                cases[name](ctx)
                results[name] = "ok"
            except Skip as why:
                results[name] = f"skip: {why}"
            except Exception:  # noqa: BLE001 - reported to the test, which fails on it
                results[name] = "error: " + traceback.format_exc(limit=6)[-3000:]
            timings[name] = round(time.perf_counter() - t0, 2)
            dist.barrier()
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps({"results": results, "seconds": timings}))
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(module: str, world: int, out: Path, cases: list[str] | None = None,
          timeout_s: float = 300, env: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Run ``module``'s cases on ``world`` ranks; every rank's results (raises on a crash/hang).
    ``env``: more environment variables for the ranks."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **(env or {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, module, str(r), str(world), str(port), str(out),
                          *(cases or [])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs, deadline = [], time.monotonic() + timeout_s
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"{world} ranks did not finish within {timeout_s} s (a hang?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0 or not (out / f"rank{r}.json").exists():
            raise AssertionError(f"rank {r} exited with {p.returncode}:\n{log[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def check_case(per_rank: list[dict], name: str) -> None:
    """Fail (or skip) the calling test as the ranks reported ``name``."""
    import pytest

    got = [r["results"].get(name, "error: not run") for r in per_rank]
    errors = [f"rank {i}: {g}" for i, g in enumerate(got) if g.startswith("error")]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    if all(g.startswith("skip") for g in got):
        pytest.skip(got[0][len("skip: "):])
