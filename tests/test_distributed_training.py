"""SparseAdamW on real gloo ranks (2 and 3), FSDP2 and DDP, against one process.

Each world size is spawned once (`distributed_support.spawn`); every rank runs the cases below
and reports per case. What they check:

- **selection through ``fully_shard``**: the union of the ranks' selections (mapped to global
  indices) is exactly the selection one process makes from the same (gathered) params and
  reduced gradients, for every score, uneven and empty shards, all scores tied, mostly zero
  gradients, k = 1 and k = N; both backends (Triton once it takes a shard layout);
- **NaN on one rank**: every rank raises the same error naming the param, nothing selected;
- **training parity** of FSDP2 and DDP (plain, lean, re-selection, bf16 master, 8-bit state,
  lean clipping; DDP lean in both exchange modes, DDP built first) against one process
  on the whole batch; HSDP on 2-D meshes; params swapped in after sharding (accelerate);
- **phase one** under DDP and FSDP2 (device gradients and lean mode's host buffers);
- **checks**: the replica check, lean mode without DDP, refusals (tensor parallelism, FSDP1
  flat params, ZeRO partitions, flattened swaps), torch's zero-gradient state initialisation
  (``get_optimizer_state_dict``), per-rank state dicts through plain DCP;
- **DCP checkpoints** (`optim/distributed_checkpoint.py`): resume at the same world size bit
  for bit; resharding 1 -> 2, 2 -> 3, 2 -> 1 (the 1-process sides run in this process).

Run one world by hand: ``python tests/test_distributed_training.py RANK WORLD PORT OUT [CASE...]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_support import Ranks, Skip, check_case, spawn  # noqa: E402

TRAIN_STEPS = 4


# ----------------------------------------------------------------------------------------------
# Shared pieces (the same in this process and on every rank)
# ----------------------------------------------------------------------------------------------


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)  # 12 rows: 2, 3 and 4 ranks split it evenly
    return torch.randn(12, 6, generator=gen).to(dtype), torch.randn(12, 4, generator=gen).to(dtype)


VARIANTS = {
    "plain": dict(density=0.2),
    "lean": dict(density=0.05, lean=True),  # few entries: some tensors select none and freeze
    "reselect": dict(density=0.2, reselect_every=2),
    "lean-reselect": dict(density=0.2, reselect_every=2, lean=True),
    "bf16-master": dict(density=0.2, dtype=torch.bfloat16),
    "8bit": dict(density=0.3, state_bits=8, min_8bit_entries=0),
    "lean-clip": dict(density=0.2, lean=True, clip=0.05),
}


def options(variant: str) -> tuple[dict, torch.dtype, float | None]:
    opts = dict(VARIANTS[variant])
    dtype = opts.pop("dtype", torch.float32)
    clip = opts.pop("clip", None)
    return dict(lr=1e-2, weight_decay=0.01, **opts), dtype, clip


def train(model, opt, steps: range, dtype, clip=None, part=None) -> list[float]:
    """MSE on each step's batch (this rank's ``part`` = (rank, world) of it); returns the norms."""
    norms = []
    for step in steps:
        x, y = batch(step, dtype)
        if part is not None:
            x, y = x.chunk(part[1])[part[0]], y.chunk(part[1])[part[0]]
        loss = ((model(x).float() - y.float()) ** 2).mean()
        loss.backward()
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
    return norms


def reference_run(variant: str, steps: int = TRAIN_STEPS):
    """One process on the whole batch: (model, optimizer, clip norms). (On a rank of a group,
    ``replica_check=False`` makes it a process on its own.)"""
    from gallop_kernels import SparseAdamW

    opts, dtype, clip = options(variant)
    model = mlp(dtype)
    opt = SparseAdamW(model.named_parameters(), replica_check=False, **opts)
    norms = train(model, opt, range(steps), dtype, clip)
    return model, opt, norms


def full(p: torch.Tensor) -> torch.Tensor:
    from gallop_kernels.optim.distributed import is_dtensor

    return p.full_tensor() if is_dtensor(p) else p.detach()


def global_selection(ctx: Ranks | None, opt, p) -> list[int]:
    """The selected global flat indices of ``p`` over all its shards."""
    import torch.distributed as dist

    from gallop_kernels.optim.distributed import global_indices, placement

    if not opt.is_selected():
        return []
    mine = global_indices(p, opt.selected_indices(p)).tolist()
    place = placement([p]) if ctx is not None else None
    if place is None or not place.sharded:
        return mine
    group = place.layout.collective.group
    parts = [None] * place.shard_world
    dist.all_gather_object(parts, mine, group=group)
    return sorted(i for part in parts for i in part)


def compare(ctx, model, opt, ref_model, ref_opt, dtype, what: str, same_selection=True) -> None:
    tol = dict(atol=3e-2, rtol=3e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)
    if "8bit" in what:
        tol = dict(atol=2e-3, rtol=1e-3)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(full(p).float(), q.detach().float(), **tol,
                                   msg=lambda m: f"{what}: {name}: {m}")
        got, want = global_selection(ctx, opt, p), global_selection(None, ref_opt, q)
        if same_selection:
            assert got == want, f"{what}: {name} selected {got}, one process {want}"
        else:
            assert len(got) == len(want), f"{what}: {name}: {len(got)} != {len(want)} selected"


def fsdp(model, mesh=None):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ----------------------------------------------------------------------------------------------
# Selection parity through fully_shard
# ----------------------------------------------------------------------------------------------


class Holder(nn.Module):
    """Raw params of given shapes; forward returns sum_i <p_i, G_i>, so each gradient is G_i."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(p.clone()) for p in params])
        for i, g in enumerate(grads):
            self.register_buffer(f"g{i}", g.clone())

    def forward(self) -> torch.Tensor:
        return sum((p.float() * getattr(self, f"g{i}").float()).sum() for i, p in enumerate(self.ps))


