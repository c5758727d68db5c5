"""The loops users write on several ranks, and their mistakes, on real gloo ranks (2 and 3).

Each case runs the user's code as a user writes it (DDP or ``fully_shard`` built as usual, the
optimizer's public calls only) and compares with one process on the same data:

- **the gradient accumulation loop**: ``with ddp.no_sync():`` on every micro-batch but the last,
  then ``step()``; plain and lean SparseAdamW, lean mode finding DDP by itself or attached in
  either exchange mode; micro-batches of uneven sizes;
- **phase one with** `gallop_kernels.calibrate` under DDP (each rank its own batches, uneven
  counts: the mean over every batch of every rank) and FSDP2 (equal counts; a rank that runs out
  makes every rank raise, at the same point);
- **misuse** (`optim/rendezvous.py`): a step taken on rank 0 only, ranks in different calls, a
  refused load on some ranks: one clear error on every rank that came, within
  ``GALLOP_RANKS_TIMEOUT_S`` (8 s where rank 0 waits for ranks that never come), never a hang.

Run one world by hand: ``python tests/test_distributed_loops.py RANK WORLD PORT OUT [CASE...]``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_support import Ranks, check_case, spawn  # noqa: E402
from test_distributed_training import batch, fsdp, full, global_selection, mlp  # noqa: E402

ACCUMULATION = 3
STEPS = 3
RANKS_TIMEOUT_S = 8  # how long rank 0 waits for ranks that never come (GALLOP_RANKS_TIMEOUT_S)
USUAL_TIMEOUT_S = 120  # ... and every rank for the others everywhere else (a loaded CI machine)


@contextlib.contextmanager
def _short_wait():
    """GALLOP_RANKS_TIMEOUT_S = RANKS_TIMEOUT_S within the block (read at every meeting)."""
    import os

    before = os.environ.get("GALLOP_RANKS_TIMEOUT_S")
    os.environ["GALLOP_RANKS_TIMEOUT_S"] = str(RANKS_TIMEOUT_S)
    try:
        yield
    finally:
        if before is None:
            del os.environ["GALLOP_RANKS_TIMEOUT_S"]
        else:
            os.environ["GALLOP_RANKS_TIMEOUT_S"] = before


def _mse(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _pieces(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A step's 12 rows cut into world x ACCUMULATION micro-batches (uneven for 3 ranks)."""
    x, y = batch(step)
    pieces = world * ACCUMULATION
    return list(zip(torch.tensor_split(x, pieces), torch.tensor_split(y, pieces)))


def _same_everywhere(ctx: Ranks, model) -> None:
    weights = [full(p).tolist() for p in model.parameters()]
    assert all(w == weights for w in ctx.all_same(weights)), "the replicas' weights differ"


