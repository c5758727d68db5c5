"""The runner of the prepared GPU run (``benchmarks.gpu_check``): each stage in its own process.

A stage is a function ``(run, stage)`` in ``benchmarks.gpu_stages`` that fills ``stage.detail``.
`run_stage_process` starts it as ``python -m benchmarks.gpu_stages SPEC RESULT`` in a new process
group and gives it a hard timeout: when the stage outlives its budget its whole process group
(its pytest, cmake or measurement children too) is terminated, then killed, and the stage is
recorded as timed out with whatever it had saved so far. A stage that crashes, hangs or is killed
loses only itself; the next stage starts in a fresh process (and a fresh CUDA context).

Inside the stage's process, `Run` holds the options, the device, the stage's own (soft) deadline,
the output folder and what earlier stages found (``context``: the device name, the measured copy
bandwidth, the native library). ``Run.subprocess`` runs a command within the stage's remaining
time and logs its output to a file whose first line names the device; ``Run.save`` writes the
stage's partial detail, so a stage killed at its hard timeout keeps the rows it finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
HARD_GRACE_S = 8.0  # a stage's process is killed this long after its budget (its soft deadline)
KILL_GRACE_S = 5.0  # SIGTERM first, then SIGKILL after this long


@dataclass
class Stage:
    name: str
    budget_s: float
    status: str = "not run"  # ok | failed | timed out | cut short | skipped | not run
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Run:
    """What a stage needs, in the stage's own process."""

    def __init__(self, *, dry: bool, out: Path, sizes: tuple[int, ...], budget_s: float,
                 context: dict[str, Any], stage: Stage | None = None,
                 result_path: Path | None = None) -> None:
        self.dry = dry
        self.out = out
        self.device = torch.device("cpu" if dry else "cuda")
        self.sizes = tuple(sizes)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.context = dict(context)
        self.device_name = self.context.get("device_name", "?")
        self.copy_gbps: float | None = self.context.get("copy_gbps")
        self.log_path = self.out / "gpu-check.log"
        self.stage = stage
        self.result_path = result_path
        self.native = None  # the native baselines, once a stage has loaded them

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        """Seconds left in the stage's budget."""
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        """Write the stage's detail so far (kept if the stage is killed at its hard timeout)."""
        if self.stage is not None and self.result_path is not None:
            _write_json(self.result_path, {"stage": asdict(self.stage), "context": self.context,
                                           "partial": True})

    def subprocess(self, cmd: list[str], log_name: str, env: dict | None = None) -> dict[str, Any]:
        """Run ``cmd`` within the stage's remaining time; its output goes to ``DIR/log_name``."""
        timeout = max(1.0, self.remaining())
        path = self.out / log_name
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"# device: {self.device_name}\n# $ {' '.join(cmd)}\n")
            f.flush()
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout)
                rc, timed_out = proc.returncode, False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
                f.write(f"\n# timed out after {timeout:.0f} s\n")
        text = path.read_text(encoding="utf-8", errors="replace")
        return {"cmd": " ".join(cmd), "returncode": rc, "timed_out": timed_out, "log": log_name,
                "seconds": round(time.perf_counter() - t, 1), "tail": text[-1500:]}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_stage_process(name: str, budget_s: float, *, dry: bool, out: Path,
                      sizes: tuple[int, ...], context: dict[str, Any]) -> tuple[Stage, dict]:
    """Run stage ``name`` in its own process group with a hard timeout of ``budget_s`` (plus a
    short grace). Returns the stage as it ended and the context updated by it."""
    stage = Stage(name, round(budget_s, 1))
    (out / ".stages").mkdir(exist_ok=True)
    spec_path = out / ".stages" / f"{name}.spec.json"
    result_path = out / ".stages" / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    _write_json(spec_path, {"name": name, "dry": dry, "out": str(out), "sizes": list(sizes),
                            "budget_s": budget_s, "context": context,
                            "result": str(result_path)})
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if dry:  # the Triton kernels run in the interpreter (set before triton is imported)
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    log = out / f"stage-{name}.log"
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"# device: {context.get('device_name', '?')}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_stages", str(spec_path)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed = False
        try:
            proc.wait(timeout=budget_s + HARD_GRACE_S)
        except subprocess.TimeoutExpired:
            killed = True
            _kill_group(proc)
            f.write(f"\n# killed: over its budget of {budget_s:.0f} s (hard timeout)\n")
    stage.seconds = round(time.perf_counter() - start, 1)
    result = _read_json(result_path)
    if result is not None:
        done = result["stage"]
        stage.status, stage.detail = done["status"], done["detail"]
        context = {**context, **result.get("context", {})}
    if killed:
        stage.status = "timed out"
        stage.detail["error"] = (f"killed at its hard timeout ({budget_s:.0f} s budget); the rows "
                                 "it finished are kept" if result else
                                 f"killed at its hard timeout ({budget_s:.0f} s budget)")
    elif result is None or result.get("partial"):
        stage.status = "failed"
        stage.detail["error"] = (f"the stage's process exited with {proc.returncode} before "
                                 f"finishing (see {log.name}): "
                                 + log.read_text(errors="replace")[-600:])
    return stage, context


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                try:  # the group's other members may still be alive: make sure
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_main(spec_path: str, stages: dict) -> int:
    """The stage process: run one stage, write its result (and the context it adds)."""
    spec = json.loads(Path(spec_path).read_text())
    stage = Stage(spec["name"], spec["budget_s"])
    run = Run(dry=spec["dry"], out=Path(spec["out"]), sizes=tuple(spec["sizes"]),
              budget_s=spec["budget_s"], context=spec["context"], stage=stage,
              result_path=Path(spec["result"]))
    if spec["dry"]:
        torch.set_num_threads(1)
    run.log(f"stage {stage.name}: budget {spec['budget_s']:.0f} s (pid {os.getpid()})")
    start = time.perf_counter()
    try:
        stage.status = "ok"
        stages[stage.name](run, stage)
    except Exception as exc:  # noqa: BLE001 - recorded; the next stage runs in a fresh process
        stage.status = "failed"
        stage.detail["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        run.log(f"stage {stage.name} failed: {stage.detail['error']}")
    stage.seconds = round(time.perf_counter() - start, 1)
    _write_json(Path(spec["result"]), {"stage": asdict(stage), "context": run.context,
                                       "partial": False})
    run.log(f"stage {stage.name}: {stage.status} in {stage.seconds} s")
    return 0