def user_score(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.float() * torch.sign(param.float()) - 0.5 * param.float()


SHAPES = [[7, 5], [1, 9], [13, 3], [2, 11]]  # 1- and 2-row tensors leave ranks empty


def selection_cases() -> list[dict]:
    out = []
    for score in ("gallop", "gradient", "magnitude", "random", "callable"):
        out.append(dict(score=score, density=0.1, data="normal"))
    out += [
        dict(score="gallop", density=0.25, data="coarse"),
        dict(score="gallop", density=0.3, data="tied"),
        dict(score="gradient", density=0.2, data="sparse_grad"),
        dict(score="gallop", density=1e-9, data="coarse"),  # k = 1
        dict(score="gallop", density=1.0, data="coarse"),  # k = N
        dict(score="magnitude", density=1.0, data="tied"),
        dict(score="gallop", density=0.2, data="coarse", dtype="bfloat16"),
    ]
    return out


def make_case(case: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in SHAPES:
        if case["data"] == "normal":
            p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        elif case["data"] == "coarse":
            p = torch.randint(-2, 3, shape, generator=gen) * 0.5
            g = torch.randint(0, 3, shape, generator=gen) * 0.25
        elif case["data"] == "tied":
            p, g = torch.ones(shape), torch.ones(shape)
        else:  # sparse_grad
            p = torch.randn(shape, generator=gen)
            g = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.1)
        dtype = getattr(torch, case.get("dtype", "float32"))
        params.append(p.to(dtype))
        grads.append(g.to(dtype))
    return params, grads


def _selection_parity(ctx: Ranks, backend: str) -> None:
    """Every case is one param group of one sharded module (one fully_shard and one backward per
    dtype): each group selects on its own, exactly as one process would."""
    from torch.distributed.fsdp import fully_shard

    from gallop_kernels import SparseAdamW
    from gallop_kernels.ops.select import naive as select_naive

    cases = list(enumerate(selection_cases()))
    for dtype in ("float32", "bfloat16"):
        mine = [(n, c) for n, c in cases if c.get("dtype", "float32") == dtype]
        made = [make_case(c, seed=n) for n, c in mine]
        holder = Holder([p for ps, _ in made for p in ps], [g for _, gs in made for g in gs])
        fully_shard(holder)
        holder().backward()
        groups, at = [], 0
        for (n, case), (ps, _) in zip(mine, made):
            score = user_score if case["score"] == "callable" else case["score"]
            groups.append(dict(params=list(holder.ps[at:at + len(ps)]), density=case["density"],
                               score=score, param_names=[f"ps.{at + i}" for i in range(len(ps))]))
            at += len(ps)
        opt = SparseAdamW(groups, backend=backend)
        opt.select()
        for (n, case), group in zip(mine, opt.param_groups):
            full_p = [full(p) for p in group["params"]]
            full_g = [full(p.grad) for p in group["params"]]
            want = select_naive.select(full_p, full_g, case["density"], group["score"], 1e-8, 0,
                                    group["param_names"])
            for i, p in enumerate(group["params"]):
                got = global_selection(ctx, opt, p)
                assert got == want[i].tolist(), (f"case {n} {case} tensor {i}: {got} != "
                                                 f"{want[i].tolist()}")


def case_selection_torch(ctx):
    _selection_parity(ctx, "torch")


def case_selection_triton(ctx):
    _selection_parity(ctx, "triton")


def case_nan_on_one_rank(ctx):
    from torch.distributed.fsdp import fully_shard

    from gallop_kernels import SparseAdamW

    params, grads = make_case(dict(data="normal"), seed=7)
    grads[2][-1, 0] = float("nan")  # the last row of ps.2: on the last rank only
    holder = Holder(params, grads)
    fully_shard(holder)
    holder().backward()
    opt = SparseAdamW(holder.named_parameters(), density=0.1)
    try:
        opt.step()
    except ValueError as err:
        message = str(err)
    else:
        message = None
    every = ctx.all_same(message)
    assert every[0] is not None and len(set(every)) == 1, f"ranks raised differently: {every}"
    assert "ps.2" in every[0] and not opt.is_selected()


# ----------------------------------------------------------------------------------------------
# Training parity
# ----------------------------------------------------------------------------------------------


def _fsdp_parity(ctx, variant: str, mesh=None, init_state_first: bool = False) -> None:
    from gallop_kernels import SparseAdamW

    opts, dtype, clip = options(variant)
    ref_model, ref_opt, ref_norms = reference_run(variant)
    model = fsdp(mlp(dtype), mesh)
    opt = SparseAdamW(model.named_parameters(), **opts)
    if init_state_first:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        get_optimizer_state_dict(model, opt)  # torch's zero-gradient, lr = 0 step
        assert not opt.is_selected() and not opt.state, "selected from torch's zero gradients"
    norms = train(model, opt, range(TRAIN_STEPS), dtype, clip, part=(ctx.rank, ctx.world))
    compare(ctx, model, opt, ref_model, ref_opt, dtype, f"fsdp2 {variant}",
            same_selection=dtype == torch.float32)
    if clip is not None:
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=1e-6)
    if opt.lean:
        frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        ref_frozen = sorted(n for n, p in ref_model.named_parameters() if not p.requires_grad)
        assert frozen == ref_frozen, f"frozen {frozen}, one process {ref_frozen}"
        assert len(set(map(tuple, ctx.all_same(frozen)))) == 1


