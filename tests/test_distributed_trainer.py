"""`gallop finetune` (the Trainer, GallopCallback, lean mode) under ``torchrun`` on 2 CPU ranks.

One short run, as a user launches it: ``torchrun --nproc_per_node 2`` on this file, which runs
`run_finetune` (lean mode, gradient accumulation, clipping) on a tiny local Llama. accelerate
wraps the model in DDP with gloo; phase one splits the calibration examples over the ranks; lean
mode finds the DDP module and exchanges only the kept entries. Each rank then reports: the
ranks' weights are identical, every logged ``grad_norm`` is a positive number (lean clipping
measures the kept entries), and the output files were written once. The delta's selection is
then the one a single process makes with the same per-device batch and accumulation (phase one
weighs batches by their label tokens, so cutting the same examples otherwise selects alike).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
import torch  # noqa: E402

from gallop_kernels.finetune.pipeline import run_finetune  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_finetune_under_torchrun(tmp_path):
    from gallop_kernels.finetune.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, max_positions=32)
    # (answers of different lengths: a per-batch mean would select differently per batching)
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1) * (1 + i % 4)} for i in range(24)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           __file__, model_dir, str(data), str(out)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, report in enumerate(reports):
        assert report["same_weights"], f"rank {r}: the ranks' weights differ"
        assert report["lean_ddp"] == "compact", report
    log = [json.loads(line) for line in open(out / "loss_log.jsonl")]
    norms = [entry["grad_norm"] for entry in log if "grad_norm" in entry]
    assert len(norms) == 4 and all(n > 0 and n == n for n in norms), norms
    from gallop_kernels.delta import load_delta
    from gallop_kernels.finetune.pipeline import DELTA_FILE, SUMMARY_FILE

    assert (out / DELTA_FILE).exists() and (out / SUMMARY_FILE).exists()

    # One process, batch 3 x accumulation 2 (the ranks: batch 3 each, every other example):
    # phase one sees the same 6 examples cut into other batches, and selects the same entries.
    alone = tmp_path / "alone"
    run_finetune(_config(model_dir, str(data), str(alone)), out=open(os.devnull, "w"))
    got, want = (load_delta(d / DELTA_FILE).indices for d in (out, alone))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: 2 ranks selected otherwise than 1"


def _config(model_dir: str, data: str, out: str):
    from gallop_kernels.finetune.pipeline import FinetuneConfig

    return FinetuneConfig(model=model_dir, data=data, output=out, density=0.05, lean=True,
                          lr=1e-2, batch_size=3, grad_accum=2, max_steps=4, logging_steps=1,
                          calibration_fraction=0.25, max_length=32, progress=False,
                          max_grad_norm=0.5)


def worker(model_dir: str, data: str, out: str) -> None:
    """One rank of the torchrun job."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    config = _config(model_dir, data, out)
    captured = {}
    from gallop_kernels.integrations import transformers as integration

    original = integration.gallop_trainer

    def spy(cls=None):  # keep the Trainer the pipeline builds, to look at it afterwards
        made = original(cls)

        class Kept(made):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                captured["trainer"] = self

        return Kept

    integration.gallop_trainer = spy
    try:
        run_finetune(config, out=open(os.devnull, "w"))
    finally:
        integration.gallop_trainer = original
    trainer = captured["trainer"]
    opt = integration.unwrap_optimizer(trainer.optimizer)
    weights = [p.detach().flatten() for p in trainer.model.parameters()]
    flat = torch.cat(weights)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    report = {
        "same_weights": all(torch.equal(every[0], w) for w in every),
        "lean_ddp": None if opt.ddp_exchange is None else opt.ddp_exchange.mode,
    }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    worker(*sys.argv[1:4])
