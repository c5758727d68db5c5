"""The torch backend's sparse step against dense AdamW, one thread, in one run on the same params.

    python -m benchmarks.torch_step --out benchmarks/results        # fp32 and bf16, ρ = 1 %

A group shaped like 10 SmolLM2 decoder layers' projections (70 tensors, 35.4M entries) with
dense gradients. Timed in interleaved rounds (one call of each per round; `benchmarks.timing`),
median, on the CPU with ``torch.set_num_threads(1)``:

* ``AdamW(fused=True)`` and ``AdamW(foreach=True)`` over every entry (the baselines);
* ``SparseAdamW(backend="torch").step()`` (ours: `ops/adamw/foreach.py`, after selection) with
  dense gradients, and in lean mode (the gradients already gathered into the compact buffers, as
  backward's hooks leave them: the row includes copying k values into those buffers);
* the same step's ops alone (``ops.adamw.sparse_adamw``, no optimizer checks);
* the previous torch backend, `naive.sparse_adamw_step` tensor by tensor;
* the gather/scatter floor: only ``index_select`` of each gradient and ``index_put_`` into each
  param at the selected indices, the memory work any sparse step with dense gradients does. At
  ρ = 1 % nearly every selected entry sits in its own 64-byte line, so that work is about
  k × 3 cache lines and, on a CPU, latency-bound: it sets the floor, not the k × 20 bytes of
  state.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.environment import device_info, device_slug
from benchmarks.timing import measure_interleaved

DENSITY = 0.01
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def group(dtype: torch.dtype, layers: int, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in LAYER * layers:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def _copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def run(dtype: torch.dtype, layers: int, reps: int) -> dict[str, Any]:
    from gallop_kernels import SparseAdamW
    from gallop_kernels.ops.adamw import AdamWHyper, sparse_adamw
    from gallop_kernels.ops.adamw import naive

    params = group(dtype, layers)
    n = sum(p.numel() for p in params)
    ours = SparseAdamW(params, lr=1e-4, density=DENSITY, backend="torch")
    ours.step()  # selects
    lean_params = _copy(params)
    lean = SparseAdamW(lean_params, lr=1e-4, density=DENSITY, backend="torch", lean=True)
    lean.step()
    lean.zero_grad()
    kept = [p.grad.reshape(-1).index_select(0, lean.state[q]["indices"]).float()
            for p, q in zip(params, lean_params)]

    def lean_step() -> None:
        # backward's hooks leave each gathered gradient in its compact buffer (a copy of k values)
        for p, g in zip(lean_params, kept):
            lean.lean_gradients.add(p, g, replace=True)
        lean.step()

    states = [ours.state[p] for p in params]
    hyper = AdamWHyper(5, 1e-4, 0.9, 0.999, 1e-8, 0.0)
    fused = torch.optim.AdamW(_copy(params), lr=1e-4, fused=True)
    foreach = torch.optim.AdamW(_copy(params), lr=1e-4, foreach=True)
    fused.step(), foreach.step()
    flats = [p.data.view(-1) for p in params]
    gflats = [p.grad.view(-1) for p in params]
    idx64 = [st["indices"].to(torch.int64) for st in states]
    values = [f.index_select(0, i) for f, i in zip(flats, idx64)]

    def floor() -> None:
        for g, f, i, v in zip(gflats, flats, idx64, values):
            g.index_select(0, i)
            f.index_put_((i,), v)

    def naive_step() -> None:
        for p, st in zip(params, states):
            naive.sparse_adamw_step(p, p.grad, st["indices"], st["exp_avg"], st["exp_avg_sq"],
                                    st.get("master"), hyper)

    fns = {
        "AdamW(fused=True), dense": fused.step,
        "AdamW(foreach=True), dense": foreach.step,
        "SparseAdamW.step(), dense grads": ours.step,
        "SparseAdamW.step(), lean (gathered grads)": lean_step,
        "ops.adamw.sparse_adamw alone": lambda: sparse_adamw(params, [p.grad for p in params],
                                                             states, hyper, backend="torch"),
        "naive step, tensor by tensor (before)": naive_step,
        "floor: gather g + scatter p only": floor,
    }
    m = measure_interleaved(fns, torch.device("cpu"), reps=reps, target_s=3.0)
    base = m["AdamW(fused=True), dense"].median_s
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "tensors": len(params),
            "k": ours.num_selected, "density": DENSITY,
            "timings": {name: x.as_dict() for name, x in m.items()},
            "speedup_vs_fused": {name: base / x.median_s for name, x in m.items()}}


def render(data: dict[str, Any]) -> str:
    dev = data["device"]
    lines = [f"# Sparse step, torch backend, vs dense AdamW — {dev['name']} ({data['date']})", "",
             f"- torch {torch.__version__}, one thread, load average at start "
             f"{dev.get('load_average_at_start')}; commit {str(data.get('git_commit'))[:10]}",
             "- group: 10 SmolLM2-135M decoder layers' projections, ρ = 1 %, median of interleaved "
             "rounds; speed-up = fused dense AdamW's time / this row's", ""]
    for row in data["rows"]:
        lines += [f"## {row['dtype']}: {row['tensors']} tensors, {row['n']:,} entries, "
                  f"k = {row['k']:,}", "", "| implementation | median | speed-up vs fused dense |",
                  "|---|---|---|"]
        for name, t in row["timings"].items():
            lines.append(f"| {name} | {t['median_s'] * 1e3:.2f} ms | "
                         f"{row['speedup_vs_fused'][name]:.1f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (7 tensors each)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="write JSON + Markdown here")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.dtypes.split(","):
        row = run(getattr(torch, name), args.layers, args.reps)
        rows.append(row)
        for impl, t in row["timings"].items():
            print(f"{row['dtype']:9s} {impl:45s} {t['median_s'] * 1e3:8.2f} ms  "
                  f"{row['speedup_vs_fused'][impl]:5.1f}x", flush=True)
    from benchmarks.torch_select import software_commit

    dev = device_info(torch.device("cpu"))
    now = _dt.datetime.now(_dt.timezone.utc)
    data = {"date": now.strftime("%Y-%m-%d"), "timestamp": now.isoformat(timespec="seconds"),
            "device": dev, "git_commit": software_commit(), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"torch-step-{device_slug(dev)}-{data['date']}" + (f"-{args.tag}" if args.tag else "")
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(render(data))
        print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