def _ddp_parity(ctx, variant: str, comm_hook: bool = False) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW

    opts, dtype, clip = options(variant)
    ref_model, ref_opt, ref_norms = reference_run(variant)
    model = mlp(dtype)
    ddp = DDP(model)  # built first, as usual: lean mode's freezing must cope
    opt = SparseAdamW(model.named_parameters(), **opts)
    if comm_hook:
        opt.attach_ddp(ddp, mode="comm_hook")
    norms = train(ddp, opt, range(TRAIN_STEPS), dtype, clip, part=(ctx.rank, ctx.world))
    compare(ctx, model, opt, ref_model, ref_opt, dtype, f"ddp {variant}",
            same_selection=dtype == torch.float32)
    if clip is not None:
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=1e-6)
    weights = [full(p).tolist() for p in model.parameters()]
    assert all(w == weights for w in ctx.all_same(weights)), "DDP replicas diverged"
    if opt.lean and not comm_hook:
        assert opt.ddp_exchange is not None and opt.ddp_exchange.mode == "compact", "lean mode found no DDP"
        assert ddp.require_backward_grad_sync is False
        if variant == "lean":
            assert any(not p.requires_grad for p in model.parameters()), "nothing was frozen"


def case_fsdp_zero_grad_init_then_train(ctx):
    _fsdp_parity(ctx, "plain", init_state_first=True)


