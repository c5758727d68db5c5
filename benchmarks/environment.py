"""Where a benchmark ran: device and software description, and the file-name slug.

Every results file names its device (GPU name, driver, CUDA; or CPU model, cores, threads, load)
and the software versions, so a number is never separated from the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = None
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        return {
            "kind": "cuda",
            "name": props.name,
            "driver": driver,
            "cuda_runtime": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
        }
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    return {
        "kind": "cpu",
        "name": _cpu_name(),
        "driver": None,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "platform": platform.platform(),
    }


def software_info(env) -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: no version
            return None

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "gallop_kernels": version("gallop_kernels"),
        "git_commit": commit,
        "native_baselines": env.native_status,
        "native_topk_method": getattr(env.native, "topk_method", None),
        "bitsandbytes_status": env.bnb_status,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def device_slug(info: dict[str, Any]) -> str:
    name = info["name"] if info["kind"] == "cuda" else f"cpu-{info['name']}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(r|tm|cpu-@.*|with-radeon.*)$", "", slug)
    return slug[:60]
