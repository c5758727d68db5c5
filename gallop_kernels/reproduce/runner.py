"""The earlier study, one new task against six unrelated probes: ``gallop reproduce --protocol probes``
(docs/reproduction.md; the paper's protocol is `reproduce/paper.py`).

SmolLM2-135M-Instruct is fine-tuned on the ``category`` task (the category of a word, in one word;
see `gallop_kernels/chat_tasks.py`) with each method at one matched trainable-parameter budget, and
evaluated on held-out ``category`` words (ID) and on six open-answer probes the base model already
answers (OOD).

Methods (the sparse ones train exactly the budget, over the same projection weights):

- ``full``: ``torch.optim.AdamW`` on every parameter.
- ``lora``: peft LoRA of rank r on q/k/v/o/gate/up/down; its trainable count *is* the budget.
- ``gallop``: one global selection by |g| / (|θ| + ε) from the mean gradient of a few calibration batches.
- ``sift``: as SIFT's code does it: per tensor, top-|g| of the *first micro-batch*, k = min(int(ρN) + 1, N).
- ``saft``: one global selection by |g| (the earlier "gradient" row; SAFT-like, not SIFT).
- ``pafi``: one global selection of the smallest |θ| (no gradient needed).
- ``random``: a seeded random global selection.

A learning rate per method is chosen on the ``category`` validation words (best accuracy, ties to the
lower validation loss) from ``lr_grid`` with the tuning seed; the chosen rate then runs on every seed.
Every finished run is appended to ``raw.json`` at once, and a rerun with the same settings skips
the runs already there, so an interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from gallop_kernels import chat_tasks as C
from gallop_kernels.extras import require
from gallop_kernels.phase_one import accumulate, optimizer_sink, select_from_sink
from gallop_kernels.quiet import no_bitsandbytes_notice, progress_bars

TINY = "tiny"  # the model spec of the smoke settings: a random tiny chat Llama (`gallop_kernels/toy.py`)
METHODS = ("full", "lora", "gallop", "sift", "saft", "pafi", "random")
SPARSE_SCORES = {"gallop": "gallop", "sift": "gradient", "saft": "gradient", "pafi": "magnitude", "random": "random"}
METHOD_LABELS = {
    "full": "Full FT (AdamW)",
    "lora": "LoRA (peft)",
    "gallop": "GaLLoP",
    "sift": "SIFT (per tensor, |g| of 1 batch)",
    "saft": "SAFT-like (global |g|)",
    "pafi": "PaFi (smallest |θ|)",
    "random": "random",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OOD_TASKS = ("opposites", "plurals", "capitals", "languages", "next_number", "addition")
DEFAULT_LR_GRID = {
    "full": (1e-5, 3e-5, 1e-4),
    "lora": (3e-4, 1e-3, 3e-3),
    "gallop": (3e-4, 1e-3, 3e-3),
    "sift": (3e-4, 1e-3, 3e-3),
    "saft": (3e-4, 1e-3, 3e-3),
    "pafi": (3e-4, 1e-3, 3e-3),
    "random": (3e-4, 1e-3, 3e-3),
}


def check_lr_grid(methods: tuple[str, ...], lr_grid: dict[str, tuple[float, ...]]) -> None:
    """Every method has a non-empty list of positive learning rates."""
    for m in methods:
        grid = lr_grid.get(m)
        if not grid or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in grid):
            raise ValueError(f"lr_grid[{m!r}] must be a non-empty list of positive learning rates, got {grid}")


@dataclass(frozen=True)
class ReproConfig:
    """Everything that decides a reproduction; the defaults are what ``gallop reproduce`` runs."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; TINY: the random tiny chat model
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    lora_rank: int = 4  # the budget: LoRA's trainable count at this rank
    steps: int = 24
    batch_size: int = 8
    calibration_batches: int = 4  # phase one of the global sparse methods (SIFT uses exactly one)
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LR_GRID))
    tune_seed: int = 0
    id_task: str = "category"
    ood_tasks: tuple[str, ...] = OOD_TASKS
    max_ood_items: int | None = 24  # per OOD task (None: all); the same seeded subset for every run
    collapse_threshold: float = 0.01
    threads: int = 1
    jobs: int = 1  # worker processes (each single-threaded by default)

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
        if not self.seeds:
            raise ValueError("need at least one seed")
        bad_tasks = [t for t in self.ood_tasks if t not in C.CANDIDATE_OOD]
        if bad_tasks or not self.ood_tasks:
            raise ValueError(f"unknown or no OOD task(s) {bad_tasks}; choose from {sorted(C.CANDIDATE_OOD)}")
        if self.id_task not in C.ID_TASKS:
            raise ValueError(f"unknown ID task {self.id_task!r}; choose from {sorted(C.ID_TASKS)}")
        for name in ("lora_rank", "steps", "batch_size", "calibration_batches", "threads", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_lr_grid(self.methods, self.lr_grid)

    def fingerprint(self) -> str:
        """What decides a run's result, so must match for earlier runs to be reused. Seeds, methods
        and the learning-rate grid may change between sessions: runs are keyed by (method, lr, seed)."""
        d = asdict(self)
        for k in ("seeds", "methods", "threads", "jobs", "lr_grid"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Seconds-long CI setting on the random tiny chat model: every code path, nothing learned.
SMOKE = ReproConfig(model=TINY, seeds=(0,), steps=2, batch_size=4, calibration_batches=1, lora_rank=1,
                    lr_grid={m: (1e-3,) for m in METHODS}, max_ood_items=4)


# ---------------------------------------------------------------------------------------------
# Model, budget, data
# ---------------------------------------------------------------------------------------------


def load(spec: str | None, log: Callable[[str], None] | None = None) -> tuple[Any, Any, str]:
    """A fresh float32 copy of the model, its tokenizer, and a description of where it came from."""
    if spec == TINY:
        from gallop_kernels.toy import tiny_chat_model

        return (*tiny_chat_model(), "random tiny chat Llama (gallop_kernels.toy, knows nothing)")
    from gallop_kernels.models import load_model_and_tokenizer, resolve_model

    resolved = resolve_model(spec, log=log)
    model, tokenizer = load_model_and_tokenizer(resolved.path)  # a folder, or the hub id itself
    return model, tokenizer, resolved.describe()


def target_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of the projections every method may train; everything else is frozen."""
    from gallop_kernels.integrations.targets import select_trainable  # not .transformers: no Trainer, peft import

    names = select_trainable(model, list(TARGETS))
    return [(n, model.get_parameter(n)) for n in names]


def lora_budget(targets: list[tuple[str, torch.Tensor]], rank: int) -> int:
    """Trainable parameters of LoRA rank ``rank`` on these weights: r * (in + out) each."""
    return rank * sum(p.shape[0] + p.shape[1] for _, p in targets)


def sift_k(numel: int, density: float) -> int:
    """SIFT's per-tensor count, ``min(int(ρN) + 1, N)`` (its code: ``int(numel * ratio) + 1``)."""
    return min(int(numel * density) + 1, numel)


def sift_groups(targets: list[tuple[str, torch.Tensor]], density: float) -> list[dict[str, Any]]:
    """One param group per tensor whose density makes SparseAdamW's k equal SIFT's k exactly."""
    from gallop_kernels.rules import k_for_density

    groups = []
    for name, p in targets:
        k = sift_k(p.numel(), density)
        d = k / p.numel()
        if k_for_density(p.numel(), d) != k:  # floor(d*N + 0.5) == k for d = k/N; checked, not assumed
            raise AssertionError(f"density {d!r} does not give k={k} for {name}")
        groups.append({"params": [(name, p)], "density": d})
    return groups


@dataclass
class Data:
    """Tokenized batches of every split, built once per tokenizer."""

    train: list[C.Item]
    train_batch: Callable[[list[C.Item]], C.Batch]
    id_val: C.Batch
    id_test: C.Batch
    ood: dict[str, C.Batch]


def build_data(cfg: ReproConfig, tokenizer: Any) -> Data:
    ood = {}
    for name in cfg.ood_tasks:
        items = list(C.CANDIDATE_OOD[name]().items)
        if cfg.max_ood_items is not None:
            items = C.shuffled(items, 12345)[:cfg.max_ood_items]
        ood[name] = C.encode_items(items, tokenizer)
    return Data(
        train=C.training_items(C.ID_TASKS[cfg.id_task], tokenizer),
        train_batch=lambda items: C.encode_items(items, tokenizer),
        id_val=C.encode_items(C.ID_TASKS[cfg.id_task].split("val"), tokenizer),
        id_test=C.encode_items(C.ID_TASKS[cfg.id_task].split("test"), tokenizer),
        ood=ood,
    )


def batches(items: list[C.Item], batch_size: int, steps: int, seed: int) -> list[list[C.Item]]:
    """``steps`` batches drawn in epochs, each epoch a fresh seeded shuffle."""
    out: list[list[C.Item]] = []
    epoch = 0
    pool: list[C.Item] = []
    while len(out) < steps:
        if len(pool) < batch_size:
            pool += C.shuffled(items, seed * 1000 + epoch)
            epoch += 1
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data) -> dict[str, Any]:
    """ID validation accuracy and loss, ID test accuracy, and the accuracy of every OOD task."""
    was = model.training
    model.eval()
    out = {"id_val": C.exact_match(model, data.id_val), "id_val_loss": C.loss(model, data.id_val).item(),
           "id_test": C.exact_match(model, data.id_test),
           "ood": {name: C.exact_match(model, b) for name, b in data.ood.items()}}
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# One fine-tuning run
# ---------------------------------------------------------------------------------------------


def dense_setup(model: torch.nn.Module, method: str, rank: int, lr: float, run_seed: int,
                budget: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """``(model, AdamW, its params)`` of full fine-tuning (every parameter) or LoRA (peft, rank
    ``rank``, α = 2·rank, no dropout, on `TARGETS`; its trainable count must equal ``budget``)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(run_seed)  # LoRA's A init
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                     target_modules=list(TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "lora" and sum(p.numel() for p in params) != budget:
        raise AssertionError(f"LoRA trains {sum(p.numel() for p in params)} parameters, the budget formula "
                             f"says {budget}")
    return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), params


def run_one(cfg: ReproConfig, data: Data, method: str, lr: float, seed: int,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune a fresh copy of the base model on ``cfg.id_task`` with one method; returns what it measured."""
    from gallop_kernels import SparseAdamW

    t0, c0 = time.perf_counter(), time.process_time()
    model, _, _ = load(cfg.model)
    model.train()
    targets = target_parameters(model)  # freezes all but the projections
    budget = lora_budget(targets, cfg.lora_rank)
    n_linear = sum(p.numel() for _, p in targets)
    density = budget / n_linear
    plan = batches(data.train, cfg.batch_size, cfg.steps, seed)
    run_seed = 1_000 * seed + METHODS.index(method)
    t_select = 0.0
    if method in ("full", "lora"):
        model, opt, params = dense_setup(model, method, cfg.lora_rank, lr, run_seed, budget)
        trainable = sum(p.numel() for p in params)
    else:
        ts = time.perf_counter()
        if method == "sift":
            opt = SparseAdamW(sift_groups(targets, density), lr=lr, weight_decay=0.0, score="gradient")
            calibration = plan[:1]  # SIFT: the gradient of the first training micro-batch
        else:
            opt = SparseAdamW(targets, lr=lr, weight_decay=0.0, density=density, score=SPARSE_SCORES[method],
                              seed=run_seed)
            picks = batches(data.train, cfg.batch_size, cfg.calibration_batches, seed + 7_777)
            calibration = [] if method in ("pafi", "random") else picks
        if calibration:
            sink = optimizer_sink(opt)
            accumulate(sink, calibration, lambda items: C.loss(model, data.train_batch(items)) / len(calibration),
                       average=False)
            select_from_sink(opt, sink)
        else:
            opt.select()  # PaFi, random: the score needs no gradient
        trainable = opt.num_selected
        t_select = time.perf_counter() - ts
        if log:
            log(f"    {method}: selected {trainable:,} entries in {t_select:.0f} s")
    losses = []
    for step, items in enumerate(plan):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / cfg.steps)  # linear decay to 0
        loss = C.loss(model, data.train_batch(items))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step + 1) % 10 == 0:
            log(f"    {method} lr {lr:g} seed {seed}: step {step + 1}/{cfg.steps} loss {losses[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    t_train = time.perf_counter() - t0
    result = evaluate(model, data)
    return {"method": method, "lr": lr, "seed": seed, "trainable": trainable, "budget": budget,
            "density": None if method in ("full", "lora") else density, "losses": losses, **result,
            "seconds": time.perf_counter() - t0, "train_seconds": t_train, "select_seconds": t_select,
            "cpu_seconds": time.process_time() - c0}


# ---------------------------------------------------------------------------------------------
# The schedule: vanilla, tuning, seeds; raw.json written as it goes
# ---------------------------------------------------------------------------------------------


def choose_lr(runs: list[dict[str, Any]], method: str, seed: int,
              grid: tuple[float, ...] | None = None) -> float | None:
    """Best ID validation accuracy among ``method``'s tuning runs (those of ``grid`` when given);
    ties go to the lower validation loss."""
    cand = [r for r in runs if r["method"] == method and r["seed"] == seed and (grid is None or r["lr"] in grid)]
    if not cand:
        return None
    best = max(cand, key=lambda r: (r["id_val"], -r["id_val_loss"], -r["lr"]))
    return best["lr"]


def machine() -> dict[str, Any]:
    """The machine a study ran on (recorded in its raw results)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def save(raw: dict[str, Any], path: str | None) -> None:
    """Write ``raw`` to ``path`` atomically (a temporary file, then a rename)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, default=str)
    os.replace(tmp, path)


