"""Device-aware timing: the one timer every benchmark and the report go through.

* CUDA: a pair of CUDA events around every call, read after one synchronisation at the end; warm-up
  calls first (compilation, autotuning, allocator growth happen there); the inputs rotate through
  enough copies that the working set of consecutive calls exceeds twice the L2 cache, so no call
  reads what the previous one left in L2. The statistic is the median.
* CPU: ``time.perf_counter`` around every call (the op is synchronous), the same warm-up, rotation
  (against the last-level cache) and median.

Inputs come from a ``make_inputs(i)`` factory that builds the i-th independent copy (random,
never zeros: ``benchmarks.cases`` fills them); the timed function takes one copy.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

DEFAULT_CPU_CACHE_BYTES = 32 * 2**20


@dataclass
class Measurement:
    """Timing of one case: median and spread in seconds, over ``reps`` timed calls."""

    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    reps: int
    warmup: int
    copies: int
    timer: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device, or the CPU's last-level cache (a 32 MiB guess if unreadable)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            best = max(best, int(digits) * mult)
    except (OSError, ValueError):
        pass
    return best or DEFAULT_CPU_CACHE_BYTES


def copies_needed(bytes_per_copy: int, device: torch.device, max_copies: int = 8) -> int:
    """Number of input copies to rotate so that consecutive calls' inputs exceed 2× the cache."""
    if bytes_per_copy <= 0:
        return 1
    need = math.ceil(2 * cache_bytes(device) / bytes_per_copy) + 1
    return max(1, min(max_copies, need))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[Any], Any],
    inputs: list[Any],
    device: torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 100,
    target_s: float = 0.5,
) -> Measurement:
    """Median time of ``fn(inputs[i % len(inputs)])``.

    The number of timed calls is chosen from the warm-up: about ``target_s`` seconds in total,
    between ``min_reps`` and ``max_reps``.
    """
    copies = len(inputs)
    # Warm-up: at least `warmup` calls, and at least one per input copy (first touch of each).
    n_warm = max(warmup, copies)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n_warm):
        fn(inputs[i % copies])
    _sync(device)
    per_call = max((time.perf_counter() - t0) / n_warm, 1e-7)
    reps = int(min(max_reps, max(min_reps, target_s / per_call)))

    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            x = inputs[i % copies]
            starts[i].record()
            fn(x)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        timer = "cuda-events"
    else:
        for i in range(reps):
            x = inputs[i % copies]
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
        timer = "perf_counter"
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Measurement(
        median_s=statistics.median(times),
        p20_s=q[0],
        p80_s=q[3],
        min_s=times[0],
        reps=reps,
        warmup=n_warm,
        copies=copies,
        timer=timer,
    )


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict[str, Any]:
    """Measured device-memory copy bandwidth (read + write bytes per second) of ``dst.copy_(src)``.

    Every achieved-bandwidth figure in the report is also given as a fraction of this number.
    """
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 256 << 20
    n = nbytes // 4
    src = [torch.rand(n, device=device) for _ in range(2)]
    dst = torch.empty(n, device=device)
    m = measure(lambda s: dst.copy_(s), src, device, warmup=3, min_reps=5, max_reps=50, target_s=0.5)
    return {
        "bytes_per_copy": 2 * n * 4,
        "median_s": m.median_s,
        "gbps": 2 * n * 4 / m.median_s / 1e9,
        "method": f"torch copy_ of {n * 4 / 2**20:.0f} MiB float32, read + write bytes, median of {m.reps}",
    }


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 1,
    reps: int = 7,
    target_s: float = 0.0,
    max_reps: int = 101,
) -> dict[str, Measurement]:
    """Median times of several functions timed in turn, one call of each per round.

    For ratios between implementations on a shared machine: a load spike hits every function of
    its round alike instead of one function's whole series. At least ``reps`` rounds, more (up
    to ``max_reps``) while the rounds take under ``target_s`` seconds in all.
    """
    t = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    per_round = (time.perf_counter() - t) / max(warmup, 1)
    reps = int(min(max_reps, max(reps, target_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = Measurement(
            median_s=statistics.median(ts), p20_s=q[0], p80_s=q[3], min_s=ts[0], reps=reps,
            warmup=warmup, copies=1,
            timer="perf_counter, interleaved" + (" (synchronised)" if device.type == "cuda" else ""),
        )
    return out