def case_hsdp_replicate_1_shard_all(ctx):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, ctx.world), mesh_dim_names=("replicate", "shard"))
    _fsdp_parity(ctx, "plain", mesh=mesh)


def case_hsdp_replicate_all_shard_1(ctx):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (ctx.world, 1), mesh_dim_names=("replicate", "shard"))
    _fsdp_parity(ctx, "lean", mesh=mesh)
    _fsdp_parity(ctx, "8bit", mesh=mesh)  # (whole tensors on every rank: 8-bit is fine)


def _8bit_refused(ctx, mesh=None) -> None:
    """8-bit moments on params sharded over several ranks: refused on every rank alike, before
    anything runs, naming state_bits=32 (their blocks would depend on the number of ranks)."""
    from gallop_kernels import SparseAdamW

    opts, dtype, _ = options("8bit")
    model = fsdp(mlp(dtype), mesh)
    try:
        SparseAdamW(model.named_parameters(), **opts)
        message = None
    except ValueError as err:
        message = str(err)
    every = ctx.all_same(message)
    assert every[0] is not None and len(set(every)) == 1, every
    assert "state_bits=32" in every[0] and "depend on the number of ranks" in every[0], every[0]
    # ... and when an optimizer built on whole tensors is handed the shards (as accelerate does),
    # the first step refuses, before anything changes.
    plain = mlp(dtype)
    opt = SparseAdamW(plain.named_parameters(), **opts)
    names = [n for n, _ in plain.named_parameters()]
    fsdp(plain, mesh)
    sharded = dict(plain.named_parameters())
    opt.param_groups[0]["params"] = [sharded[n] for n in names]
    x, y = batch(0)
    ((plain(x.chunk(ctx.world)[ctx.rank]) - y.chunk(ctx.world)[ctx.rank]) ** 2).mean().backward()
    _raises(opt.step, ValueError, "state_bits=32")
    assert not opt.is_selected()


def case_fsdp2_8bit_refused(ctx):
    _8bit_refused(ctx)


def case_hsdp_2x2(ctx):
    """Real HSDP: 2 replicas of 2 shards (4 ranks; the slow test)."""
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.world != 4:
        raise Skip("needs 4 ranks")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for variant in ("plain", "lean"):
        _fsdp_parity(ctx, variant, mesh=mesh)
    _8bit_refused(ctx, mesh)


def case_ddp_lean_comm_hook(ctx):
    _ddp_parity(ctx, "lean", comm_hook=True)


def case_params_swapped_after_sharding(ctx):
    """accelerate builds the optimizer first, shards, then swaps the optimizer's params."""
    from gallop_kernels import SparseAdamW

    opts, dtype, _ = options("plain")
    ref_model, ref_opt, _ = reference_run("plain")
    model = mlp(dtype)
    opt = SparseAdamW(model.named_parameters(), **opts)
    names = [n for n, _ in model.named_parameters()]
    fsdp(model)
    sharded = dict(model.named_parameters())
    opt.param_groups[0]["params"] = [sharded[n] for n in names]
    train(model, opt, range(TRAIN_STEPS), dtype, part=(ctx.rank, ctx.world))
    compare(ctx, model, opt, ref_model, ref_opt, dtype, "swapped")


# ----------------------------------------------------------------------------------------------
# Phase one
# ----------------------------------------------------------------------------------------------


def _data():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 6, generator=gen), torch.randn(10, 4, generator=gen)
    return [{"x": x[i], "y": y[i]} for i in range(10)]


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _mse(model, inputs):
    return ((model(inputs["x"]) - inputs["y"]) ** 2).mean()


