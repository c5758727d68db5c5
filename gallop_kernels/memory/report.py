"""``gallop memory``: predicted peak memory of one training step per method, checked by measurement.

    gallop memory --config llama3-8b                 # predictions (GPU step, seq 2048, batch 1)
    gallop memory --config llama3-8b --measure       # + measure every method (CPU: on llama-0.3b)
    gallop memory --config llama-tiny --measure      # measure what --config says
    gallop memory --config llama3-70b --gpus 2,4,8   # + per-GPU peaks under FSDP2 (predicted)
    python -m gallop_kernels.memory --config path/to/config.json --json

Predictions come from `gallop_kernels.memory.model`. ``--measure`` runs one real step of every
method in its own subprocess (`gallop_kernels.memory.measure`, its progress shown as it goes) on
the measurement config: ``--measure-config``, else ``--config``; only when ``--config`` is not
given and the step runs on a CPU is the default 8B shape replaced by ``llama-0.3b`` at a short
sequence (said on the console). It prints the prediction for *that* config and setup next to the
measurement. ``--from-json`` shows measurements saved earlier (``--save`` writes them). Sizes are
decimal: 1 GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from gallop_kernels.argtypes import fraction, positive_int, positive_ints
from gallop_kernels.extras import require
from gallop_kernels.memory import model as mm
from gallop_kernels.memory.methods import REGISTRY
from gallop_kernels.memory.presets import PRESETS, ConfigError, config_name, load_config

DEFAULT_CONFIG = "llama3-8b"
CPU_STAND_IN = "llama-0.3b"  # measured on a CPU when --config is not given (the 8B shape does not fit)
GPU_80GB = 80 * 2**30  # the memory of an "80GB" H100/A100: 85.9 GB (80 GiB)

# Targets of the memory issue for the 8B shape at ρ = 1% (GPU; bytes are decimal GB).
TARGETS_8B = {
    "sparse-lean": ("<=", 22e9),
    "sparse-4bit-delta": ("<=", 12e9),
    "adamw": ("does not fit", GPU_80GB),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"preset ({', '.join(PRESETS)}) or a config.json file/directory "
                        f"(default: {DEFAULT_CONFIG})")
    p.add_argument("--seq", type=positive_int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="bf16", choices=sorted(mm.DTYPE_BYTES),
                   help="parameter/compute dtype (default bf16)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="device the predicted step runs on; it picks the optimizers' kernels "
                        "(default cuda)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--density", type=fraction, default=0.01, help="ρ of the sparse methods, in (0, 1] (default 0.01)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(REGISTRY))
    p.add_argument("--measure", action="store_true",
                   help="also measure one real step of every method (one subprocess each)")
    p.add_argument("--measure-config", default=None,
                   help=f"config to measure (default: --config; on a CPU without --config: {CPU_STAND_IN})")
    p.add_argument("--measure-seq", type=positive_int, default=None,
                   help="sequence length of the measurement (default: 256 on CPU, --seq on CUDA)")
    p.add_argument("--measure-device", default=None, choices=["cuda", "cpu"],
                   help="where to measure (default: cuda if available, else cpu)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="show measurements saved earlier by --save instead of measuring")
    p.add_argument("--save", default=None, metavar="PREFIX",
                   help="write the measured comparison to PREFIX.json and PREFIX.md")
    p.add_argument("--timeout", type=positive_int, default=3600, help="seconds per measurement (default 3600)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--gpus", type=positive_ints, default=None, metavar="G[,G...]",
                   help="also predict the per-GPU peak under FSDP2 on these GPU counts "
                        "(e.g. 2,4,8); predictions only")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``memory`` subcommand to an argparse subparsers object (``gallop memory``)."""
    p = subparsers.add_parser(
        "memory", help="predicted (and measured) peak memory of one training step per method",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run, handler=_handler, subparser=p)
    return p


def _handler(args: argparse.Namespace, _parser: Any = None) -> int:
    """``run`` under the ``handler(args, subparser)`` convention of `gallop_kernels.cli`."""
    return run(args)


# ----------------------------------------------------------------------------------------------


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e9:.2f}"


def _methods(arg: str | None) -> list[str]:
    keys = list(REGISTRY)
    if not arg:
        return keys
    chosen = [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in chosen if m not in REGISTRY]
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(bad)}; expected: {', '.join(keys)}")
    return chosen


