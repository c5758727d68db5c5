"""Where ``gallop demo``'s time goes: one run under cProfile, in CPU-seconds and wall seconds.

    python -m benchmarks.demo_profile --out benchmarks/results [--tag before] [-- demo options]

The profiler's clock is ``time.process_time`` (CPU-seconds of the whole process, all threads), so
the numbers mean the same on a shared machine as on an idle one; the wall time of each phase (the
demo's own ``seconds``) and the machine's load average are recorded beside them, never instead.
Writes ``demo-profile-<tag>.json`` (the demo's phases in wall and CPU seconds, the top functions
by cumulative and own CPU time, the load) and ``demo-profile-<tag>.txt`` (the demo's console
output and the pstats listing). ``demo-profile-*.md`` in ``benchmarks/results`` compares runs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import sys
import time
from pathlib import Path

from benchmarks.environment import device_info


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results")
    parser.add_argument("--tag", default="run", help="name part of the result files")
    parser.add_argument("--top", type=int, default=80, help="functions listed by cumulative and by own time")
    parser.add_argument("demo_args", nargs="*", help="options passed to `gallop demo` (after --)")
    args = parser.parse_args(argv)

    import torch

    from gallop_kernels.cli import main as gallop_main
    from gallop_kernels.demo import real

    results = []
    run_demo = real.run_demo
    real.run_demo = lambda *a, **k: results.append(run_demo(*a, **k)) or results[-1]  # keep the result

    load_before = os.getloadavg()
    console = io.StringIO()
    profiler = cProfile.Profile(timer=time.process_time)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(console):
        profiler.enable()
        status = gallop_main(["demo", *args.demo_args])
        profiler.disable()
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    load_after = os.getloadavg()
    sys.stdout.write(console.getvalue())

    listing = io.StringIO()
    stats = pstats.Stats(profiler, stream=listing)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)

    def rows(key: str) -> list[dict]:
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][3 if key == "cumulative" else 2], reverse=True)
        return [{"function": f"{Path(f).name}:{line}({name})", "calls": nc,
                 "own_cpu_s": round(tt, 2), "cumulative_cpu_s": round(ct, 2)}
                for (f, line, name), (cc, nc, tt, ct, _) in entries[:args.top]]

    record = {
        "command": "gallop demo " + " ".join(args.demo_args),
        "status": status,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": results[0].threads if results else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "device": device_info(torch.device("cpu")),
        "clock": "cProfile timer = time.process_time (CPU-seconds of all threads); wall from perf_counter",
        "phases_wall_s": {k: round(v, 1) for k, v in results[0].seconds.items()} if results else None,
        "phases_cpu_s": {k: round(v, 1) for k, v in getattr(results[0], "cpu_seconds", {}).items()} if results else None,
        "top_cumulative": rows("cumulative"),
        "top_own": rows("tottime"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"demo-profile-{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"demo-profile-{args.tag}.txt").write_text(console.getvalue() + "\n" + listing.getvalue())
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s, load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
          f"wrote {out}/demo-profile-{args.tag}.json/.txt", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