def load_previous(path: str | None, fingerprint: str, log: Callable[[str], None],
                  refuse_other: bool = False) -> dict[str, Any] | None:
    """The raw results at ``path`` to continue, or None to start afresh (none there, unreadable,
    or made with other settings). ``refuse_other``: other settings raise ``ValueError`` instead
    of being overwritten."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        log(f"reproduce: {path} is unreadable; starting afresh")
        return None
    if raw.get("fingerprint") != fingerprint:
        if refuse_other:
            raise ValueError(f"{path} was made with other settings (fingerprint {raw.get('fingerprint')}, these are "
                             f"{fingerprint}); choose another --output or the same settings")
        log(f"reproduce: {path} was made with other settings; starting afresh (it will be overwritten)")
        return None
    return raw


def run_reproduction(cfg: ReproConfig = ReproConfig(), raw_path: str | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) everything; returns the raw results, also written to ``raw_path`` after every run."""
    cfg.check()
    with study_session(cfg.methods, cfg.threads):
        return _run(cfg, raw_path, log or (lambda s: print(s, file=sys.stderr, flush=True)))


@contextlib.contextmanager
def study_session(methods: tuple[str, ...], threads: int) -> Iterator[None]:
    """What a study runs inside: its extras present, ``threads`` torch threads, other libraries'
    progress bars and the bitsandbytes notice off; the thread count is restored afterwards."""
    require("gallop reproduce", "transformers", *(("peft",) if "lora" in methods else ()))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with progress_bars(False), no_bitsandbytes_notice():
            yield
    finally:
        torch.set_num_threads(previous_threads)


