"""The GaLLoP paper's protocol at CPU scale: ``gallop reproduce`` (docs/reproduction.md).

The paper fine-tunes a model on one task of a suite of same-format tasks and measures, on the
*other* tasks of the suite, how much of the zero-shot base model's accuracy is lost (forget ratio
``max(0, (Acc_base − Acc) / Acc_base)`` per task) and whether a task collapsed (accuracy floored
to 0). Here the suite is `suite.SUITE` (generated multiple-choice tasks, log-likelihood scoring),
the model SmolLM2-135M-Instruct, and every method is run on a grid:

- learning rates: 5 per method (`LR_GRID`), the same grid on every ID task and budget;
- budgets: LoRA ranks 4, 16, 64 on q/k/v/o/gate/up/down; every sparse method trains exactly
  LoRA's trainable count at that rank (SIFT: its own per-tensor k, a few more);
- methods: full fine-tuning, LoRA, GaLLoP, GaLLoP with the quantization floor
  (`gallop_kernels.score_floor`), SIFT as its code does it, SAFT-like global |g|, PaFi, random.

Training: ``epochs`` whole epochs over the ID task's training split in batches of
``batch_size``, a linear warmup over ``warmup_ratio`` of the steps then linear decay to 0,
gradient clipping at ``max_grad_norm`` (the usual Trainer recipe), AdamW without weight decay.

The study runs in **stages** (`plan`), most informative first, so that a study stopped anywhere
is a coherent subset: the grid at the middle budget on the first ID task, its other budgets, the
second ID task, then seeds 1 and 2 for the points that make up each method's ID–OOD Pareto front.
Every run is keyed by (ID task, method, rank, lr, seed) and appended to ``raw.json`` as soon as it
ends; a rerun skips every key already there, so an interrupted study continues and a finished
one reruns nothing. The tables and the plot are a pure function of ``raw.json``
(`paper_report`).

The learning-rate rule, stated before any run: per ID task, method and budget, the chosen rate is
the *smallest* rate of the grid whose ID **validation** accuracy (seed 0) is within
``lr_tolerance`` (2 points) of the best on the grid. The OOD tasks play no part in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import torch

from gallop_kernels import chat_tasks as C
from gallop_kernels.reproduce import suite as S
from gallop_kernels.reproduce.runner import (TINY, check_lr_grid, dense_setup, load, load_previous, loadavg,
                                             lora_budget, machine, quiet_worker, save, sift_groups,
                                             study_session, target_parameters)

METHODS = ("full", "lora", "gallop", "gallop_qf", "sift", "saft", "pafi", "random")
SPARSE_SCORES = {"gallop": "gallop", "gallop_qf": "gallop", "sift": "gradient", "saft": "gradient",
                 "pafi": "magnitude", "random": "random"}
LABELS = {
    "full": "Full FT (AdamW)",
    "lora": "LoRA (peft)",
    "gallop": "GaLLoP",
    "gallop_qf": "GaLLoP + quantization floor",
    "sift": "SIFT (per tensor, |g| of 1 batch)",
    "saft": "SAFT-like (global |g|)",
    "pafi": "PaFi (smallest |θ|)",
    "random": "random",
}
LR_GRID = {
    "full": (3e-6, 1e-5, 3e-5, 1e-4, 3e-4),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "gallop": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "gallop_qf": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "sift": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "saft": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "pafi": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "random": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
"""Five rates per method, half a decade apart; the ranges are where each kind of method learned in
the earlier probes study (random and PaFi selections need larger rates than gradient-based ones)."""
RETENTION_TASKS = ("opposites", "plurals", "capitals", "languages", "next_number", "addition")
"""The earlier study's six open-answer probes, kept as a separate "retention" metric."""


@dataclass(frozen=True)
class Key:
    """What identifies one fine-tuning run (``rank`` is None for full fine-tuning)."""

    id_task: str
    method: str
    rank: int | None
    lr: float
    seed: int

    @staticmethod
    def of(run: dict[str, Any]) -> "Key":
        return Key(run["id_task"], run["method"], run["rank"], float(run["lr"]), int(run["seed"]))


