"""What phase one selected, per layer type: one table for the optimizer and the 4-bit delta path."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from gallop_kernels.optim.unwrap import unwrap_optimizer

Summary = dict[str, dict[str, int]]
"""``{layer type: {"selected": ..., "total": ..., "tensors": ...}}``, sorted by layer type."""

_CONTAINERS = {"model", "layers", "layer", "h", "blocks", "decoder", "encoder", "transformer", "base_model"}


def layer_type(name: str) -> str:
    """A parameter's layer type: its name without layer numbers and container prefixes.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj.weight``.
    """
    parts = [p for p in name.split(".") if not p.isdigit()]
    while len(parts) > 2 and parts[0] in _CONTAINERS:
        parts = parts[1:]
    return ".".join(parts)


def summarize(rows: Iterable[tuple[str, int, int]]) -> Summary:
    """Fold ``(tensor name, selected entries, entries)`` rows into a :data:`Summary`."""
    summary: Summary = {}
    for name, selected, total in rows:
        row = summary.setdefault(layer_type(name), {"selected": 0, "total": 0, "tensors": 0})
        row["selected"] += int(selected)
        row["total"] += int(total)
        row["tensors"] += 1
    return dict(sorted(summary.items()))


def selection_summary(model: nn.Module, optimizer: Any) -> Summary:
    """Per layer type: how many entries a SparseAdamW selected of how many trainable ones."""
    opt = unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}

    def rows():
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p, {})
                yield names.get(id(p), "unnamed"), st["indices"].numel() if "indices" in st else 0, p.numel()

    return summarize(rows())


def format_selection_summary(summary: Mapping[str, Mapping[str, int]]) -> str:
    """A small text table of a :data:`Summary`."""
    width = max([len("layer type")] + [len(k) for k in summary])
    lines = [f"{'layer type':<{width}}  {'tensors':>7}  {'selected':>10}  {'of':>12}  {'share':>7}"]
    sel = tot = 0
    for kind, row in summary.items():
        share = row["selected"] / row["total"] if row["total"] else 0.0
        lines.append(f"{kind:<{width}}  {row['tensors']:>7}  {row['selected']:>10,}  {row['total']:>12,}  {share:>7.2%}")
        sel += row["selected"]
        tot += row["total"]
    lines.append(f"{'total':<{width}}  {'':>7}  {sel:>10,}  {tot:>12,}  {(sel / tot if tot else 0):>7.2%}")
    return "\n".join(lines)


__all__ = ["Summary", "format_selection_summary", "layer_type", "selection_summary", "summarize"]
