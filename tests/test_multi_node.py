"""Two machines on one: network namespaces, each a "node" with its own address, and torchrun.

The README's multi-node commands, run for real: two network namespaces joined by a veth pair
(10.x.0.1 and 10.x.0.2, nothing else reachable) stand for two machines, and
``torchrun --nnodes 2 --nproc_per_node 2`` runs in each with c10d rendezvous across them, gloo
on the veth. Every rank checks the node-level facts (``LOCAL_RANK`` vs ``RANK``, ``GROUP_RANK``,
its node's address, which ranks share a node) and runs, against one process on the same data:

- lean SparseAdamW under DDP (compact exchange, found by itself) in the usual ``no_sync`` loop;
- HSDP replicating across the nodes and sharding within each (a per-node mesh dim), lean;
- a `distributed_checkpoint` save on the 2 x 2 job, loaded by a 1 x 2 job (one node) that
  continues as the 2 x 2 job did.

Needs root and ``ip netns`` (Linux network namespaces); skipped with the reason where they are
missing (containers often lack them). Slow: ``pytest -m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 420
STEPS = 4
SAVE_AT = 2


# ----------------------------------------------------------------------------------------------
# The namespaces
# ----------------------------------------------------------------------------------------------


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns, "ip"] if netns else ["ip"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


class Nodes:
    """Two network namespaces joined by a veth pair: ``names[i]`` has address ``addrs[i]``."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = [f"gk{tag}n0", f"gk{tag}n1"]
        self.links = [f"gk{tag}v0", f"gk{tag}v1"]
        subnet = 16 + os.getpid() % 200
        self.addrs = [f"10.{subnet}.0.1", f"10.{subnet}.0.2"]

    def up(self) -> str | None:
        """Create them; returns why not (then nothing is left behind)."""
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            return "network namespaces need root"
        steps = [("netns", "add", self.names[0]), ("netns", "add", self.names[1]),
                 ("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])]
        steps += [("link", "set", link, "netns", ns) for link, ns in zip(self.links, self.names)]
        for args in steps:
            done = _ip(*args)
            if done.returncode != 0:
                self.down()
                return f"`ip {' '.join(args)}` failed: {done.stderr.strip()}"
        for ns, link, addr in zip(self.names, self.links, self.addrs):
            for args in (("addr", "add", f"{addr}/24", "dev", link), ("link", "set", link, "up"),
                         ("link", "set", "lo", "up")):
                done = _ip(*args, netns=ns)
                if done.returncode != 0:
                    self.down()
                    return f"`ip {' '.join(args)}` in {ns} failed: {done.stderr.strip()}"
        return None

    def down(self) -> None:
        for ns in self.names:  # (deleting a namespace deletes its end of the veth pair)
            _ip("netns", "del", ns)
        for link in self.links:
            _ip("link", "del", link)


@pytest.fixture(scope="module")
def nodes():
    made = Nodes()
    why = made.up()
    if why is not None:
        pytest.skip(f"no network namespaces here: {why}")
    try:
        yield made
    finally:
        made.down()


def _torchrun(nodes: Nodes, node: int, nnodes: int, port: int, mode: str, shared: Path,
              is_host: bool) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
               GLOO_SOCKET_IFNAME=nodes.links[node], GALLOP_RANKS_TIMEOUT_S="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = ["ip", "netns", "exec", nodes.names[node], sys.executable, "-m", "torch.distributed.run",
           "--nnodes", str(nnodes), "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"{nodes.addrs[0]}:{port}", "--rdzv_id", f"gallop-{mode}",
           "--rdzv_conf", f"is_host={int(is_host)}", "--local_addr", nodes.addrs[node],
           "--max_restarts", "0", __file__, mode, str(shared)]
    log = open(shared / f"{mode}-node{node}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen], shared: Path, mode: str) -> None:
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{mode}: torchrun did not finish within {TIMEOUT_S} s (a hang?)")
    logs = "\n".join((shared / f"{mode}-node{i}.log").read_text()[-3000:]
                     for i in range(len(procs)))
    assert all(p.returncode == 0 for p in procs), f"{mode} failed:\n{logs}"


@pytest.mark.slow
def test_two_nodes_ddp_lean_hsdp_and_a_checkpoint_loaded_on_one(nodes, tmp_path, request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("two torchrun nodes: run with -m slow")
    port = 29400 + os.getpid() % 500
    procs = [_torchrun(nodes, n, 2, port, "2x2", tmp_path, is_host=n == 0) for n in (0, 1)]
    _finish(procs, tmp_path, "2x2")
    reports = [json.loads((tmp_path / f"2x2-rank{r}.json").read_text()) for r in range(4)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["local_rank"] == r % 2 and rep["node_rank"] == r // 2, rep
        assert rep["address"] == nodes.addrs[r // 2], rep  # each node's ranks on its own address
        assert rep["errors"] == {}, f"rank {r}: {rep['errors']}"
    assert reports[0]["shard_group_nodes"] == [[0, 0], [1, 1]]  # HSDP shards within a node

    procs = [_torchrun(nodes, 0, 1, port + 1, "1x2", tmp_path, is_host=True)]
    _finish(procs, tmp_path, "1x2")
    for r in range(2):
        rep = json.loads((tmp_path / f"1x2-rank{r}.json").read_text())
        assert rep["errors"] == {}, f"1x2 rank {r}: {rep['errors']}"


# ----------------------------------------------------------------------------------------------
# One rank of a torchrun job
# ----------------------------------------------------------------------------------------------


def _ddp_lean(ctx) -> None:
    from test_distributed_loops import _no_sync_loop

    _no_sync_loop(ctx, "lean")


def _hsdp_model(mesh):
    from test_distributed_training import CKPT_OPTIONS, fsdp, mlp

    from gallop_kernels import SparseAdamW

    model = fsdp(mlp(), mesh)
    return model, SparseAdamW(model.named_parameters(), lean=True, **CKPT_OPTIONS)


def _hsdp_and_save(ctx, shared: Path, nnodes: int) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from test_distributed_training import (
        CKPT_OPTIONS, close_snapshots, mlp, model_state, snapshot, train)

    from gallop_kernels import SparseAdamW
    from gallop_kernels.optim import distributed_checkpoint as gdcp

    mesh = init_device_mesh("cpu", (nnodes, 2), mesh_dim_names=("replicate", "shard"))
    model, opt = _hsdp_model(mesh)
    part = (ctx.rank, ctx.world)
    train(model, opt, range(SAVE_AT), torch.float32, part=part)
    gdcp.save(opt, shared / "ckpt", model=model, state=model_state(model))
    train(model, opt, range(SAVE_AT, STEPS), torch.float32, part=part)
    got = snapshot(ctx, model, opt)
    ref = mlp()
    ref_opt = SparseAdamW(ref.named_parameters(), lean=True, replica_check=False, **CKPT_OPTIONS)
    train(ref, ref_opt, range(STEPS), torch.float32)
    close_snapshots(got, snapshot(None, ref, ref_opt), "HSDP 2 x 2 against one process")
    if ctx.rank == 0:
        (shared / "2x2-final.json").write_text(json.dumps(got))


def _load_on_one_node(ctx, shared: Path) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from test_distributed_training import close_snapshots, model_state, snapshot, train

    from gallop_kernels.optim import distributed_checkpoint as gdcp

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model, opt = _hsdp_model(mesh)
    state = model_state(model)
    gdcp.load(opt, shared / "ckpt", model=model, state=state)
    set_model_state_dict(model, state["model"])
    train(model, opt, range(SAVE_AT, STEPS), torch.float32, part=(ctx.rank, ctx.world))
    close_snapshots(snapshot(ctx, model, opt), json.loads((shared / "2x2-final.json").read_text()),
                    "2 x 2 -> 1 x 2")


def worker(mode: str, shared: str) -> None:
    import socket
    import traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from distributed_support import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = Ranks(rank, world, Path(shared))
    nnodes = world // int(os.environ["LOCAL_WORLD_SIZE"])
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    address = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", iface], capture_output=True,
                             text=True).stdout.split()[3].split("/")[0]
    node = int(os.environ["GROUP_RANK"])
    report = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "node_rank": node,
              "address": address, "host": socket.gethostname(), "errors": {}}
    nodes_of = ctx.all_same(node)
    if mode == "2x2":
        report["shard_group_nodes"] = [nodes_of[0:2], nodes_of[2:4]]
        steps = {"ddp_lean": lambda: _ddp_lean(ctx),
                 "hsdp_and_save": lambda: _hsdp_and_save(ctx, Path(shared), nnodes)}
    else:
        steps = {"load_on_one_node": lambda: _load_on_one_node(ctx, Path(shared))}
    for name, step in steps.items():
        try:
            step()
        except Exception:  # noqa: BLE001 - reported to the test
            report["errors"][name] = traceback.format_exc(limit=8)[-3000:]
        dist.barrier()
    Path(shared, f"{mode}-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    worker(*sys.argv[1:3])