@dataclass(frozen=True)
class PaperConfig:
    """Everything that decides the study; the defaults are what ``gallop reproduce`` runs."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; TINY: the random tiny model
    tasks: tuple[str, ...] = S.SUITE
    id_tasks: tuple[str, ...] = ("arithmetic", "kind")
    methods: tuple[str, ...] = METHODS
    ranks: tuple[int, ...] = (16, 4, 64)  # the first is the budget every stage runs first
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRID))
    seeds: tuple[int, ...] = (0, 1, 2)
    full_budgets_on: tuple[str, ...] = ("arithmetic",)  # ID tasks that get every rank (others: the first)
    every_rate_methods: tuple[str, ...] = ("lora", "gallop", "gallop_qf", "full")  # every rate everywhere
    other_rank_rates: int = 3  # the others, but on the first ID task at the first rank: the middle rates
    epochs: int = 1
    batch_size: int = 8
    autocast: bool = True  # bf16 autocast (fp32 weights and optimizer): mixed precision, as the paper trains
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    calibration_examples: int = 64  # GaLLoP's and SAFT's phase one (SIFT: the first batch)
    test_items: int = 200  # per task: the first ones of its test split in a seeded order
    train_items: int | None = None  # cap on the ID task's training split (None: all of it)
    retention_items: int = 24  # per retention probe
    floor_fraction: float = 0.5  # the quantization floor: this fraction of the median step
    floor_format: str = "auto"  # "auto": the GGUF file's types; or a format of score_floor.FORMATS
    lr_tolerance: float = 0.02
    collapse_threshold: float = 0.01
    threads: int = 1
    jobs: int = 1

    def check(self) -> None:
        from gallop_kernels import score_floor

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
        bad = [t for t in (*self.tasks, *self.id_tasks) if t not in S.CANDIDATES]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {sorted(S.CANDIDATES)}")
        if len(self.tasks) < 2 or any(t not in self.tasks for t in self.id_tasks) or not self.id_tasks:
            raise ValueError("the ID tasks must be tasks of the suite, and the suite needs at least two tasks")
        if not self.seeds or not self.ranks:
            raise ValueError("need at least one seed and one rank")
        for name in ("epochs", "batch_size", "calibration_examples", "test_items", "retention_items", "threads",
                     "jobs", *(f"ranks[{i}]" for i in range(len(self.ranks)))):
            value = self.ranks[int(name[6:-1])] if name.startswith("ranks[") else getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not self.max_grad_norm > 0 or not 0 < self.floor_fraction <= 1:
            raise ValueError("warmup_ratio must be in [0, 1), max_grad_norm > 0, floor_fraction in (0, 1]")
        if self.floor_format != "auto" and self.floor_format not in score_floor.FORMATS:
            raise ValueError(f"floor_format must be 'auto' or one of {sorted(score_floor.FORMATS)}")
        check_lr_grid(self.methods, self.lr_grid)

    def fingerprint(self) -> str:
        """What decides a run's result (`RESULT_FIELDS`); earlier runs are reused only under the
        same fingerprint. The grid (methods, ranks, rates, seeds, ID tasks) may grow between
        sessions: runs are keyed by it."""
        d = {k: getattr(self, k) for k in RESULT_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


RESULT_FIELDS = ("model", "tasks", "epochs", "batch_size", "autocast", "warmup_ratio", "max_grad_norm",
                 "calibration_examples", "test_items", "train_items", "retention_items", "floor_fraction",
                 "floor_format")
"""The settings a run's result depends on (a run's own key holds the rest)."""


def config_of(raw: dict[str, Any]) -> PaperConfig:
    """The configuration a raw result was made with (as its last session ran it)."""
    fields = PaperConfig.__dataclass_fields__
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw["config"].items() if k in fields}
    values["lr_grid"] = {m: tuple(v) for m, v in raw["config"]["lr_grid"].items()}
    return PaperConfig(**values)


SMOKE = PaperConfig(model=TINY, tasks=("kind", "sentiment", "arithmetic"), id_tasks=("sentiment",),
                    methods=METHODS, ranks=(1,), lr_grid={m: (1e-3,) for m in METHODS}, seeds=(0, 1),
                    full_budgets_on=(), epochs=1, batch_size=4, calibration_examples=4, test_items=6, train_items=8,
                    retention_items=2, floor_format="q4_1", autocast=False)
"""Seconds-long CI setting on the random tiny chat model: every code path (the seed stage
included), nothing learned."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Every encoded item a run needs, built once per tokenizer."""

    train: dict[str, list[S.EncodedItem]]  # per ID task
    val: dict[str, list[S.EncodedItem]]  # per ID task
    test: dict[str, list[S.EncodedItem]]  # per suite task
    retention: dict[str, C.Batch]
    sizes: dict[str, dict[str, int]]
    chance: dict[str, float]


