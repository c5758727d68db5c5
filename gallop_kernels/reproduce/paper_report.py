"""Tables, the plot and the cost account of the paper-protocol study: a pure function of ``raw.json``.

Nothing here trains or reads anything but the raw results, so the report of a study that is still
running (or that someone else continued) is regenerated with ``gallop reproduce --report-only``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import replace
from typing import Any

from gallop_kernels.metrics import mean_std
from gallop_kernels.reproduce.paper import LABELS, METHODS, Key, choose_lr, config_of, front_keys, metrics, stages

GAIN_QUANTILES = (0.5, 0.75, 0.9)
"""Where methods are compared: the ID-accuracy gains over the base model at these quantiles of the
gains the ID task's runs reached (whole points), so the columns stay informative whatever the task."""


def id_gains(raw: dict[str, Any], id_task: str) -> list[float]:
    """The comparison gains of ``id_task`` (`GAIN_QUANTILES` of its runs' positive gains)."""
    gains = sorted(metrics(raw, r)["id_gain"] for r in raw["runs"] if r["id_task"] == id_task)
    gains = [g for g in gains if g > 0]
    if not gains:
        return []
    picks = [gains[min(len(gains) - 1, int(q * len(gains)))] for q in GAIN_QUANTILES]
    return sorted({math.floor(100 * g + 1e-9) / 100 for g in picks})


def _pct(ms: tuple[float, float] | float, n: int | None = None) -> str:
    mean, std = ms if isinstance(ms, tuple) else (ms, 0.0)
    if mean is None or math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n and n > 1 else "")


def _label(method: str) -> str:
    return LABELS[method].replace("|", "\\|")  # a pipe would end a Markdown table cell


def _rank(rank: int | None) -> str:
    return "all" if rank is None else str(rank)


def grouped(raw: dict[str, Any]) -> dict[Key, list[dict[str, Any]]]:
    """Runs with their metrics, grouped by everything but the seed (key with seed 0)."""
    out: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for r in raw["runs"]:
        k = Key.of(r)
        out[Key(k.id_task, k.method, k.rank, k.lr, 0)].append({**r, **metrics(raw, r)})
    return out


def _stat(group: list[dict[str, Any]], name: str) -> tuple[float, float]:
    values = [g[name] for g in group if not (isinstance(g[name], float) and math.isnan(g[name]))]
    return mean_std(values) if values else (math.nan, math.nan)


def method_fronts(raw: dict[str, Any]) -> dict[str, dict[str, list[Key]]]:
    """Per ID task and method, the seed-0 points of its Pareto front (best ID first)."""
    out: dict[str, dict[str, list[Key]]] = {}
    for id_task in raw["config"]["id_tasks"]:
        out[id_task] = {}
        for method in METHODS:
            keys = front_keys(raw, id_task, method)
            if keys:
                runs = grouped(raw)
                out[id_task][method] = sorted(keys, key=lambda k: -runs[k][0]["id_accuracy"])
    return out


def best_ood_at_gain(raw: dict[str, Any], id_task: str, method: str, gain: float) -> tuple[Key, list] | None:
    """The point (seed-0 key and its seeds' runs) with the best mean OOD accuracy among those whose
    mean ID gain over the base model is at least ``gain``."""
    best = None
    for key, group in grouped(raw).items():
        if key.id_task != id_task or key.method != method:
            continue
        if _stat(group, "id_gain")[0] >= gain - 1e-12:
            ood = _stat(group, "ood_accuracy")[0]
            if best is None or ood > best[0]:
                best = (ood, key, group)
    return None if best is None else (best[1], best[2])


EXTRAS = ("pilot", "selections", "estimate")
"""The other raw files of a results folder the report reads when present (``<name>.json``)."""


