"""Tables and the plot of a reproduction, from its raw results (``raw.json``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from gallop_kernels.metrics import mean_std, run_metrics
from gallop_kernels.reproduce.runner import METHOD_LABELS, METHODS

METRICS = ("id_accuracy", "ood_accuracy", "forget_ratio", "collapse_rate")


def per_run_metrics(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run with the paper's metrics against the vanilla (pretrained) model of its seed."""
    out = []
    threshold = raw["config"]["collapse_threshold"]
    for r in raw["runs"]:
        vanilla = raw["vanilla"][str(r["seed"])]["accuracy"]
        tuned = {k: r["accuracy"][k] for k in [raw["id_task"], *raw["ood_tasks"]]}
        try:
            m = run_metrics(tuned, vanilla, raw["id_task"], threshold).as_dict()
        except ValueError:  # vanilla OOD accuracy 0 (only in toy settings): forget ratio undefined
            ood = [tuned[k] for k in raw["ood_tasks"]]
            m = {"id_accuracy": tuned[raw["id_task"]], "ood_accuracy": sum(ood) / len(ood),
                 "vanilla_ood_accuracy": 0.0, "forget_ratio": float("nan"),
                 "collapse_rate": sum(v <= threshold for v in ood) / len(ood)}
        out.append({**r, **m})
    return out


def aggregate(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, budget): mean and std over seeds of every metric."""
    runs = per_run_metrics(raw)
    rows = []
    keys = sorted({(r["method"], r["rank"]) for r in runs},
                  key=lambda k: (k[1] or 0, METHODS.index(k[0])))
    for method, rank in keys:
        group = [r for r in runs if r["method"] == method and r["rank"] == rank]
        row = {"method": method, "rank": rank, "seeds": len(group), "trainable": group[0]["trainable"],
               "density": group[0]["density"]}
        for m in METRICS:
            vals = [r[m] for r in group if not math.isnan(r[m])]
            row[m] = mean_std(vals) if vals else (float("nan"), float("nan"))
        rows.append(row)
    return rows


def vanilla_row(raw: dict[str, Any]) -> dict[str, tuple[float, float]]:
    ids = [v["accuracy"][raw["id_task"]] for v in raw["vanilla"].values()]
    oods = [sum(v["accuracy"][k] for k in raw["ood_tasks"]) / len(raw["ood_tasks"]) for v in raw["vanilla"].values()]
    return {"id_accuracy": mean_std(ids), "ood_accuracy": mean_std(oods)}


def _pct(ms: tuple[float, float]) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(raw: dict[str, Any]) -> str:
    """The results as a Markdown table (percentages, mean ± std over seeds)."""
    cfg = raw["config"]
    n_seeds = len(cfg["seeds"])
    van = vanilla_row(raw)
    lines = [
        f"ID task: `{raw['id_task']}`; OOD tasks: {', '.join(f'`{t}`' for t in raw['ood_tasks'])}. "
        f"Exact-match accuracy (%), mean ± std over {n_seeds} seed(s) (each seed: its own pretraining, "
        f"data order, LoRA init and random selection). Model: {raw['num_params']:,}-parameter Llama "
        f"({cfg['num_layers']} layers, hidden {cfg['hidden_size']}); {cfg['finetune_steps']} fine-tuning steps "
        f"of batch {cfg['finetune_batch']}. Forget ratio and collapse rate are in %; collapse = OOD task "
        f"accuracy ≤ {100 * cfg['collapse_threshold']:g}%.",
        "",
        "| method | trainable params (density of linear weights) | ID acc | OOD acc | forget ratio | collapse rate |",
        "|---|---|---|---|---|---|",
        f"| pretrained (no fine-tuning) | – | {_pct(van['id_accuracy'])} | {_pct(van['ood_accuracy'])} | – | – |",
    ]
    for row in aggregate(raw):
        if row["method"] == "full":
            budget = f"all {row['trainable']:,}"
        elif row["method"] == "lora":
            budget = f"{row['trainable']:,} (rank {row['rank']})"
        else:
            budget = f"{row['trainable']:,} ({100 * row['density']:.2f}%)"
        lines.append(f"| {METHOD_LABELS[row['method']]} | {budget} | {_pct(row['id_accuracy'])} | "
                     f"{_pct(row['ood_accuracy'])} | {_pct(row['forget_ratio'])} | {_pct(row['collapse_rate'])} |")
    return "\n".join(lines) + "\n"


def plot(raw: dict[str, Any], path: str) -> None:
    """ID accuracy against OOD accuracy, one point per method and budget, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "lora": "tab:purple", "gallop": "tab:red", "gradient": "tab:blue",
              "magnitude": "tab:green", "random": "tab:gray"}
    markers = {"full": "s", "lora": "D", "gallop": "o", "gradient": "^", "magnitude": "v", "random": "x"}
    ranks = sorted(raw["budgets"], key=int)
    sizes = {r: 40 + 50 * i for i, r in enumerate(ranks)}
    fig, ax = plt.subplots(figsize=(7, 5.2))
    van = vanilla_row(raw)
    ax.errorbar(100 * van["ood_accuracy"][0], 100 * van["id_accuracy"][0], xerr=100 * van["ood_accuracy"][1],
                yerr=100 * van["id_accuracy"][1], fmt="*", ms=14, color="gold", mec="black", label="pretrained",
                zorder=5)
    seen = set()
    for row in aggregate(raw):
        m = row["method"]
        x, xe = (100 * v for v in row["ood_accuracy"])
        y, ye = (100 * v for v in row["id_accuracy"])
        size = 60 if row["rank"] is None else sizes[str(row["rank"])]
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=colors[m], alpha=0.6, capsize=2)
        ax.scatter([x], [y], s=size, marker=markers[m], color=colors[m], alpha=0.85,
                   label=METHOD_LABELS[m] if m not in seen else None, zorder=4)
        seen.add(m)
        if row["density"] is not None and m == "gallop":
            ax.annotate(f"{100 * row['density']:.1f}%", (x, y), textcoords="offset points", xytext=(6, -10),
                        fontsize=8, color=colors[m])
    ax.set_xlabel("OOD accuracy (%, mean over pre-training tasks)")
    ax.set_ylabel(f"ID accuracy (%, {raw['id_task']})")
    budgets = ", ".join(f"rank {r} ≙ {100 * raw['budgets'][r]['density']:.1f}%" for r in ranks)
    ax.set_title(f"Fine-tuning a tiny Llama on a new task ({len(raw['config']['seeds'])} seeds)\n"
                 f"marker size = budget: {budgets}", fontsize=10)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(raw: dict[str, Any], output: str, make_plot: bool = True) -> list[str]:
    """raw.json, table.md and plot.png in ``output``; returns the paths written."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, "raw.json"), os.path.join(output, "table.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, default=str)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown_table(raw))
    if make_plot:
        paths.append(os.path.join(output, "plot.png"))
        plot(raw, paths[-1])
    return paths
