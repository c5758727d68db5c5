"""Tables and the plot of a reproduction, from its raw results (``raw.json``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from gallop_kernels.metrics import mean_std, run_metrics
from gallop_kernels.reproduce.runner import METHOD_LABELS, METHODS

METRICS = ("id_accuracy", "ood_accuracy", "forget_ratio", "collapse_rate")


def _accuracies(raw: dict[str, Any], result: dict[str, Any]) -> dict[str, float]:
    return {raw["id_task"]: result["id_test"], **{t: result["ood"][t] for t in raw["ood_tasks"]}}


def final_runs(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs at each method's chosen learning rate, with the paper's metrics against the base model."""
    threshold = raw["config"]["collapse_threshold"]
    vanilla = _accuracies(raw, raw["vanilla"])
    out = []
    for r in raw["runs"]:
        if raw["chosen_lr"].get(r["method"]) != r["lr"] or r["seed"] not in raw["config"]["seeds"]:
            continue
        tuned = _accuracies(raw, r)
        if sum(vanilla[t] for t in raw["ood_tasks"]) == 0:  # a model that knows nothing (the smoke
            # setting's random tiny model): nothing to forget, the forget ratio is undefined
            m = run_metrics(tuned, {**vanilla, **{t: 1.0 for t in raw["ood_tasks"]}}, raw["id_task"], threshold)
            m = {**m.as_dict(), "vanilla_ood_accuracy": 0.0, "forget_ratio": float("nan")}
        else:
            m = run_metrics(tuned, vanilla, raw["id_task"], threshold).as_dict()
        out.append({**r, **m})
    return out


