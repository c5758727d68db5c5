"""The tiny demo (``gallop demo --tiny``): pretrain a tiny Llama on task A, fine-tune it sparsely on
task B, measure both. Seconds on a CPU, for CI and quick checks; the main demo is `demo/real.py`.

Kept as a function returning a result so that tests and the CLI share it; printing is separate.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

import torch

from gallop_kernels import toy as tasks
from gallop_kernels.demo.common import megabytes
from gallop_kernels.demo.common import progress as _progress
from gallop_kernels.demo.common import resolve_device, state_bytes
from gallop_kernels.phase_one import accumulate, optimizer_sink, select_from_sink
from gallop_kernels.toy import TASK_A, TASK_B, Batch, Task, build_tiny_model, tiny_llama_config


@dataclass(frozen=True)
class TinyDemoConfig:
    """Everything that decides a demo run; the defaults are what ``gallop demo --tiny`` runs."""

    seed: int = 0
    density: float = 0.03
    score: str = "gallop"
    pretrain_steps: int = 300
    finetune_steps: int = 200
    pretrain_lr: float = 3e-3
    lr: float = 3e-3
    batch_size: int = 64
    calibration_batches: int = 4
    eval_examples: int = 512
    num_symbols: int = 10
    length: int = 6
    hidden_size: int = 128
    num_layers: int = 2
    device: str = "auto"
    backend: str = "auto"
    threads: int = 1  # CPU threads: for a model this small one is as fast as more, and robust to a busy machine


@dataclass
class TinyDemoResult:
    """What the demo measured. Accuracies are per answer token on held-out examples."""

    config: TinyDemoConfig
    device: str
    num_params: int
    num_selected: int
    chance: float
    acc_a_before: float
    acc_a_after: float
    acc_b_before: float
    acc_b_after: float
    sparse_state_bytes: int  # tensors in SparseAdamW's state after fine-tuning
    dense_state_bytes: int  # tensors in torch.optim.AdamW's state for the same model (measured in pretraining)
    pretrain_seconds: float
    finetune_seconds: float
    example_a: str
    example_b: str

    @property
    def selected_fraction(self) -> float:
        return self.num_selected / self.num_params

    @property
    def state_ratio(self) -> float:
        return self.sparse_state_bytes / self.dense_state_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(selected_fraction=self.selected_fraction, state_ratio=self.state_ratio)
        return d


def _loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, labels=batch.labels).loss


def run_tiny_demo(config: TinyDemoConfig = TinyDemoConfig(), progress: bool = False) -> TinyDemoResult:
    """Run the whole demo and return what it measured. Deterministic for a given config on one device.

    Raises ``ValueError``/``TypeError`` for bad options before any training (the optimizer is
    built first so that it validates density, score, lr and backend up front).
    """
    if config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    if not (config.lr > 0 and config.pretrain_lr > 0):  # 0 would train nothing
        raise ValueError(f"lr and pretrain_lr must be > 0, got {config.lr} and {config.pretrain_lr}")
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # tiny matmuls: extra threads mostly wait on each other
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(previous)


def _run(config: TinyDemoConfig, progress: bool) -> TinyDemoResult:
    from gallop_kernels import SparseAdamW

    minimum = {"pretrain_steps": 1, "finetune_steps": 1, "calibration_batches": 1, "batch_size": 1,
               "eval_examples": 1, "num_symbols": 2, "length": 1}
    for name, low in minimum.items():
        if getattr(config, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(config, name)}")
    device = resolve_device(config.device)
    S, L = config.num_symbols, config.length
    model_config = tiny_llama_config(tasks.vocab_size(S), hidden_size=config.hidden_size,
                                     num_layers=config.num_layers, max_positions=2 * L + 8)
    model = build_tiny_model(model_config, config.seed, device)
    params = list(model.parameters())
    extra = {"seed": config.seed} if config.score == "random" else {}
    sparse_opt = SparseAdamW(params, lr=config.lr, weight_decay=0.0, density=config.density,
                             score=config.score, backend=config.backend, **extra)

    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)

    def batch(task: Task) -> Batch:
        return tasks.make_batch(task, config.batch_size, L, S, train_gen).to(device)

    eval_a = tasks.make_batch(TASK_A, config.eval_examples, L, S, eval_gen, "eval").to(device)
    eval_b = tasks.make_batch(TASK_B, config.eval_examples, L, S, eval_gen, "eval").to(device)

    # Pretraining: dense AdamW on task A, with a short linear warm-up.
    t0 = time.perf_counter()
    dense_opt = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=0.0)
    warmup = max(1, min(30, config.pretrain_steps // 10))
    bar = _progress(config.pretrain_steps, "pretrain A (AdamW)", progress)
    for step in bar:
        for group in dense_opt.param_groups:
            group["lr"] = config.pretrain_lr * min(1.0, (step + 1) / warmup)
        loss = _loss(model, batch(TASK_A))
        loss.backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    dense_bytes = state_bytes(dense_opt)  # exp_avg, exp_avg_sq and step of every parameter
    del dense_opt
    pretrain_seconds = time.perf_counter() - t0

    acc_a_before, acc_b_before = tasks.accuracy(model, eval_a), tasks.accuracy(model, eval_b)

    # GaLLoP phase one: accumulate the task-B gradient over a few calibration batches (each loss
    # scaled so .grad holds the mean), then select the entries with the largest |g| / (|θ| + ε)
    # from it once. Phase two trains only those entries; state exists for them alone.
    t1 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    sink = optimizer_sink(sparse_opt)
    accumulate(sink, range(config.calibration_batches),
               lambda _: _loss(model, batch(TASK_B)) / config.calibration_batches, average=False)
    select_from_sink(sparse_opt, sink)

    # The learning rate decays linearly to zero, as usual fine-tuning recipes do: the late, small
    # steps polish B without dragging the shared weights (and with them task A) further.
    total = max(1, config.finetune_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(sparse_opt, lambda step: 1.0 - step / total)
    bar = _progress(config.finetune_steps, "fine-tune B (SparseAdamW)", progress)
    for step in bar:
        loss = _loss(model, batch(TASK_B))
        loss.backward()
        sparse_opt.step()
        sparse_opt.zero_grad(set_to_none=True)
        schedule.step()
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finetune_seconds = time.perf_counter() - t1

    return TinyDemoResult(
        config=config,
        device=str(device),
        num_params=sum(p.numel() for p in params),
        num_selected=sparse_opt.num_selected,
        chance=1.0 / S,
        acc_a_before=acc_a_before,
        acc_a_after=tasks.accuracy(model, eval_a),
        acc_b_before=acc_b_before,
        acc_b_after=tasks.accuracy(model, eval_b),
        sparse_state_bytes=state_bytes(sparse_opt),
        dense_state_bytes=dense_bytes,
        pretrain_seconds=pretrain_seconds,
        finetune_seconds=finetune_seconds,
        example_a=tasks.render(eval_a.input_ids[0].cpu(), S),
        example_b=tasks.render(eval_b.input_ids[0].cpu(), S),
    )


def print_tiny_result(result: TinyDemoResult, file: TextIO | None = None) -> None:
    """Human-readable report of a demo run."""
    c, r = result.config, result
    out = file or sys.stdout
    lines = [
        f"tiny Llama: {r.num_params:,} parameters ({c.num_layers} layers, hidden {c.hidden_size}) on {r.device}",
        f"task A ({TASK_A.name}: {TASK_A.description}), e.g. {r.example_a}",
        f"task B ({TASK_B.name}: {TASK_B.description}), e.g. {r.example_b}",
        f"pretrained on A for {c.pretrain_steps} AdamW steps ({r.pretrain_seconds:.1f} s); "
        f"fine-tuned on B for {c.finetune_steps} SparseAdamW steps ({r.finetune_seconds:.1f} s), "
        f"score={c.score!r}, density={c.density:g}, {c.calibration_batches} calibration batches",
        "",
        f"{'held-out accuracy':<28}{'before':>8}{'after':>8}   (chance {r.chance:.0%})",
        f"{'task B (new, fine-tuned)':<28}{r.acc_b_before:>8.1%}{r.acc_b_after:>8.1%}",
        f"{'task A (retention)':<28}{r.acc_a_before:>8.1%}{r.acc_a_after:>8.1%}",
        "",
        f"trained entries: {r.num_selected:,} of {r.num_params:,} ({r.selected_fraction:.2%})",
        f"optimizer state: SparseAdamW {megabytes(r.sparse_state_bytes)} vs torch.optim.AdamW "
        f"{megabytes(r.dense_state_bytes)} ({r.state_ratio:.1%}, {1 / r.state_ratio:.0f}x smaller)"
        if r.sparse_state_bytes else
        f"optimizer state: SparseAdamW 0 B vs torch.optim.AdamW {megabytes(r.dense_state_bytes)}",
    ]
    print("\n".join(lines), file=out)