def _subset(items: list[Any], n: int, seed: str) -> list[Any]:
    order = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return [items[i] for i in sorted(order[:n])]


def build_data(cfg: PaperConfig, tokenizer: Any) -> Data:
    tasks = {name: S.build_task(name) for name in cfg.tasks}
    test = {name: S.encode_items(_subset(t.split("test"), cfg.test_items, name), tokenizer)
            for name, t in tasks.items()}
    retention = {}
    for name in RETENTION_TASKS:
        items = C.shuffled(list(C.CANDIDATE_OOD[name]().items), 12345)[:cfg.retention_items]
        retention[name] = C.encode_items(items, tokenizer)
    return Data(
        train={t: S.encode_items(_subset(tasks[t].split("train"), cfg.train_items or 10**9, t), tokenizer)
               for t in cfg.id_tasks},
        val={t: S.encode_items(tasks[t].split("val"), tokenizer) for t in cfg.id_tasks},
        test=test, retention=retention,
        sizes={name: {**{p: len(t.split(p)) for p in S.SPLITS}, "test_used": len(test[name])}
               for name, t in tasks.items()},
        chance={name: t.chance for name, t in tasks.items()},
    )


def epoch_batches(items: list[Any], batch_size: int, epochs: int, seed: int) -> list[list[Any]]:
    """Whole epochs, each a fresh seeded shuffle cut into batches (the last one of an epoch may be smaller)."""
    import random

    out = []
    for epoch in range(epochs):
        order = list(range(len(items)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        out += [[items[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data, id_task: str | None) -> dict[str, Any]:
    """Test accuracy on every suite task, the ID task's validation accuracy, and the retention probes."""
    device = next(model.parameters()).device
    out: dict[str, Any] = {"test": {name: S.accuracy(model, items) for name, items in data.test.items()}}
    if id_task is not None:
        out["val"] = S.accuracy(model, data.val[id_task])
    else:
        out["val"] = {t: S.accuracy(model, items) for t, items in data.val.items()}
    out["retention"] = {name: C.exact_match(model, b.to(device)) for name, b in data.retention.items()}
    return out


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def device() -> torch.device:
    """Where the study runs: the GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(cfg: PaperConfig) -> Any:
    """The autocast context of every forward pass of the study (bf16 when ``cfg.autocast``)."""
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=cfg.autocast)


def lr_at(step: int, total: int, warmup: int) -> float:
    """The multiplier of the base rate at ``step``: linear warmup over ``warmup`` steps, then
    linear decay to 0 at ``total`` (transformers' ``get_linear_schedule_with_warmup``)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def quantization_floors(cfg: PaperConfig, targets: list[tuple[str, torch.Tensor]]) -> tuple[list[float], str]:
    """The per-tensor floors of ``gallop_qf`` and where their format came from."""
    from gallop_kernels import score_floor

    if cfg.floor_format != "auto":
        formats = {name: cfg.floor_format for name, _ in targets}
        how = f"{cfg.floor_format} (set)"
    else:
        from gallop_kernels.models import gguf_quantization, gguf_source

        source = gguf_source(cfg.model)
        if source is None:
            raise ValueError("gallop_qf needs a quantized base: the model is not a GGUF file; set floor_format")
        formats = gguf_quantization(source)
        how = f"from {source.name}"
    return score_floor.floors(targets, formats, cfg.floor_fraction), how


def selection_stats(targets: list[tuple[str, torch.Tensor]], opt: Any, floors: list[float] | None) -> dict[str, Any]:
    """What a sparse selection picked: exact zeros, entries below the floor, and the input columns
    that took the most entries (per input width, with the share each would get uniformly)."""
    zeros = below = 0
    columns: dict[int, torch.Tensor] = {}
    for i, (name, p) in enumerate(targets):
        idx = opt.selected_indices(p).to(torch.int64).cpu()
        values = p.detach().reshape(-1).cpu()[idx]
        zeros += int((values == 0).sum())
        if floors is not None:
            below += int((values.abs() < floors[i]).sum())
        width = p.shape[1]
        counts = torch.bincount(idx % width, minlength=width)
        columns[width] = columns.get(width, torch.zeros(width, dtype=torch.int64)) + counts
    top = {}
    for width, counts in columns.items():
        total = int(counts.sum())
        best = torch.topk(counts, min(5, width))
        top[str(width)] = {"selected": total, "uniform_share": total / width,
                           "top": [[int(c), int(n)] for c, n in zip(best.indices, best.values)]}
    return {"zeros": zeros, "below_floor": below if floors is not None else None, "columns": top}


def run_one(cfg: PaperConfig, data: Data, key: Key, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune a fresh copy of the base model on ``key.id_task``; returns what it measured."""
    from gallop_kernels import SparseAdamW
    from gallop_kernels.phase_one import accumulate, optimizer_sink, select_from_sink

    t0, c0 = time.perf_counter(), time.process_time()
    dev = device()
    model, _, _ = load(cfg.model)
    model.to(dev)
    model.train()
    targets = target_parameters(model)  # freezes all but the projections
    n_linear = sum(p.numel() for _, p in targets)
    budget = lora_budget(targets, key.rank) if key.rank is not None else None
    density = budget / n_linear if budget is not None else None
    plan = epoch_batches(data.train[key.id_task], cfg.batch_size, cfg.epochs, key.seed)
    total = len(plan)
    warmup = math.ceil(cfg.warmup_ratio * total)
    run_seed = 1_000 * key.seed + METHODS.index(key.method)
    extra: dict[str, Any] = {}
    t_select = 0.0
    if key.method in ("full", "lora"):
        model, opt, params = dense_setup(model, key.method, key.rank, key.lr, run_seed, budget)
        trainable = sum(p.numel() for p in params)
    else:
        ts = time.perf_counter()
        floors = None
        if key.method == "sift":
            opt = SparseAdamW(sift_groups(targets, density), lr=key.lr, weight_decay=0.0, score="gradient")
            calibration = plan[:1]  # SIFT: the gradient of the first training micro-batch
        else:
            if key.method == "gallop_qf":
                floors, extra["floor_source"] = quantization_floors(cfg, targets)
            opt = SparseAdamW(targets, lr=key.lr, weight_decay=0.0, density=density,
                              score=SPARSE_SCORES[key.method], seed=run_seed, score_floor=floors)
            picks = epoch_batches(data.train[key.id_task], cfg.batch_size, 1, key.seed + 7_777)
            picks = [b for b in picks if b][:math.ceil(cfg.calibration_examples / cfg.batch_size)]
            calibration = [] if key.method in ("pafi", "random") else picks
        if calibration:
            sink = optimizer_sink(opt)
            n = sum(len(b) for b in calibration)
            with precision(cfg):
                accumulate(sink, calibration, lambda items: S.loss(model, items) * len(items) / n, average=False)
            select_from_sink(opt, sink)
        else:
            opt.select()  # PaFi, random: the score needs no gradient
        trainable = opt.num_selected
        t_select = time.perf_counter() - ts
        extra["selection"] = selection_stats(targets, opt, floors)
        if log:
            log(f"    {key.method} r{key.rank}: selected {trainable:,} entries in {t_select:.0f} s")
    losses, norms = [], []
    for step, items in enumerate(plan):
        for g in opt.param_groups:
            g["lr"] = key.lr * lr_at(step, total, warmup)
        with precision(cfg):
            loss = S.loss(model, items)
        loss.backward()
        if isinstance(opt, SparseAdamW):
            norm = opt.clip_grad_norm_(cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(float(norm))
        if log and (step + 1) % 10 == 0:
            log(f"    {key.method} r{key.rank} lr {key.lr:g} seed {key.seed}: step {step + 1}/{total} "
                f"loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    t_train = time.perf_counter() - t0
    with precision(cfg):
        result = evaluate(model, data, key.id_task)
    return {**asdict(key), "trainable": trainable, "budget": budget, "density": density, "steps": total,
            "warmup_steps": warmup, "losses": losses, "grad_norms": norms, **result, **extra,
            "seconds": time.perf_counter() - t0, "train_seconds": t_train, "select_seconds": t_select,
            "cpu_seconds": time.process_time() - c0, "device": str(dev)}


# ---------------------------------------------------------------------------------------------
# Metrics, the learning-rate rule and the fronts (pure functions of the raw results)
# ---------------------------------------------------------------------------------------------


def ood_tasks(raw: dict[str, Any], id_task: str) -> list[str]:
    return [t for t in raw["config"]["tasks"] if t != id_task]


def metrics(raw: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The paper's metrics of one run against the zero-shot base: ID accuracy, mean OOD accuracy,
    mean forget ratio max(0, (base − acc) / base) over the OOD tasks, collapse rate (OOD tasks at
    <= the collapse threshold), the share of OOD tasks at or below chance, and the retention probes."""
    base = raw["vanilla"]["test"]
    others = ood_tasks(raw, run["id_task"])
    threshold = raw["config"]["collapse_threshold"]
    forget = [max(0.0, (base[t] - run["test"][t]) / base[t]) if base[t] > 0 else math.nan for t in others]
    valid = [f for f in forget if not math.isnan(f)]
    chance = raw["chance"]
    ret_base = raw["vanilla"]["retention"]
    ret = run["retention"]
    ret_mean = sum(ret.values()) / len(ret)
    ret_base_mean = sum(ret_base.values()) / len(ret_base)
    return {
        "id_accuracy": run["test"][run["id_task"]],
        "id_gain": run["test"][run["id_task"]] - base[run["id_task"]],
        "ood_accuracy": sum(run["test"][t] for t in others) / len(others),
        "forget_ratio": sum(valid) / len(valid) if valid else math.nan,
        "forget_per_task": dict(zip(others, forget)),
        "collapse_rate": sum(run["test"][t] <= threshold for t in others) / len(others),
        "at_chance_rate": sum(run["test"][t] <= chance[t] for t in others) / len(others),
        "retention": ret_mean,
        "retention_forget": max(0.0, (ret_base_mean - ret_mean) / ret_base_mean) if ret_base_mean > 0 else math.nan,
    }


def choose_lr(runs: Iterable[dict[str, Any]], id_task: str, method: str, rank: int | None,
              tolerance: float, seed: int = 0) -> float | None:
    """The stated rule: the smallest rate whose ID validation accuracy is within ``tolerance`` of
    the best on the grid (seed ``seed``); None when no run is there yet."""
    cand = [r for r in runs if r["id_task"] == id_task and r["method"] == method and r["rank"] == rank
            and r["seed"] == seed]
    if not cand:
        return None
    best = max(r["val"] for r in cand)
    return min(r["lr"] for r in cand if r["val"] >= best - tolerance - 1e-12)


def pareto_front(points: list[tuple[float, float, Any]]) -> list[Any]:
    """The tags of the non-dominated (x, y, tag) points, both coordinates larger-is-better
    (a point equal to another on both counts is kept once: the first)."""
    front = []
    for i, (x, y, tag) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y and (x2 > x or y2 > y)) or (x2 == x and y2 == y and j < i)
                        for j, (x2, y2, _) in enumerate(points) if j != i)
        if not dominated:
            front.append(tag)
    return front


def front_keys(raw: dict[str, Any], id_task: str, method: str) -> list[Key]:
    """The seed-0 points of ``method`` on ``id_task`` that make up its ID–OOD Pareto front."""
    points = []
    for r in raw["runs"]:
        if r["id_task"] == id_task and r["method"] == method and r["seed"] == 0:
            m = metrics(raw, r)
            points.append((m["id_accuracy"], m["ood_accuracy"], Key.of(r)))
    return pareto_front(points)


# ---------------------------------------------------------------------------------------------
# The plan: stages, most informative first
# ---------------------------------------------------------------------------------------------


def grid_keys(cfg: PaperConfig, id_task: str, ranks: Iterable[int], methods: Iterable[str],
              every_rate: bool = True) -> list[Key]:
    """Seed-0 keys of ``methods`` at ``ranks``; unless ``every_rate`` (the first ID task at the
    first rank), the methods outside ``every_rate_methods`` run the middle ``other_rank_rates``
    rates of their grid only.

    Ordered middle rates first (every method's middle rate, then the ones next to it, ...), so
    that a stage stopped early has covered every method before it refines any."""
    keys = []
    for method in methods:
        grid = list(cfg.lr_grid[method])
        if not every_rate and method not in cfg.every_rate_methods and len(grid) > cfg.other_rank_rates:
            cut = (len(grid) - cfg.other_rank_rates) // 2
            grid = grid[cut:cut + cfg.other_rank_rates]
        middle = (len(grid) - 1) / 2
        for rank in ([None] if method == "full" else ranks):
            keys += [(abs(i - middle), i, Key(id_task, method, rank, float(lr), 0)) for i, lr in enumerate(grid)]
    return [k for _, _, k in sorted(keys, key=lambda t: (t[0], -t[1]))]


def stages(cfg: PaperConfig, raw: dict[str, Any] | None = None) -> list[tuple[str, list[Key]]]:
    """The study's stages in the order they run. Seed stages depend on the fronts of the seed-0
    runs finished so far (``raw``), so they are listed after the grid stages they follow."""
    first, others = cfg.ranks[0], cfg.ranks[1:]
    out = []
    for i, id_task in enumerate(cfg.id_tasks):
        out.append((f"{id_task}: every method, rank {first}",
                    grid_keys(cfg, id_task, [first], cfg.methods, every_rate=i == 0)))
        if id_task in cfg.full_budgets_on and others:
            out.append((f"{id_task}: ranks {', '.join(map(str, others))}",
                        grid_keys(cfg, id_task, others, [m for m in cfg.methods if m != "full"], every_rate=False)))
    seeded = [s for s in cfg.seeds if s != 0]
    if seeded:
        for id_task in cfg.id_tasks:
            keys = []
            if raw is not None:
                for method in cfg.methods:
                    for k in front_keys(raw, id_task, method):
                        keys += [replace(k, seed=s) for s in seeded]
            out.append((f"{id_task}: seeds {', '.join(map(str, seeded))} on the Pareto fronts", keys))
    return out


# ---------------------------------------------------------------------------------------------
# The study: vanilla, stages; raw.json written after every run
# ---------------------------------------------------------------------------------------------


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: PaperConfig) -> None:
    """A worker process: its own threads setting and encoded data (built once)."""
    quiet_worker(cfg.threads)
    _, tokenizer, _ = load(cfg.model)
    _WORKER.update(cfg=cfg, data=build_data(cfg, tokenizer))


def _worker_run(key: Key) -> dict[str, Any]:
    return run_one(_WORKER["cfg"], _WORKER["data"], key, log=lambda line: print(line, file=sys.stderr, flush=True))


def run_study(cfg: PaperConfig, raw_path: str | None = None, log: Callable[[str], None] | None = None,
              max_runs: int | None = None) -> dict[str, Any]:
    """Run (or continue) the study; returns the raw results, also written to ``raw_path`` after
    every run. ``max_runs`` stops after that many new runs (a sitting of a longer study)."""
    cfg.check()
    with study_session(cfg.methods, cfg.threads):
        return _run(cfg, raw_path, log or (lambda s: print(s, file=sys.stderr, flush=True)), max_runs)


def _run(cfg: PaperConfig, raw_path: str | None, log: Callable[[str], None], max_runs: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    raw = load_previous(raw_path, cfg.fingerprint(), log, refuse_other=True)
    model, tokenizer, source = load(cfg.model, log)
    data = build_data(cfg, tokenizer)
    if raw is None:
        targets = target_parameters(model)
        raw = {"protocol": "paper", "config": asdict(cfg), "fingerprint": cfg.fingerprint(),
               "model": cfg.model or "embedded default", "model_source": source,
               "model_name": source.split(" (")[0], "num_params": sum(p.numel() for p in model.parameters()),
               "num_target_params": sum(p.numel() for _, p in targets),
               "budgets": {}, "sizes": data.sizes, "chance": data.chance,
               "descriptions": {t: S.CANDIDATES[t][0] for t in cfg.tasks}, "vanilla": None, "runs": [],
               "machine": machine(), "sessions": []}
        ts, cs = time.perf_counter(), time.process_time()
        model.to(device())
        with precision(cfg):
            vanilla = evaluate(model, data, None)
        raw["vanilla"] = {**vanilla, "seconds": time.perf_counter() - ts,
                          "cpu_seconds": time.process_time() - cs}
        save(raw, raw_path)
    targets = target_parameters(model)
    raw["budgets"].update({str(r): lora_budget(targets, r) for r in cfg.ranks})
    del model, targets
    session: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg(),
                               "jobs": cfg.jobs, "threads": cfg.threads, "device": str(device()), "new_runs": 0}
    raw["sessions"].append(session)
    for name in ("methods", "ranks", "seeds", "id_tasks", "full_budgets_on", "every_rate_methods", "other_rank_rates",
                 "lr_tolerance"):
        raw["config"][name] = asdict(cfg)[name]
    raw["config"]["lr_grid"] = {m: list(v) for m, v in cfg.lr_grid.items()}
    van = raw["vanilla"]
    log("reproduce: base model test accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in van["test"].items()))

    done = {Key.of(r) for r in raw["runs"]}

    def record(r: dict[str, Any]) -> None:
        raw["runs"].append(r)
        done.add(Key.of(r))
        session["new_runs"] += 1
        session["loadavg_end"] = loadavg()
        session["seconds"] = time.perf_counter() - t0
        save(raw, raw_path)
        m = metrics(raw, r)
        log(f"  [{len(raw['runs'])}] {r['id_task']} {r['method']:<9} r{r['rank']} lr {r['lr']:g} seed {r['seed']}: "
            f"ID {m['id_accuracy']:.3f} OOD {m['ood_accuracy']:.3f} forget {m['forget_ratio']:.3f} "
            f"retention {m['retention']:.3f} ({r['cpu_seconds']:.0f} CPU s, {time.perf_counter() - t0:.0f} s)")

    def execute(keys: list[Key]) -> bool:
        """Run the missing ``keys``; False once ``max_runs`` is reached."""
        todo = [k for k in dict.fromkeys(keys) if k not in done]
        if max_runs is not None:
            todo = todo[:max(0, max_runs - session["new_runs"])]
        if cfg.jobs == 1 or len(todo) <= 1:
            for key in todo:
                record(run_one(cfg, data, key, log=log))
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(cfg.jobs, len(todo)), _worker_init, (cfg,)) as pool:
                for r in pool.imap_unordered(_worker_run, todo):
                    record(r)
        return max_runs is None or session["new_runs"] < max_runs

    grid = [st for st in stages(cfg) if "seeds" not in st[0]]
    for name, keys in grid:
        log(f"reproduce: stage {name} ({sum(k not in done for k in keys)} of {len(keys)} runs to do)")
        if not execute(keys):
            break
    else:
        for name, keys in stages(cfg, raw)[len(grid):]:
            log(f"reproduce: stage {name} ({sum(k not in done for k in keys)} of {len(keys)} runs to do)")
            if not execute(keys):
                break
    session["seconds"] = time.perf_counter() - t0
    session["loadavg_end"] = loadavg()
    save(raw, raw_path)
    return raw


def pilot(cfg: PaperConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The base model on every candidate task (`suite.CANDIDATES`, whole test and validation
    splits, the study's precision): the measurement the suite was chosen by."""
    with study_session((), cfg.threads):
        return _pilot(cfg, log or (lambda s: print(s, file=sys.stderr, flush=True)))


def _pilot(cfg: PaperConfig, log: Callable[[str], None]) -> dict[str, Any]:
    model, tokenizer, source = load(cfg.model, log)
    model.to(device())
    out: dict[str, Any] = {"model_source": source, "autocast": cfg.autocast, "machine": machine(), "tasks": {}}
    for name in S.CANDIDATES:
        task = S.build_task(name)
        row: dict[str, Any] = {"description": S.CANDIDATES[name][0], "chance": task.chance,
                               "items": {p: len(task.split(p)) for p in S.SPLITS}, "in_suite": name in S.SUITE}
        for part in ("val", "test"):
            items = S.encode_items(task.split(part), tokenizer)
            c0 = time.process_time()
            with precision(cfg):
                row[part] = S.accuracy(model, items)
            row[f"{part}_cpu_seconds"] = time.process_time() - c0
            row[f"{part}_tokens"] = S.token_count(items)
        out["tasks"][name] = row
        log(f"pilot: {name:<12} chance {row['chance']:.3f}  test {row['test']:.3f}  val {row['val']:.3f}")
    return out


def selections(cfg: PaperConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What GaLLoP selects on the base, plain and floored, at every budget: per ID task (its
    calibration gradient of seed 0, as the study's runs use), the selection of plain GaLLoP, of
    the study's quantization floor (``floor_fraction`` × the median step), and of the floor at the
    smallest non-zero |θ| of each tensor: exact zeros, entries below the quantization floor, the
    input columns that take most entries, and how much the sets overlap."""
    with study_session((), cfg.threads):
        return _selections(cfg, log or (lambda s: print(s, file=sys.stderr, flush=True)))


def _selections(cfg: PaperConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from gallop_kernels import SparseAdamW, score_floor
    from gallop_kernels.phase_one import accumulate, optimizer_sink

    model, tokenizer, source = load(cfg.model, log)
    model.to(device())
    data = build_data(cfg, tokenizer)
    targets = target_parameters(model)
    n_linear = sum(p.numel() for _, p in targets)
    floors, how = quantization_floors(cfg, targets)
    variants = {"plain": None, "quantization floor": floors,
                "smallest non-zero": [score_floor.smallest_nonzero(p) for _, p in targets]}
    out: dict[str, Any] = {"model_source": source, "floor_source": how, "floor_fraction": cfg.floor_fraction,
                           "zeros": sum(int((p == 0).sum()) for _, p in targets),
                           "below_floor": sum(int((p.abs() < f).sum()) for (_, p), f in zip(targets, floors)),
                           "entries": n_linear, "tasks": {}}
    for id_task in cfg.id_tasks:
        opt = SparseAdamW(targets, lr=1.0, density=0.5)
        picks = epoch_batches(data.train[id_task], cfg.batch_size, 1, 7_777)
        picks = [b for b in picks if b][:math.ceil(cfg.calibration_examples / cfg.batch_size)]
        n = sum(len(b) for b in picks)
        sink = optimizer_sink(opt)
        with precision(cfg):
            accumulate(sink, picks, lambda items: S.loss(model, items) * len(items) / n, average=False)
        grads = {p: p.grad.detach().clone() for _, p in targets}
        model.zero_grad(set_to_none=True)
        rows = out["tasks"][id_task] = {}
        for rank in sorted(cfg.ranks):
            density = lora_budget(targets, rank) / n_linear
            chosen = {}
            for name, fl in variants.items():
                sel = SparseAdamW(targets, lr=1.0, density=density, score="gallop", score_floor=fl)
                sel.select(grads)
                chosen[name] = sel
                rows.setdefault(str(rank), {})[name] = selection_stats(targets, sel, floors)
            base = chosen["plain"]
            for name, sel in chosen.items():
                same = sum(int(torch.isin(sel.selected_indices(p), base.selected_indices(p)).sum()) for _, p in targets)
                rows[str(rank)][name]["shared_with_plain"] = same / max(1, sel.num_selected)
            log(f"selections: {id_task} rank {rank}: " + "; ".join(
                f"{k} zeros {v['zeros']:,}" for k, v in rows[str(rank)].items()))
    return out


__all__ = ["LABELS", "LR_GRID", "METHODS", "RETENTION_TASKS", "SMOKE", "Key", "PaperConfig", "choose_lr", "config_of",
           "epoch_batches", "front_keys", "lr_at", "metrics", "pareto_front", "pilot", "run_one", "run_study", "save",
           "selections", "stages"]
