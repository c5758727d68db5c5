"""The compile gate: the kernel variants the launchers emit compile for real GPUs, on this
CPU-only machine, with the argument specialisation a real launch gets.

The interpreter accepts what the compiler refuses (a module-level Python int read inside
``@triton.jit`` once made the 8-bit step uncompilable while every interpreted test passed), so
the variants are compiled ahead of time in a subprocess without TRITON_INTERPRET
(`gallop_kernels.ops._triton.compile_gate`). The default run compiles one variant per kernel (and per
key kind and state layout) for every architecture; ``-m compile_all`` compiles every variant.
The FP-fusion policy is checked on the same compiles: no contractable float multiply/add in any
PTX, and fused multiply-adds exactly where a kernel writes ``tl.fma``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from gallop_kernels.ops._triton import compile_gate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gate(*args: str, timeout: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "gallop_kernels.ops._triton.compile_gate", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


def _check(proc, rows, archs) -> None:
    failed = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["arch"] for r in rows} == set(archs)
    # the FP-fusion policy, in every compiled kernel
    contractable = [f"{r['kernel']} {r['constexprs']}" for r in rows if r["ptx_contractable"]]
    assert not contractable, f"contractable float mul/add (implicit FMA possible): {contractable}"
    for r in rows:
        c = r["constexprs"]
        if r["kernel"] == "sparse_adamw_kernel":  # tl.fma for m and for v, per element
            per_thread = int(c["BLOCK"]) // (32 * r["options"]["num_warps"])
            assert r["ptx_fma"] == 2 * per_thread, (c, r["ptx_fma"])
        else:
            assert r["ptx_fma"] == 0, (r["kernel"], r["ptx_fma"])


def test_every_kernel_compiles_for_sm80_sm90_sm100():
    """One variant of every kernel the launchers emit (bf16 θ and g, gallop, aligned, int32;
    the signed keys of precomputed scores; fp32 and 8-bit step), for every architecture."""
    proc, rows = _gate("--subset", "--jobs", "2", timeout=900)
    _check(proc, rows, compile_gate.ARCHS)
    # the subset covers every kernel the full enumeration holds (enumerated here, in the
    # interpreter process: the launch descriptions do not depend on it)
    every = {launch.name for launch in compile_gate.variants().values()}
    assert {r["kernel"] for r in rows} == every
    layouts = {r["constexprs"]["STATE"] for r in rows if r["kernel"] == "sparse_adamw_kernel"}
    assert layouts == {"0", "1"}  # fp32 and 8-bit state


def test_variants_come_from_the_launchers():
    """The enumeration holds what the launchers group by: every score, dtype pair, alignment,
    index width and state layout, and no integer kernel argument (ints live in tables)."""
    from gallop_kernels.ops.adamw import launcher as A
    from gallop_kernels.ops.select import launcher as S

    launches = list(compile_gate.variants().values())
    hist = [la.constexprs for la in launches if la.name == "histogram_kernel"]
    assert {str(getattr(c["SCORE"], "value", c["SCORE"])) for c in hist} == {
        str(getattr(v, "value", v)) for v in S.SCORE_CODES.values()}
    assert {c["ALIGNED"] for c in hist} == {True, False}
    assert {str(c["THETA_T"]) for c in hist if c["HAS_G"]} >= {"bf16", "fp16", "fp32"}
    writes = [la.constexprs for la in launches if la.name == "write_kernel"]
    assert {str(c["IDX_T"]) for c in writes} == {"int32", "int64"}
    steps = [la.constexprs for la in launches if la.name == "sparse_adamw_kernel"]
    assert {int(getattr(c["STATE"], "value", c["STATE"])) for c in steps} == {
        int(getattr(v, "value", v)) for v in A.STATE_LAYOUTS.values()}
    assert {(c["HAS_MASTER"], c["COMPACT_GRAD"]) for c in steps} == {
        (a, b) for a in (False, True) for b in (False, True)}
    for la in launches:
        assert la.options["enable_fp_fusion"] is False
        assert not any(isinstance(a, int) for a in la.args), la.name


@pytest.mark.compile_all
def test_every_variant_compiles(request):
    """All variants for all architectures (~1500 compiles: tens of minutes on 2 cores). Runs
    only when selected: ``pytest -m compile_all tests/test_compile_gate.py``."""
    if "compile_all" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("compiles every variant: select it with -m compile_all")
    proc, rows = _gate("--jobs", "2", timeout=4 * 3600)
    _check(proc, rows, compile_gate.ARCHS)
    assert len(rows) == len(compile_gate.variants()) * len(compile_gate.ARCHS)