_WORKER: dict[str, Any] = {}


def quiet_worker(threads: int) -> None:
    """A worker process of a study: its threads, and quiet for its whole life (its log is the
    parent's stderr)."""
    torch.set_num_threads(threads)
    progress_bars(False).__enter__()
    no_bitsandbytes_notice().__enter__()


def _worker_init(cfg: ReproConfig) -> None:
    """A worker process: one thread, its own tokenized data (built once)."""
    quiet_worker(cfg.threads)
    _, tokenizer, _ = load(cfg.model)
    _WORKER.update(cfg=cfg, data=build_data(cfg, tokenizer))


def _worker_run(job: tuple[str, float, int]) -> dict[str, Any]:
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    return run_one(_WORKER["cfg"], _WORKER["data"], *job, log=log)


def _run(cfg: ReproConfig, raw_path: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    task = C.ID_TASKS[cfg.id_task]
    raw = load_previous(raw_path, cfg.fingerprint(), log)
    model, tokenizer, source = load(cfg.model, log)
    data = build_data(cfg, tokenizer)
    if raw is None:
        targets = target_parameters(model)
        raw = {"config": asdict(cfg), "fingerprint": cfg.fingerprint(), "model": cfg.model or "embedded default",
               "model_source": source, "model_name": source.split(" (")[0],
               "num_params": sum(p.numel() for p in model.parameters()),
               "num_target_params": sum(p.numel() for _, p in targets),
               "budget": lora_budget(targets, cfg.lora_rank), "id_task": task.name,
               "id_description": task.description, "id_items": {s: len(task.split(s)) for s in C.SPLITS},
               "ood_tasks": list(cfg.ood_tasks), "ood_items": {k: len(b) for k, b in data.ood.items()},
               "chance": {"id": task.chance}, "vanilla": None, "runs": [], "chosen_lr": {},
               "run_seconds": 0.0, "machine": machine(), "sessions": []}
        ts = time.perf_counter()
        raw["vanilla"] = {**evaluate(model, data), "seconds": time.perf_counter() - ts}
        save(raw, raw_path)
    del model
    session: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg(),
                               "jobs": cfg.jobs, "threads": cfg.threads}
    raw["sessions"].append(session)
    raw["config"]["seeds"], raw["config"]["methods"] = list(cfg.seeds), list(cfg.methods)
    raw["config"]["lr_grid"] = {m: list(v) for m, v in cfg.lr_grid.items()}
    van = raw["vanilla"]
    log(f"reproduce: base model ID val {van['id_val']:.3f} test {van['id_test']:.3f}; OOD "
        + ", ".join(f"{k} {v:.2f}" for k, v in van["ood"].items()))

    def have(method: str, lr: float, seed: int) -> bool:
        return any(r["method"] == method and r["lr"] == lr and r["seed"] == seed for r in raw["runs"])

    tuning = [(m, lr, cfg.tune_seed) for m in cfg.methods for lr in cfg.lr_grid[m]]
    total = len(tuning) + len(cfg.methods) * len([s for s in cfg.seeds if s != cfg.tune_seed])
    done_before = len(raw["runs"])

    def record(r: dict[str, Any]) -> None:
        raw["runs"].append(r)
        raw["run_seconds"] = raw.get("run_seconds", 0.0) + r["seconds"]
        session["loadavg_end"] = loadavg()
        session["seconds"] = time.perf_counter() - t0
        save(raw, raw_path)
        ood = sum(r["ood"].values()) / len(r["ood"])
        log(f"  [{len(raw['runs'])}/{total}] {r['method']:<6} lr {r['lr']:g} seed {r['seed']}: ID val "
            f"{r['id_val']:.3f} test {r['id_test']:.3f} OOD {ood:.3f} loss {r['losses'][-1]:.3f} "
            f"({r['seconds']:.0f} s, {time.perf_counter() - t0:.0f} s this session)")

    def execute(jobs: list[tuple[str, float, int]]) -> None:
        jobs = [j for j in jobs if not have(*j)]
        if cfg.jobs == 1 or len(jobs) <= 1:
            for job in jobs:
                record(run_one(cfg, data, *job, log=log))
            return
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(cfg.jobs, len(jobs)), _worker_init, (cfg,)) as pool:
            for r in pool.imap_unordered(_worker_run, jobs):
                record(r)

    execute(tuning)
    for method in cfg.methods:
        raw["chosen_lr"][method] = choose_lr(raw["runs"], method, cfg.tune_seed, cfg.lr_grid[method])
    save(raw, raw_path)
    execute([(m, raw["chosen_lr"][m], seed) for seed in cfg.seeds for m in cfg.methods])
    session["seconds"] = time.perf_counter() - t0
    session["loadavg_end"] = loadavg()
    session["new_runs"] = len(raw["runs"]) - done_before
    save(raw, raw_path)
    return raw


def loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def smoke_config(**overrides: Any) -> ReproConfig:
    return replace(SMOKE, **overrides)


__all__ = ["METHODS", "METHOD_LABELS", "OOD_TASKS", "ReproConfig", "SMOKE", "check_lr_grid", "choose_lr", "dense_setup", "loadavg",
           "load_previous", "lora_budget", "machine", "quiet_worker", "save", "study_session",
           "run_one", "run_reproduction", "sift_groups", "sift_k", "smoke_config"]