def run_measurement(config: str, method: str, *, seq: int, batch: int, dtype: str, attn: str,
                    device: str, density: float, timeout: int, log: Callable[[str], None] | None = None,
                    ) -> dict[str, Any]:
    """One measurement subprocess; its JSON, or ``{"available": False, "reason": ...}``. Its
    progress lines go to ``log`` as they come (a CPU step of llama-0.3b takes minutes)."""
    from gallop_kernels.memory.measure import MALLOC_ENV, PROGRESS

    cmd = [sys.executable, "-m", "gallop_kernels.memory.measure", "--config", config,
           "--method", method, "--seq", str(seq), "--batch", str(batch), "--dtype", dtype,
           "--attn", attn, "--device", device, "--density", str(density)]
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    other: list[str] = []

    def follow() -> None:  # stderr: progress to the console, the rest kept for a failure's reason
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                if log is not None:
                    log(line[len(PROGRESS):].rstrip())
            else:
                other.append(line)

    captured: list[str] = []
    readers = [threading.Thread(target=follow, daemon=True),
               threading.Thread(target=lambda: captured.append(proc.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"method": method, "available": False, "reason": f"timed out after {timeout} s"}
    finally:
        for reader in readers:
            reader.join(timeout=10)
    stdout = "".join(captured)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = ("".join(other) or stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "available": False,
                "reason": f"measurement failed (exit {proc.returncode}): {tail[0][:300]}"}
    return json.loads(lines[-1])


def compare(config_arg: str, setup: mm.Setup, measurements: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Rows of prediction vs measurement for the measured config and setup."""
    config = load_config(config_arg)
    rows = []
    for meas in measurements:
        method = meas["method"]
        pred = mm.predict(config, method, setup)
        row: dict[str, Any] = dict(method=method, label=pred.label, predicted=pred.peak,
                                   predicted_phases=pred.phases)
        if meas.get("available"):
            row.update(measured=meas["peak"], measured_phases=meas["phases"],
                       error_pct=100.0 * (pred.peak - meas["peak"]) / meas["peak"],
                       phase_error_pct={k: 100.0 * (pred.phases[k] - v) / v
                                        for k, v in meas["phases"].items()})
        else:
            row.update(measured=None, error_pct=None,
                       reason=f"not yet available: {meas.get('reason', 'not measured')}")
        rows.append(row)
    return rows


def _setup(args, *, seq: int, device: str) -> mm.Setup:
    return mm.Setup(batch=args.batch, seq=seq, dtype=args.dtype, device=device, attn=args.attn,
                    density=args.density)


def prediction_table(name: str, config: Any, setup: mm.Setup, methods: list[str],
                     measured: dict[str, Any] | None = None) -> str:
    """The predictions; the last column says where each method's measurement is: its number when
    ``measured`` (a `measure_all` result) is of this config and setup, else the table below it."""
    n = mm.count_params(config)
    same = measured is not None and measured["config"] == name and mm.Setup(**measured["setup"]) == setup
    found = {m["method"]: m for m in measured["measurements"]} if measured is not None else {}
    lines = [
        f"Predicted peak of one training step: {name} ({n / 1e9:.2f} B parameters), "
        f"{setup.device}, {setup.dtype}, batch {setup.batch}, seq {setup.seq}, gradient "
        f"checkpointing, {setup.attn} attention, ρ = {setup.density:g}",
        "",
        "| method | predicted GB | peak phase | weights GB | optimizer state GB | measured |",
        "|---|---:|---|---:|---:|---|",
    ]
    for key in methods:
        p = mm.predict(config, key, setup)
        if REGISTRY[key].reference:
            where = "prediction only (reference)"
        elif key not in found:
            where = "see --measure"
        elif not found[key].get("available"):
            where = "not measured (see below)"
        elif same:
            where = f"{_gb(found[key]['peak'])} GB"
        else:
            m = measured["setup"]
            where = f"below: {measured['config']}, {m['device']}, seq {m['seq']}"
        lines.append(f"| {p.label} | {_gb(p.peak)} | {p.peak_phase} | "
                     f"{_gb(p.persistent['weights'])} | {_gb(p.persistent['optimizer_state'])} | "
                     f"{where} |")
    return "\n".join(lines)


def targets_lines(config: Any, setup: mm.Setup) -> list[str]:
    """The memory issue's 8B targets against the predictions, in GB. An "80GB" GPU (H100, A100)
    holds 80 GiB = 85.9 GB (79.1 GiB usable by torch on an H100): the fit is checked against that."""
    out = ["", f"Targets for an 8B model on one H100 80GB ({GPU_80GB / 1e9:.1f} GB), ρ = 1% — predictions, "
           "not yet measured on a GPU:"]
    for key, (op, bound) in TARGETS_8B.items():
        p = mm.predict(config, key, setup)
        if op == "<=":
            verdict = "met" if p.peak <= bound else "NOT met"
            out.append(f"  {REGISTRY[key].label}: {_gb(p.peak)} GB, target <= {bound / 1e9:.0f} GB: {verdict}")
    for key, extra in (("adamw", {}), ("adamw", {"adamw_fused": True}), ("adamw-mixed", {})):
        p = mm.predict(config, key, mm.Setup(**{**setup.__dict__, **extra}))
        fits = p.peak <= GPU_80GB
        name = REGISTRY[key].label + (" (fused=True)" if extra else "")
        out.append(f"  {name}: {_gb(p.peak)} GB: {'fits' if fits else 'does not fit'} in "
                   f"{GPU_80GB / 1e9:.1f} GB" + (" (before the CUDA context and fragmentation)" if fits else ""))
    return out


def comparison_table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| method | predicted GB | measured GB | error % | forward pred/meas GB | "
             "backward pred/meas GB | step pred/meas GB |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        if r["measured"] is None:
            lines.append(f"| {r['label']} | {_gb(r['predicted'])} | {r['reason']} | — | — | — | — |")
            continue
        ph = [f"{_gb(r['predicted_phases'][k])} / {_gb(r['measured_phases'][k])}"
              for k in ("forward", "backward", "step")]
        lines.append(f"| {r['label']} | {_gb(r['predicted'])} | {_gb(r['measured'])} | "
                     f"{r['error_pct']:+.1f} | {' | '.join(ph)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.measure:
        require("gallop memory --measure", "transformers")
    try:
        config = load_config(args.config or DEFAULT_CONFIG)
        methods = _methods(args.methods)
        setup = _setup(args, seq=args.seq, device=args.device)
    except (ConfigError, ValueError) as e:
        print(f"gallop memory: error: {e}", file=sys.stderr)
        return 2
    name = config_name(args.config or DEFAULT_CONFIG)
    measured = None
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            measured = json.load(f)
    elif args.measure:
        try:
            measured = measure_all(args, [m for m in methods if not REGISTRY[m].reference])
        except (ConfigError, ValueError) as e:
            print(f"gallop memory: error: {e}", file=sys.stderr)
            return 2
    out: dict[str, Any] = dict(
        config=name, params=mm.count_params(config), setup=setup.__dict__,
        predictions=[mm.predict(config, k, setup).as_dict() for k in methods],
    )
    text = [prediction_table(name, config, setup, methods, measured)]
    if args.gpus:
        from gallop_kernels.memory import sharded

        gpus = list(args.gpus)
        text += ["", sharded.fsdp2_table(name, config, setup, gpus)]
        out["fsdp2"] = {g: [sharded.predict_fsdp2(config, k, setup, g).as_dict()
                            for k in sharded.FSDP2_METHODS] for g in gpus}
    if name == "llama3-8b" and setup.seq == 2048 and setup.batch == 1 and setup.device == "cuda":
        text += targets_lines(config, setup)

    if measured is not None:
        mset = mm.Setup(**measured["setup"])
        rows = compare(measured["config"], mset, measured["measurements"])
        measured["rows"] = rows
        out["measured"] = measured
        text += ["", comparison_table(rows, measurement_header(measured))]
        if args.save:
            save(args.save, measured, comparison_table(rows, measurement_header(measured)))
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    else:
        print("\n".join(text))
    return 0


def measurement_header(measured: dict[str, Any]) -> str:
    s = measured["setup"]
    return (f"Measured vs predicted, one steady-state step: {measured['config']} "
            f"({measured['params'] / 1e9:.2f} B parameters, random weights), {s['device']}, "
            f"{s['dtype']}, batch {s['batch']}, seq {s['seq']}, {s['attn']}, ρ = {s['density']:g}. "
            "Measured = peak minus the process's memory before the model was built "
            "(CPU: ru_maxrss; CUDA: max_memory_allocated).")


def measure_all(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """Measure every method on the measurement config (module docstring), showing progress."""
    import torch

    device = args.measure_device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = args.measure_config or args.config
    if cfg is None:
        cfg = DEFAULT_CONFIG if device == "cuda" else CPU_STAND_IN
        if cfg != DEFAULT_CONFIG:
            print(f"measuring {cfg}, a CPU-sized stand-in for {DEFAULT_CONFIG} (pass --config or "
                  "--measure-config to measure another)", file=sys.stderr, flush=True)
    seq = args.measure_seq or (args.seq if device == "cuda" else 256)
    setup = _setup(args, seq=seq, device=device)
    config = load_config(cfg)
    if device == "cpu":
        _check_fits_in_memory(cfg, config, setup, methods)
    results = []
    for i, method in enumerate(methods, 1):
        print(f"measuring {method} on {cfg} ({device}, seq {seq}), method {i} of {len(methods)} ...",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = run_measurement(cfg, method, seq=seq, batch=args.batch, dtype=args.dtype,
                                 attn=args.attn, device=device, density=args.density,
                                 timeout=args.timeout,
                                 log=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
        done = (f"peak {_gb(result['peak'])} GB" if result.get("available") else
                f"not measured: {result.get('reason')}")
        print(f"  {method}: {done} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        results.append(result)
    return dict(config=config_name(cfg), params=mm.count_params(config), setup=setup.__dict__,
                date=_dt.date.today().isoformat(), measurements=results)


def _available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, None where there is none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _check_fits_in_memory(name: str, config: Any, setup: mm.Setup, methods: list[str]) -> None:
    """Refuse, before minutes of work, a CPU measurement whose predicted peak exceeds the memory
    this machine has available (``MemAvailable``): it could only swap or be killed."""
    available = _available_bytes()
    if available is None:
        return  # not Linux: nothing to compare with
    largest = max(mm.predict(config, m, setup).peak for m in methods)
    if largest > available:
        raise ValueError(f"measuring {name} on this CPU needs about {_gb(largest)} GB for one step, more than "
                         f"the {_gb(available)} GB available; measure a smaller config (--measure-config "
                         f"{CPU_STAND_IN}) or on a GPU")


def save(prefix: str, measured: dict[str, Any], table: str) -> None:
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(measured, f, indent=1, default=str)
        f.write("\n")
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gallop memory", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