def read_extras(output: str) -> dict[str, Any]:
    out = {}
    for name in EXTRAS:
        path = os.path.join(output, f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def selections_table(sel: dict[str, Any], id_task: str) -> list[str]:
    """Rows of the plain / floored selection comparison of `paper.selections` for one ID task."""
    rows = []
    for rank, variants in sorted(sel["tasks"][id_task].items(), key=lambda kv: int(kv[0])):
        for name, v in variants.items():
            cols = v["columns"].get("576") or next(iter(v["columns"].values()))  # the hidden width of SmolLM2
            top = ", ".join(f"{c} ({n:,}; {n / cols['uniform_share']:.0f}×)" for c, n in cols["top"][:3])
            entries = sum(c["selected"] for c in v["columns"].values())
            rows.append(f"| {rank} ({entries:,}) | {name} | "
                        f"{v['zeros']:,} | {v['below_floor']:,} | {100 * v['shared_with_plain']:.0f} % | {top} |")
    return rows


def extras_section(extras: dict[str, Any]) -> list[str]:
    lines = []
    pilot = extras.get("pilot")
    if pilot:
        lines += ["## Pilot: the base model on every candidate task (`pilot.json`)", "",
                  "| task | in the suite | chance | base test acc | base val acc | train / val / test |",
                  "|---|---|---|---|---|---|"]
        for name, t in pilot["tasks"].items():
            it = t["items"]
            lines.append(f"| `{name}` | {'yes' if t['in_suite'] else 'no'} | {_pct(t['chance'])} | {_pct(t['test'])} | "
                         f"{_pct(t['val'])} | {it['train']} / {it['val']} / {it['test']} |")
        lines.append("")
    sel = extras.get("selections")
    if sel:
        lines += ["## What GaLLoP selects, plain and floored (`selections.json`)", "",
                  f"{sel['entries']:,} projection weights, {sel['zeros']:,} of them exactly 0, {sel['below_floor']:,} "
                  f"below their tensor's floor ({sel['floor_fraction']:g} × median step, {sel['floor_source']}).", ""]
        for id_task in sel["tasks"]:
            lines += [f"Calibration gradient of `{id_task}`:", "",
                      "| rank (entries) | variant | exact zeros | below the floor | shared with plain | "
                      "top input columns (576-wide; × uniform share) |", "|---|---|---|---|---|---|",
                      *selections_table(sel, id_task), ""]
    return lines


def markdown(raw: dict[str, Any], extras: dict[str, Any] | None = None) -> str:
    """The whole report as Markdown (``extras``: the folder's other raw files, `read_extras`)."""
    extras = extras or {}
    cfg = raw["config"]
    van = raw["vanilla"]
    runs = grouped(raw)
    lines = [f"# Paper protocol: {raw['model_name']} ({raw['num_params']:,} parameters)", "",
             f"{len(raw['runs'])} fine-tuning runs so far. Suite: "
             + ", ".join(f"`{t}`" for t in cfg["tasks"]) + "; ID tasks in turn: "
             + ", ".join(f"`{t}`" for t in cfg["id_tasks"])
             + f". {cfg['epochs']} epoch(s) of batch {cfg['batch_size']}, warmup {cfg['warmup_ratio']:g} of the "
             f"steps then linear decay, gradient clipping at {cfg['max_grad_norm']:g}, "
             + ("bf16 autocast" if cfg.get("autocast") else "float32") + ". Accuracies in %; forget ratio = mean over "
             "the OOD tasks of max(0, (base − acc) / base); collapse = OOD tasks at ≤ "
             f"{100 * cfg['collapse_threshold']:g}%; at chance = OOD tasks at or below chance; retention = mean "
             "exact match on the six open-answer probes of the earlier study.", "",
             "## The suite and the zero-shot base model", "",
             "| task | what | train / val / test items (test used) | chance | base test acc | base val acc |",
             "|---|---|---|---|---|---|"]
    for t in cfg["tasks"]:
        sz = raw["sizes"][t]
        val = van["val"].get(t) if isinstance(van["val"], dict) else None
        lines.append(f"| `{t}` | {raw['descriptions'][t]} | {sz['train']} / {sz['val']} / {sz['test']} "
                     f"({sz['test_used']}) | {_pct(raw['chance'][t])} | {_pct(van['test'][t])} | "
                     f"{_pct(val) if val is not None else '–'} |")
    ret = van["retention"]
    lines += ["", "Retention probes, base model (exact match %): "
              + ", ".join(f"{k} {_pct(v)}" for k, v in ret.items())
              + f"; mean {_pct(sum(ret.values()) / len(ret))}.", ""]
    budgets = raw.get("budgets", {})
    if budgets:
        lines += ["Budgets (trainable entries of the q/k/v/o/gate/up/down weights, "
                  f"{raw['num_target_params']:,} in all): "
                  + ", ".join(f"LoRA rank {r} = {int(b):,} ({100 * int(b) / raw['num_target_params']:.2f}%)"
                              for r, b in sorted(budgets.items(), key=lambda kv: int(kv[0]))) + ".", ""]
    fronts = method_fronts(raw)
    for id_task in cfg["id_tasks"]:
        others = [t for t in cfg["tasks"] if t != id_task]
        base_ood = sum(van["test"][t] for t in others) / len(others)
        gains = id_gains(raw, id_task)
        lines += [f"## ID task `{id_task}`", "",
                  f"Base model: ID {_pct(van['test'][id_task])}, OOD (mean of "
                  + ", ".join(f"`{t}`" for t in others) + f") {_pct(base_ood)}.", "",
                  "### Best OOD accuracy at a given ID gain", "",
                  "For each method, the point of its grid (any budget, any rate; mean over the seeds run) with "
                  "the best OOD accuracy among those that gained at least this much ID accuracy over the base "
                  "model (the gains: the median, 75th and 90th percentile of this task's runs). `n` = seeds.", "",
                  "| method | " + " | ".join(f"ID +{100 * g:.0f} pts: OOD (forget) [rank, lr, n]" for g in gains)
                  + " |", "|---|" + "---|" * len(gains)]
        for method in METHODS:
            if not any(k.id_task == id_task and k.method == method for k in runs):
                continue
            cells = []
            for g in gains:
                found = best_ood_at_gain(raw, id_task, method, g)
                if found is None:
                    cells.append("not reached")
                    continue
                key, group = found
                n = len(group)
                cells.append(f"{_pct(_stat(group, 'ood_accuracy'), n)} ({_pct(_stat(group, 'forget_ratio'), n)}) "
                             f"[{_rank(key.rank)}, {key.lr:g}, {n}]")
            lines.append(f"| {_label(method)} | " + " | ".join(cells) + " |")
        lines += ["", "### Pareto fronts (ID test accuracy against mean OOD accuracy; seeds on the front points)", "",
                  "| method | rank | lr | n | ID acc | OOD acc | forget ratio | collapse | at chance | retention |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, keys in fronts.get(id_task, {}).items():
            for key in keys:
                group = runs[key]
                n = len(group)
                lines.append(f"| {_label(method)} | {_rank(key.rank)} | {key.lr:g} | {n} | "
                             f"{_pct(_stat(group, 'id_accuracy'), n)} | {_pct(_stat(group, 'ood_accuracy'), n)} | "
                             f"{_pct(_stat(group, 'forget_ratio'), n)} | {_pct(_stat(group, 'collapse_rate'), n)} | "
                             f"{_pct(_stat(group, 'at_chance_rate'), n)} | {_pct(_stat(group, 'retention'), n)} |")
        lines += ["", "### The learning-rate rule's choice (smallest rate within "
                  f"{100 * cfg['lr_tolerance']:g} points of the best ID validation accuracy, seed 0)", "",
                  "| method | rank | chosen lr | n | ID val | ID acc | OOD acc | forget ratio | per OOD task "
                  "| retention |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            for rank in sorted({k.rank for k in runs if k.id_task == id_task and k.method == method},
                               key=lambda r: -1 if r is None else r):
                lr = choose_lr(raw["runs"], id_task, method, rank, cfg["lr_tolerance"])
                if lr is None:
                    continue
                group = runs[Key(id_task, method, rank, lr, 0)]
                n = len(group)
                per_task = ", ".join(f"{t} {_pct(_stat([{'x': g['test'][t]} for g in group], 'x'))}" for t in others)
                lines.append(f"| {_label(method)} | {_rank(rank)} | {lr:g} | {n} | {_pct(_stat(group, 'val'), n)} | "
                             f"{_pct(_stat(group, 'id_accuracy'), n)} | {_pct(_stat(group, 'ood_accuracy'), n)} | "
                             f"{_pct(_stat(group, 'forget_ratio'), n)} | {per_task} | "
                             f"{_pct(_stat(group, 'retention'), n)} |")
        lines += [""]
    lines += selection_section(raw) + [""] + extras_section(extras) + cost_section(raw, extras.get("estimate"))
    return "\n".join(lines) + "\n"


def selection_section(raw: dict[str, Any]) -> list[str]:
    """What the sparse selections picked on the quantized base (seed 0, the first ID task's runs at
    each budget and the middle rate of each method's grid)."""
    lines = ["## What the selections pick on the dequantized Q4_1 base", "",
             "Exact zeros selected, entries below the quantization floor (GaLLoP + floor's runs), and the "
             "input columns that took most entries among the 576-wide projections (q/k/v/o/gate/up; "
             "`uniform` = the count each column would get if the selection ignored columns). One run per "
             "method and budget (seed 0, the lowest rate run; the selection does not depend on the rate).", "",
             "| ID task | method | rank | selected | exact zeros | top input columns (entries) | uniform |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in sorted(raw["runs"], key=lambda r: (r["id_task"], METHODS.index(r["method"]), r["rank"] or 0, r["lr"])):
        sel = r.get("selection")
        if sel is None or r["seed"] != 0 or (r["id_task"], r["method"], r["rank"]) in seen:
            continue
        seen.add((r["id_task"], r["method"], r["rank"]))
        cols = sel["columns"].get("576") or next(iter(sel["columns"].values()))
        top = ", ".join(f"{c} ({n:,})" for c, n in cols["top"][:4])
        lines.append(f"| {r['id_task']} | {_label(r['method'])} | {r['rank']} | {r['trainable']:,} | "
                     f"{sel['zeros']:,} | {top} | {cols['uniform_share']:,.0f} |")
    return lines


def planned_runs(raw: dict[str, Any], front_points: int = 3) -> list[tuple[Key, bool]]:
    """Every run of the study's plan and whether it is done. The seed stage of an ID task whose
    grid is unfinished (its fronts are not known yet) counts ``front_points`` points per method."""
    cfg = config_of(raw)
    done = {Key.of(r) for r in raw["runs"]}
    grid = [(name, keys) for name, keys in stages(cfg) if "seeds" not in name]
    out = [(k, k in done) for _, keys in grid for k in keys]
    seeded = [s for s in cfg.seeds if s != 0]
    for id_task in cfg.id_tasks:
        task_grid = [k for name, keys in grid if name.startswith(f"{id_task}:") for k in keys]
        if all(k in done for k in task_grid):
            keys = [replace(k, seed=s) for m in cfg.methods for k in front_keys(raw, id_task, m) for s in seeded]
        else:
            keys = [Key(id_task, m, None, -1.0, s) for m in cfg.methods for _ in range(front_points) for s in seeded]
        out += [(k, k in done) for k in keys]
    return out


def _costs(raw: dict[str, Any]) -> tuple[dict[tuple[str, Any], list[float]], float]:
    per_kind: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in raw["runs"]:
        per_kind[(r["method"], r["rank"])].append(r["cpu_seconds"])
    return per_kind, sum(r["cpu_seconds"] for r in raw["runs"]) / max(1, len(raw["runs"]))


def projected_seconds(raw: dict[str, Any], keys: list[Key]) -> float:
    """CPU seconds ``keys`` would take at the mean measured cost of their kind of run (method and
    rank; else the method's mean; else the mean of every run)."""
    per_kind, all_mean = _costs(raw)

    def cost(k: Key) -> float:
        same = per_kind.get((k.method, k.rank)) or [c for (m, _), cs in per_kind.items() if m == k.method for c in cs]
        return sum(same) / len(same) if same else all_mean

    return sum(cost(k) for k in keys)


def estimate(raw: dict[str, Any], when: str) -> dict[str, Any]:
    """The whole plan's CPU time projected from the runs measured so far (``estimate.json``)."""
    plan = planned_runs(raw)
    per_kind, _ = _costs(raw)
    return {"when": when, "runs": len(plan), "measured_runs": len(raw["runs"]),
            "basis": f"the mean CPU time of each kind of run among the first {len(raw['runs'])} runs",
            "per_kind_cpu_seconds": {f"{m} r{r}": sum(c) / len(c) for (m, r), c in per_kind.items()},
            "cpu_hours": (projected_seconds(raw, [k for k, _ in plan])) / 3600}


def cost_section(raw: dict[str, Any], estimate: dict[str, Any] | None = None) -> list[str]:
    """CPU time so far, per kind of run, and the projection of the rest of the plan."""
    runs = raw["runs"]
    lines = ["## Cost", ""]
    if not runs:
        return lines + ["No run yet."]
    per_kind, all_mean = _costs(raw)
    spent = sum(r["cpu_seconds"] for r in runs) + raw["vanilla"].get("cpu_seconds", 0.0)
    plan = planned_runs(raw)
    todo = [k for k, done in plan if not done]
    remaining = projected_seconds(raw, todo)
    devices = sorted({r.get("device", "cpu") for r in runs})
    lines += [f"{len(runs)} runs took {spent / 3600:.2f} CPU-hours (process CPU time of the run's worker, "
              f"{', '.join(devices)}; machine: {raw['machine'].get('cpu')}, {raw['machine'].get('cpus')} cores, "
              f"shared with other work). Mean {all_mean / 60:.1f} CPU-minutes a run. The plan holds {len(plan)} runs; "
              f"the {len(todo)} left would take about {remaining / 3600:.1f} CPU-hours more at the mean cost of "
              "their kind of run (seed stages not yet decidable are counted as 3 front points per method).", "",
              "| method | rank | runs | mean CPU min a run |", "|---|---|---|---|"]
    for (method, rank), cs in sorted(per_kind.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or 0)):
        lines.append(f"| {_label(method)} | {_rank(rank)} | {len(cs)} | {sum(cs) / len(cs) / 60:.1f} |")
    if estimate:
        lines += ["", f"Estimated early ({estimate['when']}, from {estimate['basis']}): "
                  f"{estimate['cpu_hours']:.1f} CPU-hours for the {estimate['runs']} runs of the plan; "
                  f"measured so far: {spent / 3600:.2f} CPU-hours for {len(runs)} runs, "
                  f"{(spent + remaining) / 3600:.1f} CPU-hours projected for the whole plan now."]
    return lines


def summary(raw: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    van = raw["vanilla"]["test"]
    return (f"{len(raw['runs'])} runs; base model test accuracy: "
            + ", ".join(f"{t} {100 * v:.1f}%" for t, v in van.items()))


def plot(raw: dict[str, Any], path: str) -> None:
    """Per ID task: ID accuracy against mean OOD accuracy; every grid point faded (marker size by
    budget), each method's Pareto front as a line with seed error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "lora": "tab:purple", "gallop": "tab:red", "gallop_qf": "tab:orange",
              "sift": "tab:cyan", "saft": "tab:blue", "pafi": "tab:green", "random": "tab:gray"}
    markers = {"full": "s", "lora": "D", "gallop": "o", "gallop_qf": "*", "sift": "P", "saft": "^", "pafi": "v",
               "random": "x"}
    sizes = {None: 30, 4: 12, 16: 24, 64: 44}
    id_tasks = raw["config"]["id_tasks"]
    fig, axes = plt.subplots(1, len(id_tasks), figsize=(7.5 * len(id_tasks), 6.0), squeeze=False)
    runs = grouped(raw)
    fronts = method_fronts(raw)
    van = raw["vanilla"]["test"]
    for ax, id_task in zip(axes[0], id_tasks):
        others = [t for t in raw["config"]["tasks"] if t != id_task]
        ax.scatter([100 * sum(van[t] for t in others) / len(others)], [100 * van[id_task]], marker="*", s=260,
                   color="gold", edgecolor="black", zorder=6, label="base model")
        for method in METHODS:
            pts = [(k, g) for k, g in runs.items() if k.id_task == id_task and k.method == method]
            if not pts:
                continue
            first = [min(g, key=lambda r: r["seed"]) for _, g in pts]
            ax.scatter([100 * r["ood_accuracy"] for r in first], [100 * r["id_accuracy"] for r in first],
                       s=[sizes.get(k.rank, 20) for k, _ in pts], marker=markers[method], color=colors[method],
                       alpha=0.25, zorder=2)
            keys = fronts.get(id_task, {}).get(method, [])
            if keys:
                xs = [_stat(runs[k], "ood_accuracy") for k in keys]
                ys = [_stat(runs[k], "id_accuracy") for k in keys]
                order = sorted(range(len(keys)), key=lambda i: xs[i][0])
                ax.errorbar([100 * xs[i][0] for i in order], [100 * ys[i][0] for i in order],
                            xerr=[100 * xs[i][1] for i in order], yerr=[100 * ys[i][1] for i in order],
                            color=colors[method], marker=markers[method], ms=6, lw=1.4, capsize=2, zorder=4,
                            label=LABELS[method])
        ax.set_xlabel("OOD accuracy (%, mean over the other tasks of the suite)")
        ax.set_ylabel(f"ID accuracy (%, {id_task} test)")
        ax.set_title(f"fine-tuned on {id_task}: every run faded (size = budget), Pareto fronts solid", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(5, len(labels)))
    fig.suptitle(f"{raw['model_name'].split('/')[-1]}: the paper's protocol ({len(raw['runs'])} runs)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(raw: dict[str, Any], output: str, make_plot: bool = True) -> list[str]:
    """table.md and plot.png in ``output`` from ``raw`` (raw.json itself is written by the study
    alone, so a report made while it runs never overwrites a run it appended); returns the paths."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, "table.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(markdown(raw, read_extras(output)))
    if make_plot:
        paths.append(os.path.join(output, "plot.png"))
        plot(raw, paths[-1])
    return paths


__all__ = ["GAIN_QUANTILES", "best_ood_at_gain", "id_gains", "estimate", "projected_seconds", "grouped", "markdown", "method_fronts", "planned_runs", "plot", "summary",
           "write_outputs"]
