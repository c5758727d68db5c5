"""Every kernel variant the launchers emit, compiled ahead of time for real GPUs (no GPU needed).

The variants come from the launchers themselves: representative groups are built over the axes
the launchers export (their dtype tables, scores, state layouts, index widths, alignment), each
launcher describes its launches for them (`SelectionPlan.launches`, `sparse_adamw_launches`),
and the distinct (kernel, constexprs, options) are compiled with `launch.compile_for`, which
derives the argument specialisation exactly as ``JITFunction.run`` does. A launcher that gains a
dtype, a score or a constexpr changes what is compiled here without anyone editing a list.

Run it in a process without TRITON_INTERPRET (tests/test_compile_gate.py spawns one):

    python -m gallop_kernels.ops._triton.compile_gate --arch 80 90 100 [--subset] [--jobs 2]

It prints one JSON line naming the toolchain (the triton version, its feature test, the selection
shape it runs), then one per compiled variant, and exits non-zero if any variant fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Iterator

ARCHS = (80, 90, 100)  # sm_100 compiles with the ptxas-blackwell that ships with triton 3.9


def _padded(n: int, dtype, aligned: bool):
    """A contiguous tensor of n entries, 16-byte aligned or deliberately not."""
    import torch

    if aligned:
        return torch.zeros(n, dtype=dtype)
    return torch.zeros(n + 1, dtype=dtype)[1:]  # one element in: never 16-byte aligned


@contextlib.contextmanager
def _int64_from(limit: int):
    """Tensors of >= ``limit`` entries get int64 indices (real ones need 2**31 entries)."""
    from gallop_kernels import rules

    old = rules.INT32_LIMIT
    rules.INT32_LIMIT = limit
    try:
        yield
    finally:
        rules.INT32_LIMIT = old


def selection_launches(floored: bool = False) -> Iterator:
    """Launches of one selection per score, over every (θ dtype, g dtype or none, aligned or
    not, index width, selection shape) the selection launcher groups by; ``floored``: those
    with a magnitude floor instead (the scores that take one)."""
    from gallop_kernels.ops.select import launcher as S
    from gallop_kernels.rules import FLOORED_SCORES

    small, large = 48, 80  # large >= the lowered int64 limit
    for score in S.SCORES:
        params, grads, pre = [], [], []
        for t_dtype in S.FLOAT_DTYPES:
            for g_dtype in S.FLOAT_DTYPES + (None,):
                for aligned in (True, False):
                    for n in (small, large):
                        nn = n if aligned else n + 1  # odd sizes are not aligned either
                        params.append(_padded(nn, t_dtype, aligned))
                        grads.append(None if g_dtype is None else _padded(nn, g_dtype, aligned))
                        pre.append(_padded(nn, __import__("torch").float32, aligned))
        if floored and score not in FLOORED_SCORES:
            continue
        floors = [0.5] * len(params) if floored else None  # (one more constexpr, FLOOR)
        for shape in S.SHAPES:  # both code shapes, whichever this Triton would run
            with _int64_from(64):
                plan = S.SelectionPlan(params, grads, score, 1e-8, 0,
                                       pre if score == "precomputed" else None,
                                       params[0].device, floors=floors, shape=shape)
                yield from plan.launches(k=7)


def step_launches() -> Iterator:
    """Launches of one step per state layout, over every (param dtype, grad dtype, master,
    index dtype, dense or gathered gradient) the step launcher groups by."""
    import torch

    from gallop_kernels.ops.adamw import launcher as A
    from gallop_kernels.ops.adamw.hyper import AdamWHyper
    from gallop_kernels.ops.adamw.quantization import QUANT_BLOCK

    for layout in A.STATE_LAYOUTS:
        eight = layout == "8bit"
        cols = {k: [] for k in ("p", "g", "idx", "m", "v", "w", "mm", "vm")}
        for p_dtype in A.FLOAT_DTYPES:
            for g_dtype in A.FLOAT_DTYPES:
                for master in (False, True):
                    for idx_dtype in A.INDEX_DTYPES:
                        for compact in (False, True):
                            n, k = 40, 20
                            cols["p"].append(torch.zeros(n, dtype=p_dtype))
                            cols["g"].append(torch.zeros(k if compact else n, dtype=g_dtype))
                            cols["idx"].append(torch.arange(k, dtype=idx_dtype))
                            sd = torch.uint8 if eight else torch.float32
                            cols["m"].append(torch.zeros(k, dtype=sd))
                            cols["v"].append(torch.zeros(k, dtype=sd))
                            cols["w"].append(torch.zeros(k) if master else None)
                            blocks = -(-k // QUANT_BLOCK)
                            cols["mm"].append(torch.zeros(blocks))
                            cols["vm"].append(torch.zeros(blocks))
        extra = dict(exp_avg_absmaxes=cols["mm"], exp_avg_sq_absmaxes=cols["vm"]) if eight else {}
        yield from A.sparse_adamw_launches(
            cols["p"], cols["g"], cols["idx"], cols["m"], cols["v"], cols["w"],
            AdamWHyper(1, 1e-3, 0.9, 0.999, 1e-8, 0.01), state_layout=layout, **extra,
        )


def variants(subset: bool = False) -> dict[tuple, object]:
    """Distinct compiled variants (variant key -> one Launch of it). ``subset``: one per kernel
    and state layout, the launch most runs use (bf16 θ and g, gallop score, aligned, int32)."""
    out: dict[tuple, object] = {}
    # (the floored selections last: a compile cut short, as the GPU check's warm-up may be,
    # leaves out what the kernel tests launch least)
    for launch in [*selection_launches(), *step_launches(), *selection_launches(floored=True)]:
        out.setdefault(launch.variant_key(), launch)
    if not subset:
        return out
    picked: dict[tuple, tuple] = {}
    for key, launch in out.items():
        c = launch.constexprs
        group = (launch.name, c.get("STATE"), c.get("FILTER"), c.get("SIGNED"), str(c.get("MODE")),
                 c.get("WINDOWED"))
        score = 0 if c.get("SCORE") is None else int(getattr(c["SCORE"], "value", c["SCORE"]))
        typical = (str(c.get("THETA_T", c.get("P_T", ""))) in ("bf16", "bfloat16", "")
                   and str(c.get("G_T", "")) in ("bf16", "bfloat16", "")
                   and c.get("ALIGNED", True) and str(c.get("IDX_T", "int32")) in ("int32", "i32")
                   and score == 0 and c.get("HAS_MASTER", True) and not c.get("COMPACT_GRAD", False))
        if group not in picked or (typical and not picked[group][0]):
            picked[group] = (typical, key)
    return {key: out[key] for _, key in picked.values()}


def toolchain() -> dict:
    """The installed Triton, what its feature test found and the selection shape it runs."""
    import triton

    from gallop_kernels.ops._triton.launch import histogram_uses_ballots
    from gallop_kernels.ops.select.launcher import resolve_shape

    return {"triton": triton.__version__, "histogram_uses_ballots": histogram_uses_ballots(),
            "shape": resolve_shape()}


def describe(launch) -> dict:
    return {"kernel": launch.name,
            "constexprs": {k: str(getattr(v, "value", v)) for k, v in launch.constexprs.items()},
            "options": launch.options}


def _compile_one(item):
    key, arch = item
    launch = _VARIANTS[key]
    from gallop_kernels.ops._triton.launch import compile_for

    t = time.time()
    fp = {}
    try:
        kernel = compile_for(launch, arch)
        ok, err = True, None
        shared = kernel.metadata.shared
        fp = fp_policy_counts(kernel.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - reported, and the gate fails
        ok, err, shared = False, f"{type(e).__name__}: {e}"[:2000], None
    return {**describe(launch), "arch": arch, "ok": ok, "error": err, "shared": shared,
            "seconds": round(time.time() - t, 2), **fp}


def fp_policy_counts(ptx: str) -> dict[str, int]:
    """What the FP-fusion policy is checked on, in the PTX: explicit fused multiply-adds
    (``fma.rn.f32``: only where a kernel writes ``tl.fma``) and float multiplies/adds without a
    rounding modifier (``mul.f32``, ``add.f32``, ``sub.f32``), which ptxas may contract into an
    FMA; with ``enable_fp_fusion=False`` Triton emits ``.rn`` on every one and passes
    ``--fmad=false`` to ptxas, so there must be none."""
    import re

    # (sm_100 packs pairs: fma.rn.f32x2 is two fused multiply-adds)
    return {"ptx_fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx))
            + 2 * len(re.findall(r"\bfma\.rn\.f32x2\b", ptx)),
            "ptx_contractable": len(re.findall(r"\b(?:mul|add|sub)\.f32(?:x2)?\b", ptx))}


_VARIANTS: dict = {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--subset", action="store_true", help="one variant per kernel")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    args = parser.parse_args(argv)
    from gallop_kernels.ops.backends import interpreter_enabled

    if interpreter_enabled():
        print("compile_gate: unset TRITON_INTERPRET (the kernels must be JITFunctions)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # launches set it explicitly anyway
    print(json.dumps(toolchain()), flush=True)
    _VARIANTS.update(variants(args.subset))
    if args.list:
        for launch in _VARIANTS.values():
            print(json.dumps(describe(launch)))
        return 0
    items = [(key, arch) for arch in args.arch for key in _VARIANTS]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.imap_unordered(_compile_one, items)
            failed = _report(results)
    else:
        failed = _report(map(_compile_one, items))
    return 1 if failed else 0


def _report(results) -> int:
    failed = 0
    for r in results:
        failed += not r["ok"]
        print(json.dumps(r), flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
