"""The budgeted runner of the prepared GPU run (``benchmarks.gpu_check``).

A stage is a function ``(run, stage)`` that fills ``stage.detail``; ``Run.run_stage`` gives it
its own time budget (and the global one), records how it ended (ok, failed, timed out, cut
short, skipped) and never lets one stage's failure end the run. Subprocesses get the stage's
remaining time as their timeout and write their output to a log in the output folder whose first
line names the device.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    name: str
    budget_s: float
    status: str = "not run"  # ok | failed | timed out | cut short | skipped | not run
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Run:
    """What every stage needs: options, device, deadlines, the output folder and the log."""

    def __init__(self, *, dry: bool, out: Path, sizes: tuple[int, ...],
                 budgets: dict[str, float], global_budget: float) -> None:
        self.dry = dry
        self.out = out
        self.device = torch.device("cpu" if dry else "cuda")
        self.sizes = sizes
        self.budgets = dict(budgets)
        self.t0 = time.perf_counter()
        self.global_budget = global_budget
        self.stage_deadline = float("inf")
        self.device_name = "?"
        self.log_path = self.out / "gpu-check.log"
        self.native = None
        self.copy_gbps: float | None = None

    def log(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        """Seconds left in the current stage (its budget, and the global budget)."""
        now = time.perf_counter()
        return min(self.stage_deadline - now, self.t0 + self.global_budget - now)

    def run_stage(self, stage: Stage, fn: Callable[["Run", Stage], None]) -> Stage:
        left = self.t0 + self.global_budget - time.perf_counter()
        if left < 5:
            stage.status = "skipped"
            stage.detail["reason"] = "global time budget spent"
            return stage
        budget = min(stage.budget_s, left)
        self.stage_deadline = time.perf_counter() + budget
        self.log(f"stage {stage.name}: budget {budget:.0f} s")
        start = time.perf_counter()
        try:
            stage.status = "ok"
            fn(self, stage)
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not end the run
            stage.status = "failed"
            stage.detail["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            self.log(f"stage {stage.name} failed: {stage.detail['error']}")
        stage.seconds = round(time.perf_counter() - start, 1)
        self.log(f"stage {stage.name}: {stage.status} in {stage.seconds} s")
        return stage

    def subprocess(self, cmd: list[str], log_name: str, env: dict | None = None) -> dict[str, Any]:
        """Run ``cmd`` within the stage's remaining time; its output goes to ``DIR/log_name``."""
        timeout = max(1.0, self.remaining())
        path = self.out / log_name
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"# device: {self.device_name}\n# $ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout)
                rc, timed_out = proc.returncode, False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
                f.write(f"\n# timed out after {timeout:.0f} s\n")
        text = path.read_text(encoding="utf-8", errors="replace")
        return {"cmd": " ".join(cmd), "returncode": rc, "timed_out": timed_out, "log": log_name,
                "tail": text[-1500:]}