def _phase_one(ctx, wrap: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels import SparseAdamW
    from gallop_kernels.phase_one import (
        calibrate_dataset,
        optimizer_sink,
        select_from_sink,
    )

    for lean in (False, True):
        models = []
        for distributed in (False, True):
            model = mlp()
            runner = model
            if distributed and wrap == "fsdp2":
                runner = model = fsdp(model)
            elif distributed:
                runner = DDP(model)
            opt = SparseAdamW(model.named_parameters(), density=0.15, lean=lean,
                              replica_check=distributed)
            sink = optimizer_sink(opt)
            n = calibrate_dataset(runner, sink, _data(), _collate, fraction=0.7, batch_size=2,
                                  loss_fn=_mse, collective="auto" if distributed else None)
            select_from_sink(opt, sink)
            assert n == 7
            models.append((model, opt))
        (ref, ref_opt), (got, opt) = models
        for (name, p), q in zip(got.named_parameters(), ref.parameters()):
            g, w = global_selection(ctx, opt, p), global_selection(None, ref_opt, q)
            assert g == w, f"{wrap} lean={lean} {name}: {g} != {w}"
            assert p.grad is None


def case_phase_one_ddp(ctx):
    _phase_one(ctx, "ddp")


def case_phase_one_fsdp2(ctx):
    _phase_one(ctx, "fsdp2")


# ----------------------------------------------------------------------------------------------
# Checks and refusals
# ----------------------------------------------------------------------------------------------


def _raises(fn, error, match: str) -> None:
    try:
        fn()
    except error as err:
        assert match in str(err), f"expected {match!r} in: {err}"
        return
    raise AssertionError(f"no {error.__name__} ({match!r})")


def case_replica_check(ctx):
    from gallop_kernels import SparseAdamW

    for check in (True, False):
        layer = nn.Linear(4, 3)
        torch.manual_seed(ctx.rank)  # different gradients per rank, no DDP to average them
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt = SparseAdamW(layer.parameters(), density=0.2, replica_check=check)
        if check:
            _raises(opt.step, RuntimeError, "selected different entries")
        else:
            opt.step()


def case_lean_without_ddp_refuses(ctx):
    from gallop_kernels import SparseAdamW

    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    opt = SparseAdamW(layer.parameters(), density=0.3, lean=True)
    layer(x).sum().backward()
    opt.step()  # selects from identical gradients: fine
    layer(x).sum().backward()  # gathered rank-locally, and nothing averages it
    _raises(opt.step, RuntimeError, "no DistributedDataParallel")


def case_refusals(ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gallop_kernels import SparseAdamW

    mesh = init_device_mesh("cpu", (ctx.world,))
    tp = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    _raises(lambda: SparseAdamW([tp]), ValueError, "tensor parallelism")
    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
    _raises(lambda: SparseAdamW([sharded, nn.Parameter(torch.randn(3))]), ValueError,
            "apply fully_shard to the root")
    flat = nn.Parameter(torch.randn(12))
    flat._is_flat_param = True  # what FSDP1's FlatParameter carries (FSDP1 needs a GPU)
    _raises(lambda: SparseAdamW([flat]), ValueError, "FSDP1")
    _raises(lambda: SparseAdamW([("_fsdp_wrapped_module.0.weight", nn.Parameter(torch.randn(3)))]),
            ValueError, "FSDP1")
    zero = nn.Parameter(torch.randn(5))
    zero.ds_id = 3  # what DeepSpeed ZeRO-3 params carry (DeepSpeed is not installed here)
    _raises(lambda: SparseAdamW([zero]), ValueError, "DeepSpeed ZeRO")
    layer = nn.Linear(4, 3)
    opt = SparseAdamW(layer.parameters())
    flat_partition = nn.Parameter(torch.randn(15))  # ZeRO-1/2 swap in one flat fp32 partition
    flat_partition.grad = torch.randn(15)
    opt.param_groups[0]["params"] = [flat_partition, layer.bias]
    _raises(opt.step, ValueError, "flattened partitions")


def case_plain_dcp_of_per_rank_state_is_refused(ctx):
    """torch's get/set_optimizer_state_dict + dcp keep one rank's ragged state: every rank
    refuses, with the same error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from gallop_kernels import SparseAdamW

    opts, dtype, _ = options("plain")
    model = fsdp(mlp(dtype))
    opt = SparseAdamW(model.named_parameters(), **opts)
    train(model, opt, range(2), dtype, part=(ctx.rank, ctx.world))
    path = ctx.out / "plain-dcp"
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    fresh = fsdp(mlp(dtype))
    fresh_opt = SparseAdamW(fresh.named_parameters(), **opts)
    dest = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    assert not fresh_opt.is_selected()
    dcp.load(dest, checkpoint_id=path)
    try:
        set_optimizer_state_dict(fresh, fresh_opt, dest["optim"])
        outcome = "loaded"
    except ValueError as err:
        outcome = str(err)
    every = ctx.all_same(outcome)
    # Refused on every rank alike (DCP kept one rank's dicts, so only the others' checks fail
    # by themselves: the refusal is made collective), and nothing loaded anywhere.
    assert len(set(every)) == 1 and "distributed_checkpoint" in every[0], every
    assert not fresh_opt.is_selected()


# ----------------------------------------------------------------------------------------------
# DCP checkpoints: resume and resharding
# ----------------------------------------------------------------------------------------------

CKPT_OPTIONS = dict(lr=1e-2, density=0.3)


def ckpt_model_and_opt(sharded: bool, bits: int = 32):
    """Two groups: the weights with re-selection (``bits``-bit moments), and the biases."""
    from gallop_kernels import SparseAdamW

    model = mlp()
    if sharded:
        fsdp(model)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n.endswith("weight")],
         "param_names": [n for n, _ in named if n.endswith("weight")],
         "state_bits": bits, "min_8bit_entries": 0, "reselect_every": 3},
        {"params": [p for n, p in named if n.endswith("bias")],
         "param_names": [n for n, _ in named if n.endswith("bias")]},
    ]
    return model, SparseAdamW(groups, **CKPT_OPTIONS)


def snapshot(ctx, model, opt) -> dict:
    """Full params and global selections, comparable across world sizes."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = {"value": full(p).tolist(), "selected": global_selection(ctx, opt, p)}
    return out


def model_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model)}