def _compare(ctx, model, opt, ref, ref_opt, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p), q.detach(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{what}: {name}: {m}")
        got, want = global_selection(ctx, opt, p), global_selection(None, ref_opt, q)
        assert got == want, f"{what}: {name} selected {got}, one process {want}"


# ----------------------------------------------------------------------------------------------
# The gradient accumulation loop under DDP
# ----------------------------------------------------------------------------------------------

LOOP_VARIANTS = {
    "plain": dict(density=0.2),
    "lean": dict(density=0.1, lean=True),  # finds DDP by itself (compact exchange)
    "lean-compact": dict(density=0.1, lean=True, attach="compact"),
    "lean-comm_hook": dict(density=0.1, lean=True, attach="comm_hook"),
}


def _no_sync_loop(ctx: Ranks, variant: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW

    opts = dict(LOOP_VARIANTS[variant])
    attach = opts.pop("attach", None)
    # One process: every rank's micro-batches, each loss divided by the world (DDP averages).
    ref = mlp()
    ref_opt = SparseAdamW(ref.named_parameters(), lr=1e-2, replica_check=False, **opts)
    for step in range(STEPS):
        for x, y in _pieces(step, ctx.world):
            (_mse(ref, x, y) / ctx.world).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    # The user's loop, as written for DDP.
    model = mlp()
    ddp = DDP(model)
    opt = SparseAdamW(model.named_parameters(), lr=1e-2, **opts)
    if attach:
        opt.attach_ddp(ddp, mode=attach)
    for step in range(STEPS):
        mine = _pieces(step, ctx.world)[ctx.rank * ACCUMULATION:(ctx.rank + 1) * ACCUMULATION]
        for i, (x, y) in enumerate(mine):
            last = i == len(mine) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                _mse(ddp, x, y).backward()
        if step == 0 and opts.get("lean") and attach != "comm_hook":
            # Before the first selection the gradients went to host buffers: no dense gradient
            # of the model stays in .grad, and DDP averaged none of them (its sync is off).
            assert all(p.grad is None for p in model.parameters()), "a dense .grad is left"
            assert opt.ddp_exchange is not None and opt.ddp_exchange.mode == "compact"
        opt.step()
        opt.zero_grad()
    _same_everywhere(ctx, model)
    _compare(ctx, model, opt, ref, ref_opt, f"no_sync loop {variant}")


# ----------------------------------------------------------------------------------------------
# calibrate() under DDP and FSDP2
# ----------------------------------------------------------------------------------------------


def _calibration_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(9)
    return [(torch.randn(3, 6, generator=gen), torch.randn(3, 4, generator=gen)) for _ in range(n)]


def _calibrated(ctx, wrap: str, lean: bool, batches: list) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW, calibrate

    ref = mlp()
    ref_opt = SparseAdamW(ref.named_parameters(), density=0.15, lean=lean, replica_check=False)
    assert calibrate(ref_opt, batches, lambda b: _mse(ref, *b)) == len(batches)

    model = mlp()
    runner = DDP(model) if wrap == "ddp" else fsdp(model)
    opt = SparseAdamW(model.named_parameters(), density=0.15, lean=lean)
    mine = batches[ctx.rank::ctx.world]
    assert calibrate(opt, mine, lambda b: _mse(runner, *b)) == len(mine)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        got, want = global_selection(ctx, opt, p), global_selection(None, ref_opt, q)
        assert got == want, f"calibrate {wrap} lean={lean} {name}: {got} != {want}"
        assert p.grad is None
    if wrap == "ddp" and not lean:
        assert runner.require_backward_grad_sync, "calibrate() did not restore DDP's flag"
    # Training goes on as usual after phase one.
    x, y = batch(0)
    part = lambda t: t.chunk(ctx.world)[ctx.rank]  # noqa: E731
    _mse(runner, part(x), part(y)).backward()
    opt.step()
    opt.zero_grad()
    if wrap == "ddp":
        _same_everywhere(ctx, model)


def case_calibrate_ddp(ctx):
    """Five batches dealt out: the ranks hold 3 and 2 (or 2, 2 and 1)."""
    for lean in (False, True):
        _calibrated(ctx, "ddp", lean, _calibration_batches(5))


def case_calibrate_fsdp2(ctx):
    for lean in (False, True):
        _calibrated(ctx, "fsdp2", lean, _calibration_batches(6))


def case_calibrate_fsdp2_uneven_batches_refused_everywhere(ctx):
    from gallop_kernels import SparseAdamW, calibrate

    model = fsdp(mlp())
    opt = SparseAdamW(model.named_parameters(), density=0.15)
    mine = _calibration_batches(5)[ctx.rank::ctx.world]
    message = _raised(lambda: calibrate(opt, mine, lambda b: _mse(model, *b)), ValueError)
    every = ctx.all_same(message)
    assert len(set(every)) == 1 and "ran out of batches" in every[0], every
    assert not opt.is_selected()


# ----------------------------------------------------------------------------------------------
# Misuse: one rank does something else
# ----------------------------------------------------------------------------------------------


def _ddp_after_backward(lean: bool = False, steps_together: int = 0):
    """DDP, SparseAdamW, ``steps_together`` steps on every rank, then one more backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW

    model = mlp()
    ddp = DDP(model)
    opt = SparseAdamW(model.named_parameters(), density=0.2, lean=lean)
    x, y = batch(0)
    for _ in range(steps_together + 1):
        _mse(ddp, x, y).backward()
        if _ < steps_together:
            opt.step()
            opt.zero_grad()
    return model, opt


def case_step_on_rank_zero_only(ctx):
    """``if rank == 0: opt.step()``: rank 0 fails within GALLOP_RANKS_TIMEOUT_S, naming the
    ranks that did not come, and changes nothing; the first step (selection) and a lean step
    (the kept entries' all-reduce) alike."""
    for lean, together in ((False, 0), (True, 1)):
        model, opt = _ddp_after_backward(lean, together)
        selected = opt.num_selected
        if ctx.rank == 0:
            with _short_wait():
                message = _raised(opt.step, RuntimeError)
            assert f"rank 0 waited {RANKS_TIMEOUT_S} s in step() #" in message, message
            for r in range(1, ctx.world):
                assert f"rank {r} (last optimizer call it met in" in message, message
            assert opt.num_selected == selected and opt.is_selected() == bool(together)


def case_ranks_in_different_calls(ctx):
    """Rank 0 steps while the others select: every rank raises the same error, naming both."""
    from gallop_kernels.optim.rendezvous import RanksDisagree

    model, opt = _ddp_after_backward()
    message = _raised(opt.step if ctx.rank == 0 else opt.select, RanksDisagree)
    every = ctx.all_same(message)
    assert len(set(every)) == 1, every
    assert "rank 0: step()" in every[0] and "rank 1: select()" in every[0], every[0]
    assert not opt.is_selected()
    # Called alike again, the ranks go on.
    opt.step()
    assert opt.is_selected()


def case_bad_gradient_on_one_rank(ctx):
    """A sparse gradient on the last rank: every rank raises the same error, at the same point
    (before any collective), naming that rank; nothing changes anywhere."""
    model, opt = _ddp_after_backward()
    if ctx.rank == ctx.world - 1:
        p = next(model.parameters())
        p.grad = p.grad.to_sparse()
    message = _raised(opt.step, ValueError)
    every = ctx.all_same(message)
    assert len(set(every)) == 1, every
    assert f"refused on rank(s) [{ctx.world - 1}]" in every[0] and "sparse" in every[0], every[0]
    assert not opt.is_selected()


def case_calibrate_on_rank_zero_only(ctx):
    from gallop_kernels import SparseAdamW, calibrate

    model = mlp()
    opt = SparseAdamW(model.named_parameters(), density=0.2)
    if ctx.rank == 0:
        batches = _calibration_batches(2)
        with _short_wait():
            message = _raised(lambda: calibrate(opt, batches, lambda b: _mse(model, *b)),
                              RuntimeError)
        assert "calibrate()" in message and "rank 1" in message, message
        assert not opt.is_selected()


def _raised(fn, error) -> str:
    try:
        fn()
    except error as err:
        return str(err)
    raise AssertionError(f"no {error.__name__} raised")


# ----------------------------------------------------------------------------------------------
# The case table, per world size
# ----------------------------------------------------------------------------------------------

CASES = {
    **{f"no_sync_loop_{v}": (lambda v: lambda ctx: _no_sync_loop(ctx, v))(v)
       for v in LOOP_VARIANTS},
    "calibrate_ddp": case_calibrate_ddp,
    "calibrate_fsdp2": case_calibrate_fsdp2,
    "calibrate_fsdp2_uneven_batches_refused_everywhere":
        case_calibrate_fsdp2_uneven_batches_refused_everywhere,
    "step_on_rank_zero_only": case_step_on_rank_zero_only,
    "bad_gradient_on_one_rank": case_bad_gradient_on_one_rank,
    "ranks_in_different_calls": case_ranks_in_different_calls,
    "calibrate_on_rank_zero_only": case_calibrate_on_rank_zero_only,
}
WORLD_3 = [c for c in CASES  # (three ranks: uneven micro-batches and shards, two absent ranks)
           if c not in ("no_sync_loop_lean-compact", "calibrate_on_rank_zero_only")]
ENV = {"GALLOP_RANKS_TIMEOUT_S": str(USUAL_TIMEOUT_S)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shared = tmp_path_factory.mktemp("loops")
    return {2: spawn(__file__, 2, shared / "w2", list(CASES), env=ENV),
            3: spawn(__file__, 3, shared / "w3", WORLD_3, env=ENV)}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks(runs, name):
    check_case(runs[2], name)


@pytest.mark.parametrize("name", WORLD_3)
def test_three_ranks(runs, name):
    check_case(runs[3], name)


if __name__ == "__main__":
    from distributed_support import worker_main

    worker_main(CASES)
