"""Lean mode under DDP: which gradient exchange is cheaper, measured on CPU ranks with gloo.

    python -m benchmarks.ddp_lean                       # 2 ranks, ~4.2M params, density 1%
    python -m benchmarks.ddp_lean --out benchmarks/results

Three ways to train the same MLP (DDP built first, as usual) with SparseAdamW at one density:

- ``dense``: plain SparseAdamW; DDP all-reduces every gradient (bucketed, overlapped);
- ``compact``: lean mode; DDP's synchronisation off, one all-reduce of the kept entries before
  the step; tensors with no selected entry frozen (`optim/ddp.py`, the default);
- ``comm_hook``: lean mode with a DDP communication hook that reduces the kept entries of each
  bucket (overlapped with the backward; nothing frozen).

Per mode: the bytes all-reduced per step (counted by the exchange; DDP's own: every gradient)
and the wall time per training step (median of interleaved rounds after warm-up). The modes'
weights are checked equal first (they are the same computation). These are CPU/gloo numbers on
this machine; NCCL on GPUs overlaps and scales differently and is not measured here.

Writes ``ddp-lean-<device>-<date>.json`` and ``.md`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

MODES = ("dense", "compact", "comm_hook")


def build(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 8))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    runs = {}
    for mode in MODES:
        model = build(args.width, args.depth)
        ddp = DDP(model, bucket_cap_mb=25)
        opt = SparseAdamW(model.parameters(), lr=1e-3, density=args.density,
                          lean=mode != "dense", backend="torch")
        if mode == "comm_hook":
            opt.attach_ddp(ddp, mode="comm_hook")
        runs[mode] = (model, ddp, opt)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, args.width, generator=gen),
                torch.randn(args.batch, 8, generator=gen)) for _ in range(args.steps + 2)]

    def step(mode: str, i: int) -> float:
        model, ddp, opt = runs[mode]
        x, y = batches[i]
        dist.barrier()
        t0 = time.perf_counter()
        ((ddp(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        dist.barrier()
        return time.perf_counter() - t0

    times = {m: [] for m in MODES}
    for i in range(2):  # selection step and one warm-up step
        for mode in MODES:
            step(mode, i)
    before = {m: (runs[m][2]._ddp.bytes_reduced if runs[m][2]._ddp else 0) for m in MODES}
    for i in range(2, args.steps + 2):
        for mode in MODES:  # interleaved: the machine's load hits every mode alike
            times[mode].append(step(mode, i))
    dense_bytes = sum(p.numel() * p.element_size() for p in runs["dense"][0].parameters())
    report = {}
    for mode in MODES:
        model, ddp, opt = runs[mode]
        if mode == "dense":
            per_step = dense_bytes
        else:
            per_step = (opt._ddp.bytes_reduced - before[mode]) / args.steps
        report[mode] = {
            "bytes_per_step": per_step,
            "median_step_s": statistics.median(times[mode]),
            "frozen_tensors": len(opt.frozen),
        }
    ref = torch.cat([p.detach().flatten() for p in runs["dense"][0].parameters()])
    for mode in ("compact", "comm_hook"):
        got = torch.cat([p.detach().flatten() for p in runs[mode][0].parameters()])
        report[mode]["max_weight_difference_vs_dense"] = float((got - ref).abs().max())
    report["params"] = sum(p.numel() for p in runs["dense"][0].parameters())
    report["selected"] = runs["compact"][2].num_selected
    if rank == 0:
        queue.put(report)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(target, world: int, *args):
    """Run ``target(rank, world, port, *args, queue)`` on ``world`` spawned processes (gloo on a
    free local port); returns the queue they put their reports into, once all have finished."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(target, args=(world, port, *args, queue), nprocs=world, start_method="spawn")
    return queue


def render(report: dict, args: argparse.Namespace) -> str:
    lines = [
        f"# Lean mode under DDP: gradient exchange (CPU, gloo, {args.world} ranks)",
        "",
        f"MLP of {report['params']:,} params (width {args.width}, depth {args.depth}), density "
        f"{args.density} ({report['selected']:,} selected), batch {args.batch} per rank, "
        f"{args.steps} timed steps per mode (interleaved), one thread per rank. "
        f"{report['environment']}.",
        "",
        "| mode | bytes all-reduced per step | median step | frozen tensors | max weight diff vs dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = report[mode]
        diff = r.get("max_weight_difference_vs_dense")
        lines.append(f"| {mode} | {r['bytes_per_step']:,.0f} | {r['median_step_s'] * 1e3:.1f} ms | "
                     f"{r['frozen_tensors']} | {'-' if diff is None else f'{diff:.1e}'} |")
    lines += ["", "CPU/gloo only: no GPU or NCCL number is claimed here."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run_ranks(_rank, args.world, args).get()
    import platform

    report["environment"] = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                             f"{os.cpu_count()} cores")
    report["settings"] = vars(args) | {"out": str(args.out)}
    text = render(report, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"ddp-lean-cpu-gloo-{_dt.date.today().isoformat()}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