def restore(path, sharded: bool, ctx=None):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from gallop_kernels.optim import distributed_checkpoint as gdcp

    model, opt = ckpt_model_and_opt(sharded)
    state = model_state(model)
    gdcp.load(opt, path, model=model, state=state)
    set_model_state_dict(model, state["model"])
    return model, opt


def part_of(ctx):
    return None if ctx is None else (ctx.rank, ctx.world)


def close_snapshots(got: dict, want: dict, what: str) -> None:
    for name in want:
        assert got[name]["selected"] == want[name]["selected"], f"{what}: {name} selection"
        torch.testing.assert_close(torch.tensor(got[name]["value"]), torch.tensor(want[name]["value"]),
                                   atol=2e-3, rtol=1e-3, msg=lambda m: f"{what}: {name}: {m}")


def case_dcp_resume_and_reshard(ctx):
    from gallop_kernels.optim import distributed_checkpoint as gdcp

    shared = ctx.out.parent
    if ctx.world == 2:
        # Resume at the same world size: bit for bit (weights, state, selections).
        model, opt = ckpt_model_and_opt(sharded=True)
        train(model, opt, range(2), torch.float32, part=part_of(ctx))
        gdcp.save(opt, shared / "ckpt-w2", model=model, state=model_state(model))
        train(model, opt, range(2, 6), torch.float32, part=part_of(ctx))
        continued = snapshot(ctx, model, opt)
        again, again_opt = restore(shared / "ckpt-w2", sharded=True)
        train(again, again_opt, range(2, 6), torch.float32, part=part_of(ctx))
        resumed = snapshot(ctx, again, again_opt)
        assert resumed == continued, "resume at the same world size is not bit-exact"
        for p, q in zip(again.parameters(), model.parameters()):
            a, b = again_opt.state[p], opt.state[q]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if ctx.rank == 0:
            (shared / "w2-final.json").write_text(json.dumps(continued))
        # 1 -> 2: the one-process checkpoint written by the test process.
        one, one_opt = restore(shared / "ckpt-w1", sharded=True)
        train(one, one_opt, range(2, 6), torch.float32, part=part_of(ctx))
        close_snapshots(snapshot(ctx, one, one_opt),
                        json.loads((shared / "w1-final.json").read_text()), "1 -> 2")
    elif ctx.world == 3:
        # 2 -> 3
        if not (shared / "ckpt-w2").exists():
            raise Skip("the 2-rank run wrote no checkpoint")
        model, opt = restore(shared / "ckpt-w2", sharded=True)
        train(model, opt, range(2, 6), torch.float32, part=part_of(ctx))
        close_snapshots(snapshot(ctx, model, opt),
                        json.loads((shared / "w2-final.json").read_text()), "2 -> 3")
    else:
        raise Skip("for 2 and 3 ranks")


