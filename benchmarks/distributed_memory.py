"""Peak memory per rank of SparseAdamW under DDP and FSDP2, plain and lean, on CPU ranks (gloo).

    python -m benchmarks.distributed_memory                      # 2 ranks, ~50M-param MLP
    python -m benchmarks.distributed_memory --out benchmarks/results

Each mode runs in fresh processes (one per rank), so that every peak is its own: the same MLP
(fp32), the usual loop (``zero_grad``, forward, backward, ``step``; the first step selects),
density 1 %:

- ``ddp-plain``: ``DDP(model)``, plain SparseAdamW (DDP all-reduces dense gradients);
- ``ddp-lean-compact``: lean mode, which finds DDP by itself and exchanges the kept entries;
- ``ddp-lean-comm_hook``: lean mode attached with ``mode="comm_hook"``;
- ``fsdp2-plain`` / ``fsdp2-lean``: ``fully_shard`` per layer and on the root.

Per rank: the resident set (RSS) after a warm-up of the same mode on a tiny MLP (imports, code
paths, gloo buffers: the baseline), after
building the model, wrapper and optimizer, after each step, and its peak during training
(``VmHWM``, reset with ``/proc/self/clear_refs`` once everything is built), all minus the
baseline. The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns a freed
tensor's pages at once: RSS then follows the live tensors instead of the allocator's cache.

These are host-memory numbers of CPU ranks (gloo), where "host" and "device" are one memory: a
gradient moved to a host buffer costs the same RSS as one left in ``.grad``, and DDP's buckets
count only once touched (the kernel maps untouched pages lazily). The module docstring of the
results says what a GPU would show instead. Writes ``distributed-memory-cpu-gloo-<date>.json``
and ``.md`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.ddp_lean import build, run_ranks
from gallop_kernels.memory.measure import CpuProbe

MODES = ("ddp-plain", "ddp-lean-compact", "ddp-lean-comm_hook", "fsdp2-plain", "fsdp2-lean")
MB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in bytes. (The peak is
    ``VmHWM``, this process's own: ``ru_maxrss`` of a spawned rank also counts the pages of the
    parent it was forked from before its exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _setup(mode: str, model: nn.Module, density: float):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW

    lean = mode.endswith("lean") or "-lean-" in mode
    if mode.startswith("ddp"):
        runner = DDP(model)
    else:
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        runner = fully_shard(model)
    opt = SparseAdamW(model.parameters(), lr=1e-3, density=density, lean=lean, backend="torch")
    if mode == "ddp-lean-comm_hook":
        opt.attach_ddp(runner, mode="comm_hook")
    return runner, opt


def _train(runner, opt, steps: int, batch: int, width: int, gen: torch.Generator) -> list[int]:
    """The usual loop; the RSS after each step."""
    after = []
    for _ in range(steps):
        x = torch.randn(batch, width, generator=gen)
        y = torch.randn(batch, 8, generator=gen)
        opt.zero_grad()
        ((runner(x) - y) ** 2).mean().backward()
        opt.step()
        after.append(_status("VmRSS"))
    return after


def _rank(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    # A warm-up of the same mode on a tiny MLP first: every module, code path and gloo buffer
    # the mode uses is loaded before the baseline, so that what follows scales with the model.
    _train(*_setup(mode, build(16, 2), 0.5), 2, 4, 16, torch.Generator().manual_seed(99))
    gc.collect()
    baseline = _status("VmRSS")
    model = build(args.width, args.depth)
    params = sum(p.numel() for p in model.parameters())
    runner, opt = _setup(mode, model, args.density)
    built = _status("VmRSS") - baseline
    probe = CpuProbe()  # (gc, malloc_trim, then VmHWM := the RSS now)
    probe.reset()
    t0 = time.process_time()
    after_step = _train(runner, opt, args.steps, args.batch, args.width,
                        torch.Generator().manual_seed(rank))
    after_step = [rss - baseline for rss in after_step]
    peak = _status("VmHWM") - baseline
    report = {
        "rank": rank, "params": params, "selected_here": opt.num_selected,
        "built_mb": built / MB, "peak_mb": peak / MB, "after_step_mb": [b / MB for b in after_step],
        "peak_reset": probe.resettable, "cpu_s": time.process_time() - t0,
        "frozen_tensors": len(opt.frozen),
    }
    queue.put(report)
    dist.barrier()
    dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    queue = run_ranks(_rank, args.world, mode, args)
    return sorted((queue.get() for _ in range(args.world)), key=lambda r: r["rank"])


def render(report: dict) -> str:
    s = report["settings"]
    weights = report["params"] * 4 / MB
    lines = [
        f"# Peak memory per rank under DDP and FSDP2 (CPU, gloo, {s['world']} ranks)",
        "",
        f"MLP of {report['params']:,} fp32 params ({weights:,.0f} MB of weights; width "
        f"{s['width']}, depth {s['depth']}), density {s['density']}, batch {s['batch']} per rank, "
        f"{s['steps']} steps (the first selects), one thread per rank. {report['environment']}. "
        f"Host memory of CPU processes: RSS over the baseline after a warm-up of the same mode "
        f"on a tiny MLP, MALLOC_MMAP_THRESHOLD_=65536; peak = VmHWM reset once the model, "
        f"wrapper and optimizer are built.",
        "",
        "| mode | rank | built | peak in training | after step 1 | after the last step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, ranks in report["modes"].items():
        for r in ranks:
            lines.append(f"| {mode} | {r['rank']} | {r['built_mb']:,.0f} MB | "
                         f"{r['peak_mb']:,.0f} MB | {r['after_step_mb'][0]:,.0f} MB | "
                         f"{r['after_step_mb'][-1]:,.0f} MB |")
    lines += ["", "CPU/gloo only: no GPU number is claimed here (see benchmarks/README.md for "
              "what a GPU would show)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    load = os.getloadavg()
    results = {mode: run_mode(mode, args) for mode in modes}
    from benchmarks.environment import _cpu_name

    report = {
        "modes": results,
        "params": results[modes[0]][0]["params"],
        "environment": (f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                        f"{platform.platform()}, load average at start {load[0]:.1f} (a shared "
                        f"machine: memory, not time, is what is measured)"),
        "settings": vars(args) | {"out": str(args.out), "modes": modes},
    }
    text = render(report)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"distributed-memory-cpu-gloo-{_dt.date.today().isoformat()}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