def aggregate(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds of every metric."""
    runs = final_runs(raw)
    rows = []
    for method in [m for m in METHODS if any(r["method"] == m for r in runs)]:
        group = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(group), "trainable": group[0]["trainable"],
               "lr": group[0]["lr"], "seconds": mean_std([r["seconds"] for r in group])}
        for k in METRICS:
            values = [r[k] for r in group if not math.isnan(r[k])]
            row[k] = mean_std(values) if values else (math.nan, math.nan)
        row["per_task"] = {t: mean_std([r["ood"][t] for r in group]) for t in raw["ood_tasks"]}
        rows.append(row)
    return rows


def _pct(ms: tuple[float, float]) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(raw: dict[str, Any]) -> str:
    """The results as Markdown: the main table, OOD per task, and the learning-rate tuning."""
    cfg = raw["config"]
    van = raw["vanilla"]
    van_ood = sum(van["ood"][t] for t in raw["ood_tasks"]) / len(raw["ood_tasks"])
    rows = aggregate(raw)
    n_seeds = max((r["seeds"] for r in rows), default=0)
    lines = [
        f"Model: {raw['model_name']} ({raw['num_params']:,} parameters). ID task `{raw['id_task']}` "
        f"({raw['id_items']['train']} training words, {raw['id_items']['test']} unseen test words); OOD tasks "
        + ", ".join(f"`{t}` ({raw['ood_items'][t]})" for t in raw["ood_tasks"])
        + f". Teacher-forced exact match (= greedy decoding), %, mean ± std over {n_seeds} seed(s). "
        f"{cfg['steps']} steps of batch {cfg['batch_size']}; budget = LoRA rank {cfg['lora_rank']} = "
        f"{raw['budget']:,} trainable entries ({100 * raw['budget'] / raw['num_target_params']:.2f}% of the "
        f"q/k/v/o/gate/up/down weights). Forget ratio and collapse rate (OOD task accuracy ≤ "
        f"{100 * cfg['collapse_threshold']:g}%) as in `gallop_kernels/metrics.py`.",
        "",
        "| method | trainable | lr (tuned) | ID acc | OOD acc | forget ratio | collapse rate |",
        "|---|---|---|---|---|---|---|",
        f"| base model (no fine-tuning) | – | – | {100 * van['id_test']:.1f} | {100 * van_ood:.1f} | – | – |",
    ]
    for row in rows:
        lines.append(f"| {METHOD_LABELS[row['method']]} | {row['trainable']:,} | {row['lr']:g} | "
                     f"{_pct(row['id_accuracy'])} | {_pct(row['ood_accuracy'])} | {_pct(row['forget_ratio'])} | "
                     f"{_pct(row['collapse_rate'])} |")
    lines += ["", "OOD accuracy per task (%):", "",
              "| method | " + " | ".join(raw["ood_tasks"]) + " |", "|---|" + "---|" * len(raw["ood_tasks"]),
              "| base model | " + " | ".join(f"{100 * van['ood'][t]:.1f}" for t in raw["ood_tasks"]) + " |"]
    for row in rows:
        lines.append(f"| {METHOD_LABELS[row['method']]} | "
                     + " | ".join(_pct(row["per_task"][t]) for t in raw["ood_tasks"]) + " |")
    tune_seed = cfg["tune_seed"]
    lines += ["", f"Learning-rate tuning (seed {tune_seed}): ID validation accuracy % (loss); chosen in bold.", "",
              "| method | " + " | ".join(["lr → val acc (val loss), OOD acc"]) + " |", "|---|---|"]
    for method in [m for m in METHODS if m in raw["chosen_lr"]]:
        cells = []
        for r in sorted((r for r in raw["runs"] if r["method"] == method and r["seed"] == tune_seed),
                        key=lambda r: r["lr"]):
            ood = sum(r["ood"].values()) / len(r["ood"])
            cell = f"{r['lr']:g} → {100 * r['id_val']:.0f} ({r['id_val_loss']:.2f}), {100 * ood:.0f}"
            cells.append(f"**{cell}**" if r["lr"] == raw["chosen_lr"][method] else cell)
        lines.append(f"| {METHOD_LABELS[method]} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(raw: dict[str, Any], path: str) -> None:
    """ID accuracy against OOD accuracy, one point per method, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "lora": "tab:purple", "gallop": "tab:red", "sift": "tab:cyan", "saft": "tab:blue",
              "pafi": "tab:green", "random": "tab:gray"}
    markers = {"full": "s", "lora": "D", "gallop": "o", "sift": "P", "saft": "^", "pafi": "v", "random": "x"}
    fig, ax = plt.subplots(figsize=(9.5, 5.4))
    van = raw["vanilla"]
    van_ood = sum(van["ood"][t] for t in raw["ood_tasks"]) / len(raw["ood_tasks"])
    ax.scatter([100 * van_ood], [100 * van["id_test"]], marker="*", s=220, color="gold", edgecolor="black",
               label="base model", zorder=5)
    tune_seed = raw["config"]["tune_seed"]
    for row in aggregate(raw):
        m = row["method"]
        # the learning-rate grid on the tuning seed: the trade-off each method offers (small, faded)
        grid = sorted((r for r in raw["runs"] if r["method"] == m and r["seed"] == tune_seed), key=lambda r: r["lr"])
        gx = [100 * sum(r["ood"].values()) / len(r["ood"]) for r in grid]
        gy = [100 * r["id_test"] for r in grid]
        ax.plot(gx, gy, marker=markers[m], ms=4, lw=0.8, ls=":", color=colors[m], alpha=0.45, zorder=2)
        for r, xx, yy in zip(grid, gx, gy):
            ax.annotate(f"{r['lr']:g}", (xx, yy), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=colors[m], alpha=0.7)
        x, xe = (100 * v for v in row["ood_accuracy"])
        y, ye = (100 * v for v in row["id_accuracy"])
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=colors[m], alpha=0.6, capsize=2)
        ax.scatter([x], [y], s=70, marker=markers[m], color=colors[m], label=METHOD_LABELS[m], zorder=4)
    ax.set_xlabel("OOD accuracy (%, mean over tasks the base model already answers)")
    ax.set_ylabel(f"ID accuracy (%, {raw['id_task']}, unseen words)")
    cfg = raw["config"]
    ax.set_title(f"{raw['model_name'].split('/')[-1]}: {cfg['steps']} steps, budget {raw['budget']:,} entries "
                 f"(LoRA rank {cfg['lora_rank']})\nbig markers: tuned lr, mean ± std over {len(cfg['seeds'])} seeds; "
                 f"dotted: the lr grid (seed {tune_seed})", fontsize=9)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(raw: dict[str, Any], output: str, make_plot: bool = True) -> list[str]:
    """raw.json, table.md and plot.png in ``output``; returns the paths written."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, "raw.json"), os.path.join(output, "table.md")]
    tmp = paths[0] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, default=str)
    os.replace(tmp, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown_table(raw))
    if make_plot:
        paths.append(os.path.join(output, "plot.png"))
        plot(raw, paths[-1])
    return paths