def case_dcp_8bit_across_world_sizes(ctx):
    """A one-process checkpoint with 8-bit moments on 2 or 3 ranks: under DDP (whole tensors)
    the codes and scales come back bit for bit; into FSDP2 shards only as fp32 moments, asked
    for with convert_layout=True (else every rank refuses alike)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gallop_kernels.ops.adamw import quantization
    from gallop_kernels.optim import distributed_checkpoint as gdcp
    from gallop_kernels.optim.distributed import global_indices

    shared = ctx.out.parent
    saved = torch.load(shared / "w1-8bit-state.pt", weights_only=True)
    model, opt = ckpt_model_and_opt(sharded=False, bits=8)
    DDP(model)
    gdcp.load(opt, shared / "ckpt-w1-8bit", model=model)
    got = opt.state_dict()
    assert got["state"].keys() == saved["state"].keys()
    for i, want in saved["state"].items():
        assert got["state"][i].keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got["state"][i][key], value), f"param {i} {key} differs"
    assert any(st["exp_avg"].dtype == torch.uint8 for st in saved["state"].values())

    model, opt = ckpt_model_and_opt(sharded=True)
    message = None
    try:
        gdcp.load(opt, shared / "ckpt-w1-8bit", model=model)
    except ValueError as err:
        message = str(err)
    every = ctx.all_same(message)
    assert every[0] is not None and len(set(every)) == 1 and "convert_layout" in every[0], every
    assert not opt.is_selected()
    gdcp.load(opt, shared / "ckpt-w1-8bit", model=model, convert_layout=True)
    for (name, p), i in zip(model.named_parameters(), [0, 2, 1, 3]):
        want = saved["state"][i]
        if want["exp_avg"].dtype != torch.uint8:
            continue
        full_m = quantization.dequantize_blockwise(want["exp_avg"], want["exp_avg_absmax"],
                                                   signed=True)
        mine = global_indices(p, opt.selected_indices(p))
        at = torch.searchsorted(want["indices"].to(torch.int64), mine)
        assert torch.equal(want["indices"].to(torch.int64)[at], mine), name
        assert torch.equal(opt.state[p]["exp_avg"], full_m[at]), name


# ----------------------------------------------------------------------------------------------
# The case table, per world size
# ----------------------------------------------------------------------------------------------

CASES = {
    "selection_torch": case_selection_torch,
    "selection_triton": case_selection_triton,
    "nan_on_one_rank": case_nan_on_one_rank,
    **{f"fsdp2_{v}": (lambda v: lambda ctx: _fsdp_parity(ctx, v))(v) for v in VARIANTS
       if v != "8bit"},
    "fsdp2_8bit_refused": case_fsdp2_8bit_refused,
    **{f"ddp_{v}": (lambda v: lambda ctx: _ddp_parity(ctx, v))(v) for v in VARIANTS},
    "ddp_lean_comm_hook": case_ddp_lean_comm_hook,
    "fsdp2_zero_grad_init_then_train": case_fsdp_zero_grad_init_then_train,
    "hsdp_replicate_1_shard_all": case_hsdp_replicate_1_shard_all,
    "hsdp_replicate_all_shard_1": case_hsdp_replicate_all_shard_1,
    "hsdp_2x2": case_hsdp_2x2,
    "params_swapped_after_sharding": case_params_swapped_after_sharding,
    "phase_one_ddp": case_phase_one_ddp,
    "phase_one_fsdp2": case_phase_one_fsdp2,
    "replica_check": case_replica_check,
    "lean_without_ddp_refuses": case_lean_without_ddp_refuses,
    "refusals": case_refusals,
    "plain_dcp_of_per_rank_state_is_refused": case_plain_dcp_of_per_rank_state_is_refused,
    "dcp_resume_and_reshard": case_dcp_resume_and_reshard,
    "dcp_8bit_across_world_sizes": case_dcp_8bit_across_world_sizes,
}
WORLD_3 = [  # three ranks: uneven shards everywhere; the cases that differ from two
    "selection_torch", "selection_triton", "nan_on_one_rank", "fsdp2_plain", "fsdp2_lean",
    "fsdp2_lean-clip", "fsdp2_8bit_refused", "ddp_lean", "phase_one_fsdp2",
    "dcp_resume_and_reshard", "dcp_8bit_across_world_sizes",
]


# ----------------------------------------------------------------------------------------------
# The test side
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process checkpoint, then 2 ranks (all cases), then 3 ranks, then the 2 -> 1 load."""
    from gallop_kernels.optim import distributed_checkpoint as gdcp

    shared = tmp_path_factory.mktemp("distributed")
    model, opt = ckpt_model_and_opt(sharded=False)
    train(model, opt, range(2), torch.float32)
    gdcp.save(opt, shared / "ckpt-w1", model=model, state=model_state(model))
    train(model, opt, range(2, 6), torch.float32)
    (shared / "w1-final.json").write_text(json.dumps(snapshot(None, model, opt)))
    model, opt = ckpt_model_and_opt(sharded=False, bits=8)
    train(model, opt, range(2), torch.float32)
    gdcp.save(opt, shared / "ckpt-w1-8bit", model=model, state=model_state(model))
    torch.save(opt.state_dict(), shared / "w1-8bit-state.pt")
    two = [c for c in CASES if c != "hsdp_2x2"]
    results = {2: spawn(__file__, 2, shared / "w2", two), 3: spawn(__file__, 3, shared / "w3", WORLD_3)}
    return shared, results


