"""The small-scale reproduction: pretrain a tiny Llama on a task mixture, fine-tune it on a new task
with each method at matched trainable-parameter budgets, and measure ID/OOD accuracy, forget ratio
and collapse rate over seeds.

Budgets are matched to LoRA: LoRA of rank r on every linear layer but the head trains
``r * sum(in + out)`` parameters; the sparse methods (GaLLoP, gradient/SIFT-SAFT, magnitude/PaFi,
random) train the same number of entries, selected globally over the same linear weights
(density ``r * sum(in + out) / sum(in * out)``). Full fine-tuning (AdamW on every parameter) is the
unconstrained reference. Every (seed, method, budget) run is independent and seeded, so results do
not depend on how runs are scheduled over worker processes.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from gallop_kernels.reproduce import tasks as T

METHODS = ("full", "lora", "gallop", "gradient", "magnitude", "random")
SPARSE_METHODS = ("gallop", "gradient", "magnitude", "random")
METHOD_LABELS = {
    "full": "Full FT (AdamW)",
    "lora": "LoRA (peft)",
    "gallop": "GaLLoP",
    "gradient": "gradient (SIFT/SAFT)",
    "magnitude": "magnitude (PaFi)",
    "random": "random",
}


@dataclass(frozen=True)
class ReproConfig:
    """Everything that decides a reproduction; the defaults are what ``gallop reproduce`` runs."""

    seeds: tuple[int, ...] = (0, 1, 2)
    lora_ranks: tuple[int, ...] = (1, 4, 16)  # budgets; sparse densities are matched to them
    methods: tuple[str, ...] = METHODS
    num_symbols: int = 10
    length: int = 6
    hidden_size: int = 128
    num_layers: int = 2
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_steps: int = 200
    finetune_batch: int = 32
    lr_full: float = 3e-4
    lr_lora: float = 3e-3
    lr_sparse: float = 3e-3
    calibration_fraction: float = 0.05  # d_s of the fine-tuning set (steps x batch examples)
    eval_examples: int = 256
    collapse_threshold: float = 0.01
    jobs: int = 2
    cache_dir: str | None = None  # keep pretrained weights here, keyed by the pretraining settings

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
        if not self.seeds:
            raise ValueError("need at least one seed")
        if not self.lora_ranks or any(r < 1 for r in self.lora_ranks):
            raise ValueError(f"lora_ranks must be positive integers, got {self.lora_ranks}")
        for name in ("num_symbols", "length", "hidden_size", "num_layers", "pretrain_batch",
                     "finetune_steps", "finetune_batch", "eval_examples", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError("pretrain_steps must be >= 0")
        if not 0.0 < self.calibration_fraction <= 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1], got {self.calibration_fraction}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (4 attention heads)")


# Seconds-long settings for CI: every code path (all methods, metrics, table, plot), no learning.
SMOKE = ReproConfig(seeds=(0,), lora_ranks=(1,), num_symbols=5, length=3, hidden_size=16, num_layers=1,
                    pretrain_steps=4, pretrain_batch=16, finetune_steps=2, finetune_batch=8, eval_examples=16,
                    calibration_fraction=0.25, jobs=1)


# ----------------------------------------------------------------------------------------------
# Model, budgets
# ----------------------------------------------------------------------------------------------


def build_model(cfg: ReproConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=T.vocab_size(cfg.num_symbols), hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=T.seq_len(cfg.length), tie_word_embeddings=False,
        use_cache=False, pad_token_id=T.PAD, bos_token_id=T.BOS, eos_token_id=T.SEP,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every linear layer but the output head: LoRA's and the sparse methods' targets."""
    head = model.get_output_embeddings()
    return [(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head]


def budget(model: torch.nn.Module, rank: int) -> tuple[int, float]:
    """Trainable parameters of LoRA rank ``rank`` and the matched sparse density."""
    shapes = linear_shapes(model)
    n_lora = rank * sum(i + o for i, o in shapes)
    n_linear = sum(i * o for i, o in shapes)
    return n_lora, min(1.0, n_lora / n_linear)


# ----------------------------------------------------------------------------------------------
# Data and evaluation
# ----------------------------------------------------------------------------------------------


def eval_sets(cfg: ReproConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out examples of every task, the same for every seed and method."""
    gen = torch.Generator().manual_seed(1_000_003)
    return {t.name: T.make_batch(t, cfg.eval_examples, cfg.length, cfg.num_symbols, gen, "eval")
            for t in T.ALL_TASKS}


def evaluate(model: torch.nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {name: T.exact_match(model, ids, labels) for name, (ids, labels) in sets.items()}


def _loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


# ----------------------------------------------------------------------------------------------
# One pretraining, one fine-tuning
# ----------------------------------------------------------------------------------------------


def _cache_path(cfg: ReproConfig, seed: int) -> str | None:
    if cfg.cache_dir is None:
        return None
    import hashlib

    key = (T.vocab_size(cfg.num_symbols), [t.name for t in T.PRETRAIN_TASKS], cfg.num_symbols, cfg.length,
           cfg.hidden_size, cfg.num_layers, cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr,
           cfg.eval_examples, seed)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return os.path.join(cfg.cache_dir, f"pretrained-{digest}.pt")


def pretrain(cfg: ReproConfig, seed: int) -> dict[str, Any]:
    """Dense AdamW on the pre-training mixture (warm-up, cosine decay). Returns weights and accuracies.

    With ``cfg.cache_dir`` the result is stored there and reused by later runs with the same
    pretraining settings (its recorded ``seconds`` are those of the run that computed it).
    """
    cache = _cache_path(cfg, seed)
    if cache is not None and os.path.isfile(cache):
        return torch.load(cache, weights_only=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model(cfg, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = cfg.pretrain_steps
    warmup = max(1, min(50, steps // 10))
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cfg.pretrain_lr * scale
        ids, labels = T.mixture_batch(T.PRETRAIN_TASKS, cfg.pretrain_batch, cfg.length, cfg.num_symbols, gen)
        _loss(model, ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    accs = evaluate(model, eval_sets(cfg))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = {"seed": seed, "state": state, "accuracy": accs, "seconds": time.perf_counter() - t0,
              "cpu_seconds": time.process_time() - c0}
    if cache is not None:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        torch.save(result, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return result


def finetune(cfg: ReproConfig, seed: int, state: dict[str, torch.Tensor], method: str, rank: int | None
             ) -> dict[str, Any]:
    """Fine-tune the pretrained weights on the ID task with one method; returns the per-task accuracies."""
    from gallop_kernels import SparseAdamW
    from gallop_kernels.integrations.transformers import select_trainable

    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model(cfg, seed)
    model.load_state_dict(state)
    run_seed = 7919 * seed + 104_729 * (rank or 0) + METHODS.index(method)
    gen = torch.Generator().manual_seed(20_000 + seed)  # the same fine-tuning data for every method
    n = cfg.finetune_steps * cfg.finetune_batch
    train_ids, train_labels = T.make_batch(T.FINETUNE_TASK, n, cfg.length, cfg.num_symbols, gen)
    density = None
    if method == "full":
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr_full, weight_decay=0.0)
        trainable = sum(p.numel() for p in params)
        lr = cfg.lr_full
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(run_seed)  # LoRA's A init
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr_lora, weight_decay=0.0)
        trainable = sum(p.numel() for p in params)
        lr = cfg.lr_lora
    else:
        _, density = budget(model, rank)
        names = select_trainable(model)
        params = [model.get_parameter(nm) for nm in names]
        opt = SparseAdamW(list(zip(names, params)), lr=cfg.lr_sparse, weight_decay=0.0, density=density,
                          score=method, seed=run_seed)
        # Phase one: the mean gradient over a seeded random d_s fraction of the fine-tuning set.
        count = min(n, max(1, math.ceil(cfg.calibration_fraction * n - 1e-9)))
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(run_seed))[:count]
        for s in range(0, count, cfg.finetune_batch):
            idx = pick[s:s + cfg.finetune_batch]
            (_loss(model, train_ids[idx], train_labels[idx]) * (len(idx) / count)).backward()
        opt.select()
        opt.zero_grad(set_to_none=True)
        trainable = opt.num_selected
        lr = cfg.lr_sparse
    model.train()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run_seed + 1))
    losses = []
    for step in range(cfg.finetune_steps):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / cfg.finetune_steps)  # linear decay
        idx = order[step * cfg.finetune_batch:(step + 1) * cfg.finetune_batch]
        loss = _loss(model, train_ids[idx], train_labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    accs = evaluate(model, eval_sets(cfg))
    return {"seed": seed, "method": method, "rank": rank, "density": density, "trainable": trainable,
            "lr": lr, "final_loss": sum(losses[-10:]) / len(losses[-10:]), "accuracy": accs,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


# ----------------------------------------------------------------------------------------------
# Scheduling
# ----------------------------------------------------------------------------------------------


def _worker_init() -> None:
    torch.set_num_threads(1)  # N single-threaded workers beat one N-threaded process on tiny models


def _pretrain_job(args):
    return pretrain(*args)


def _finetune_job(args):
    return finetune(*args)


def jobs_of(cfg: ReproConfig, seed: int) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    if "full" in cfg.methods:
        out.append(("full", None))
    for rank in cfg.lora_ranks:
        out.extend((m, rank) for m in cfg.methods if m != "full")
    return out


def _log_pretrained(log: Callable[[str], None], seed: int, result: dict[str, Any]) -> None:
    acc = result["accuracy"]
    ood = [acc[t.name] for t in T.PRETRAIN_TASKS]
    log(f"  pretrained seed {seed} in {result['seconds']:.1f} s: OOD {sum(ood) / len(ood):.3f} "
        f"(min {min(ood):.3f}), ID {acc[T.FINETUNE_TASK.name]:.3f}")


def run_reproduction(cfg: ReproConfig = ReproConfig(),
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything; returns the raw results (JSON-ready)."""
    cfg.check()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    probe = build_model(cfg, 0)
    budgets = {r: budget(probe, r) for r in cfg.lora_ranks}
    total_jobs = len(cfg.seeds) * len(jobs_of(cfg, 0))
    log(f"reproduce: {len(cfg.seeds)} seed(s) x {len(jobs_of(cfg, 0))} fine-tunes = {total_jobs} runs, "
        f"{cfg.jobs} worker(s); model {sum(p.numel() for p in probe.parameters()):,} params")
    pretrained: dict[int, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        runs.append(r)
        acc = r["accuracy"]
        ood = [v for k, v in acc.items() if k != T.FINETUNE_TASK.name]
        log(f"  [{len(runs)}/{total_jobs}] seed {r['seed']} {r['method']:<9} rank {r['rank']} "
            f"ID {acc[T.FINETUNE_TASK.name]:.3f} OOD {sum(ood) / len(ood):.3f} ({r['seconds']:.1f} s, "
            f"{time.perf_counter() - t0:.0f} s elapsed)")

    if cfg.jobs == 1:
        for seed in cfg.seeds:
            pretrained[seed] = pretrain(cfg, seed)
            _log_pretrained(log, seed, pretrained[seed])
            for method, rank in jobs_of(cfg, seed):
                done(finetune(cfg, seed, pretrained[seed]["state"], method, rank))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(cfg.jobs, initializer=_worker_init) as pool:
            pre = {s: pool.apply_async(_pretrain_job, ((cfg, s),)) for s in cfg.seeds}
            pending = []
            for seed in cfg.seeds:
                pretrained[seed] = pre[seed].get()
                _log_pretrained(log, seed, pretrained[seed])
                for method, rank in jobs_of(cfg, seed):
                    pending.append(pool.apply_async(
                        _finetune_job, ((cfg, seed, pretrained[seed]["state"], method, rank),), callback=done))
            for p in pending:
                p.get()
    runs.sort(key=lambda r: (r["seed"], METHODS.index(r["method"]), r["rank"] or 0))
    wall = time.perf_counter() - t0
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "config": asdict(cfg),
        "id_task": T.FINETUNE_TASK.name,
        "ood_tasks": [t.name for t in T.PRETRAIN_TASKS],
        "budgets": {str(r): {"trainable": n, "density": d} for r, (n, d) in budgets.items()},
        "num_params": sum(p.numel() for p in probe.parameters()),
        "vanilla": {str(s): {"accuracy": p["accuracy"], "seconds": p["seconds"], "cpu_seconds": p.get("cpu_seconds")}
                    for s, p in pretrained.items()},
        "runs": runs,
        "wall_seconds": wall,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": load_end},
    }


def smoke_config(**overrides: Any) -> ReproConfig:
    return replace(SMOKE, **overrides)


__all__ = ["METHODS", "METHOD_LABELS", "ReproConfig", "SMOKE", "budget", "finetune", "pretrain",
           "run_reproduction", "smoke_config"]