@pytest.mark.parametrize("name", [c for c in CASES if c != "hsdp_2x2"])
def test_two_ranks(runs, name):
    check_case(runs[1][2], name)


@pytest.mark.parametrize("name", WORLD_3)
def test_three_ranks(runs, name):
    check_case(runs[1][3], name)


@pytest.mark.slow
def test_hsdp_on_four_ranks(tmp_path, request):
    """HSDP on a 2 x 2 mesh (replicate x shard) against one process: 4 processes, so slow."""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("4 ranks: run with -m slow")
    check_case(spawn(__file__, 4, tmp_path / "w4", ["hsdp_2x2", "selection_torch"],
                     timeout_s=300), "hsdp_2x2")


def test_checkpoint_of_two_ranks_loads_in_one_process(runs):
    """2 -> 1: the 2-rank checkpoint resumes in one process as the 2 ranks continued."""
    shared = runs[0]
    if not (shared / "ckpt-w2").exists():
        pytest.skip("the 2-rank run wrote no checkpoint")
    model, opt = restore(shared / "ckpt-w2", sharded=False)
    train(model, opt, range(2, 6), torch.float32)
    close_snapshots(snapshot(None, model, opt), json.loads((shared / "w2-final.json").read_text()),
                    "2 -> 1")


def test_zero_gradient_state_init_never_selects_in_one_process():
    """torch's get_optimizer_state_dict steps once with zero gradients and lr = 0 to create state:
    SparseAdamW must not select from it; the first real gradient selects as usual. A warmup that
    starts at lr = 0 with real gradients still selects."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from gallop_kernels import SparseAdamW

    ref_model, ref_opt, _ = reference_run("plain")
    model = mlp()
    opt = SparseAdamW(model.named_parameters(), **options("plain")[0])
    get_optimizer_state_dict(model, opt)
    assert not opt.is_selected() and all(p.grad is None for p in model.parameters())
    train(model, opt, range(TRAIN_STEPS), torch.float32)
    compare(None, model, opt, ref_model, ref_opt, torch.float32, "after init")

    warm = mlp()
    opt = SparseAdamW(warm.named_parameters(), lr=0.0, density=0.2)
    x, y = batch(0)
    ((warm(x) - y) ** 2).mean().backward()
    opt.step()
    assert opt.is_selected(), "a real gradient at lr = 0 (warmup) must select"


if __name__ == "__main__":
    from distributed_support import worker_main

    worker_main(CASES)
